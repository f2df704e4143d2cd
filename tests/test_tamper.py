"""Issue #12: artifacts are tamper-evident. Every case runs the real `qvl-compile` on a copy of the cpu artifact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from fs_helpers import EarlyRuns, finish


@pytest.fixture(scope="module", autouse=True)
def early(tiny_cpu_artifact, tiny_checkpoint_seed1, tmp_path_factory):
    """The parity run (~12 s) starts with the module's first test and overlaps the quick ones
    (fs_helpers.EarlyRuns); test_parity_against_another_checkpoint_warns takes it."""
    runs = EarlyRuns(tmp_path_factory.mktemp("early-tamper"))
    runs.add("parity", "parity", str(tiny_cpu_artifact), "--checkpoint", str(tiny_checkpoint_seed1), "--steps", "2",
             "--json", env={"QVL_CACHE": str(runs.dir("parity") / "qvl-cache")})
    yield runs
    runs.close()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "qvl-cache"


@pytest.fixture
def art(tiny_cpu_artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(tiny_cpu_artifact, dst)
    return dst


def cli(cache: Path, *args: str):
    return run_cli(*args, env={"QVL_CACHE": str(cache)})


def run(cache: Path, art: Path):
    return cli(cache, "run", str(art), "--prompt", "hi", "--max-new-tokens", "2")


def edit_manifest(art: Path, fn) -> None:
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def sha256(path: Path) -> str:
    from qvl.artifacts.manifest import sha256_file

    return sha256_file(path)


def test_good_artifact_verifies_and_records(art, cache):
    proc = cli(cache, "verify", str(art))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ") and "files" in proc.stdout and "MB verified" in proc.stdout, proc.stdout
    records = list((cache / "verified").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["path"] == str((art / "weights.bin").resolve())
    assert rec["digest"] == json.loads((art / "manifest.json").read_text())["weights"]["digest"]
    proc = run(cache, art)
    assert proc.returncode == 0, proc.stderr


def test_manifest_records_digests(tiny_cpu_artifact):
    m = json.loads((tiny_cpu_artifact / "manifest.json").read_text())
    w = m["weights"]
    assert w["algorithm"] == "blake3" and w["chunk_bytes"] == 64 << 20
    assert len(w["chunks"]) == -(-w["bytes"] // w["chunk_bytes"]) and len(w["digest"]) == 64
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(m["side_files"])


def test_flipped_weight_byte_is_refused(art, cache):
    offset = (art / "weights.bin").stat().st_size // 2
    flip_byte(art / "weights.bin", offset)
    assert_one_line_error(run(cache, art), "weights.bin does not match its manifest digest", "chunk 0 at offset 0")
    assert_one_line_error(cli(cache, "verify", str(art)), "does not match its manifest digest")


def test_flip_after_verified_record_is_refused(art, cache):
    assert cli(cache, "verify", str(art)).returncode == 0
    store = art / "weights.bin"
    before = store.stat()
    flip_byte(store, before.st_size - 10)  # in place: same inode, same size
    after = store.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert_one_line_error(run(cache, art), "does not match its manifest digest")
    assert_one_line_error(cli(cache, "verify", str(art)), "does not match its manifest digest")


def test_tampered_side_file_is_refused(art, cache):
    tok = json.loads((art / "tokenizer.json").read_text())
    tok.setdefault("added_tokens", []).append({"id": 1, "content": "evil", "special": True})
    (art / "tokenizer.json").write_text(json.dumps(tok))
    assert_one_line_error(run(cache, art), "side file tokenizer.json does not match")
    assert_one_line_error(cli(cache, "verify", str(art)), "tokenizer.json")


def test_unrecorded_side_file_is_refused(art, cache):
    (art / "chat_template.jinja").write_text("{{ 'pwned' }}")
    assert_one_line_error(run(cache, art), "chat_template.jinja is not recorded in the manifest")


def test_graph_path_outside_is_refused(art, cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(art / "decoder.onnx", outside / "decoder.onnx")

    def edit(m):
        m["graphs"]["decoder"].update(file="../outside/decoder.onnx", sha256=sha256(outside / "decoder.onnx"))
        m.pop("ort_optimized")

    edit_manifest(art, edit)
    assert_one_line_error(run(cache, art), "leaves the artifact directory")
    assert_one_line_error(cli(cache, "verify", str(art)), "../outside/decoder.onnx")


def test_optimized_graph_absolute_path_is_refused(art, cache):
    edit_manifest(art, lambda m: m["ort_optimized"]["graphs"]["decoder"].update(file=str((art / "decoder.ort.onnx").absolute())))
    assert_one_line_error(run(cache, art), "is an absolute path")


def test_symlinked_weight_store_outside_is_refused(art, cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(art / "weights.bin", outside / "weights.bin")
    os.symlink(outside / "weights.bin", art / "weights.bin")
    assert_one_line_error(run(cache, art), "resolves outside the artifact directory")
    assert_one_line_error(cli(cache, "verify", str(art)), "resolves outside")


def test_weights_entry_naming_another_file_is_refused(art, cache):
    shutil.copy(art / "weights.bin", art / "other.bin")

    def edit(m):
        m["weights"]["file"] = "other.bin"
        m["embedding"]["file"] = "other.bin"

    edit_manifest(art, edit)
    assert_one_line_error(run(cache, art), "reads weights from 'weights.bin', not the manifest's weight store 'other.bin'")


def test_embedding_outside_the_store_is_refused(art, cache):
    edit_manifest(art, lambda m: m["embedding"].update(file="tokenizer.json"))
    assert_one_line_error(run(cache, art), "embedding reads 'tokenizer.json'")


def test_edited_num_layers_is_refused(art, cache):
    edit_manifest(art, lambda m: m["model"].update(num_layers=m["model"]["num_layers"] + 1))
    assert_one_line_error(run(cache, art), "model.num_layers is 5 but the decoder graph has 4 past_key_* inputs")


def test_edited_model_dims_are_refused(art, cache):
    edit_manifest(art, lambda m: m["model"].update(num_kv_heads=m["model"]["num_kv_heads"] * 2))
    assert_one_line_error(run(cache, art), "model.num_kv_heads")


def test_edited_signature_disagrees_with_graph(art, cache):
    def edit(m):
        m["model"]["num_layers"] -= 1
        m["graphs"]["decoder"]["inputs"] = [i for i in m["graphs"]["decoder"]["inputs"] if not i["name"].endswith("_3")]

    edit_manifest(art, edit)
    assert_one_line_error(run(cache, art), "does not have the inputs/outputs its manifest entry records")


def test_unknown_format_version_is_refused(art, cache):
    edit_manifest(art, lambda m: m.update(format_version=3))  # 1 and 2 (the weight cache's) are read
    assert_one_line_error(run(cache, art), "format version 3 is not supported", "reads 1 and 2")
    assert_one_line_error(cli(cache, "verify", str(art)), "format version 3")


def test_format_version_must_match_the_weights_layout(art, cache):
    edit_manifest(art, lambda m: m.update(format_version=2))  # a format-1 weights.bin claiming format 2
    assert_one_line_error(run(cache, art), "format 2 weights must be layout 'objects'")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["model"].update(num_layers="4"), "model.num_layers is missing or not an integer"),
    (lambda m: m["decoder"].update(kv_mode=5), "decoder.kv_mode 5 is not supported"),
    (lambda m: m["graphs"]["vision"].update(inputs="pixel_values"), "graph 'vision' has no inputs list"),
    (lambda m: m.update(steps={"name": "export"}), "steps is not a list of objects"),
    (lambda m: m.update(kit={"graphs": {"decoder": {"file": "decoder.onnx"}}, "build": {"int8": "yes"}}),
     "kit.build.int8 is not a boolean"),
])
def test_wrong_typed_field_is_refused(art, cache, edit, needle):
    edit_manifest(art, edit)
    assert_one_line_error(run(cache, art), "corrupt manifest", needle)


@pytest.mark.parametrize("where", ["weights", "side_file"])
def test_other_paths_outside_are_refused(art, cache, where):
    def edit(m):
        if where == "weights":
            m["weights"]["file"] = m["embedding"]["file"] = "../weights.bin"
        else:
            m["side_files"]["../config.json"] = m["side_files"].pop("config.json")

    edit_manifest(art, edit)
    assert_one_line_error(cli(cache, "verify", str(art)), "corrupt manifest" if where == "side_file" else "leaves the artifact directory")


@pytest.mark.parametrize("section", ["weights", "side_files", "model", "embedding", "graphs", "source"])
def test_missing_section_is_refused(art, cache, section):
    edit_manifest(art, lambda m: m.pop(section))
    assert_one_line_error(cli(cache, "verify", str(art)), "corrupt manifest", repr(section))


def test_warm_start_uses_the_record(art, cache, monkeypatch):
    from qvl.artifacts import integrity
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.backends.ort import Engine

    monkeypatch.setenv("QVL_CACHE", str(cache))
    hashes = integrity.STATS["weight_store_hashes"]
    first = Engine(art, threads=1)
    assert first.integrity["weights"] == "verified"
    assert integrity.STATS["weight_store_hashes"] == hashes + 1
    assert len(list((cache / "verified").glob("*.json"))) == 1
    second = Engine(art, threads=1)
    assert second.integrity["weights"] == "cached"
    assert integrity.STATS["weight_store_hashes"] == hashes + 1  # the warm start did not re-hash
    m = read_manifest(art, verify_graphs=False)
    assert integrity.verify_weights(art / "weights.bin", m.weights.record) == "cached"
    assert integrity.verify_weights(art / "weights.bin", m.weights.record, use_record=False) == "verified"


def test_unwritable_cache_still_verifies(art, tmp_path, monkeypatch):
    from qvl.artifacts import integrity
    from qvl.artifacts.manifest import read_manifest

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("QVL_CACHE", str(blocker / "cache"))
    for _ in range(2):
        summary: dict = {}
        read_manifest(art, summary=summary)
        assert summary["weights"] == "verified"
    flip_byte(art / "weights.bin", 0)
    with pytest.raises(Exception, match="does not match its manifest digest"):
        read_manifest(art)
    assert integrity.cache_dir() == blocker / "cache"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    from qvl.artifacts.integrity import cache_dir

    monkeypatch.delenv("QVL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qvl-compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "qvl-compile"
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "q"))
    assert cache_dir() == tmp_path / "q"


def test_source_check_matches_own_checkpoint(tiny_checkpoint, tiny_cpu_artifact):
    from qvl.toolchain.eval.parity import source_check

    warnings = []
    matches, expected, actual = source_check(tiny_cpu_artifact, tiny_checkpoint, warn=warnings.append)
    assert matches is True and expected == actual and not warnings


def test_parity_against_another_checkpoint_warns(tiny_checkpoint_seed1, early):
    # `parity CPU_ART --checkpoint OTHER --steps 2 --json`, OTHER = `make-checkpoint --preset tiny --seed 1` (not
    # the artifact's source): started by `early`
    other = tiny_checkpoint_seed1
    proc = finish(early.take("parity"))
    assert "Traceback" not in proc.stderr, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: checkpoint")]
    assert len(warnings) == 1, proc.stderr
    assert str(other) in warnings[0] and "is not the one this artifact was compiled from" in warnings[0]
    report = json.loads(proc.stdout)
    assert report["source_matches"] is False and report["source_sha256"] != report["checkpoint_sha256"]
    assert report["cases"]  # it still ran
