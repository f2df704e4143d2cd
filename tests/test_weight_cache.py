"""Issue #15 item 3: the content-addressed weight cache (`--cache`, `qvl-compile cache ls|verify|gc|add`, `pack`).

Real files, real `qvl-compile` subprocesses, real ONNX Runtime sessions. Every run gets its own `QVL_CACHE` (the
default cache lives at `$QVL_CACHE/weights`, the verified records at `$QVL_CACHE/verified`), so nothing here
touches the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, run_cli
from fs_helpers import finish, start_cli


def cli(env: dict, *args: str, **kw):
    return run_cli(*args, env={"QVL_CACHE": str(env["QVL_CACHE"]), **kw})


def ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    return proc


def manifest(art: Path) -> dict:
    return json.loads((Path(art) / "manifest.json").read_text())


def objects(art: Path) -> dict:
    return manifest(art)["weights"]["objects"]


def answer(env: dict, art: Path) -> tuple[str, int]:
    """`qvl-compile run --json`'s greedy answer: (text, tokens generated)."""
    proc = ok(cli(env, "run", str(art), "--prompt", "describe the weather", "--max-new-tokens", "12", "--json",
                  "--greedy"))
    out = json.loads(proc.stdout)
    return out["text"], out["generated_tokens"]


def disk_bytes(*dirs: Path) -> int:
    """Bytes on disk (st_blocks) of every file under `dirs`, each inode counted once (as `du` does)."""
    seen, total = set(), 0
    for d in dirs:
        for p in Path(d).rglob("*"):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def flip_byte(path: Path, offset: int) -> None:
    with Path(path).open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def store_object(env: dict, name: str) -> Path:
    return Path(env["QVL_CACHE"]) / "weights" / "objects" / name[:2] / name


@pytest.fixture(scope="module")
def world(tiny_artifact, tiny_checkpoint, tmp_path_factory):
    """One cache, four artifacts from the tiny checkpoint: its fp32 export (moved into the cache with `cache add`),
    and cpu fp32, cpu int4 and an sm61 engine kit compiled *from that cached export* with --cache; plus the int4
    artifact compiled without the cache (self-contained) for comparison."""
    root = tmp_path_factory.mktemp("wcache")
    env = {"QVL_CACHE": root / "user-cache"}
    w = SimpleNamespace(root=root, env=env, export=root / "fp32", cpu=root / "cpu", int4=root / "int4",
                        kit=root / "sm61", int4_plain=root / "int4-plain")
    shutil.copytree(tiny_artifact, w.export)
    before = disk_bytes(w.export)
    w.add = ok(cli(env, "cache", "add", str(w.export)))
    w.export_bytes_before = before
    procs = {
        "cpu": start_cli("compile", str(w.export), "--target", "cpu", "--out", str(w.cpu), "--cache",
                         env={"QVL_CACHE": str(env["QVL_CACHE"])}),
        "int4_plain": start_cli("compile", str(tiny_artifact), "--target", "cpu", "--weights", "int4", "--no-budget",
                                "--out", str(w.int4_plain), env={"QVL_CACHE": str(env["QVL_CACHE"])}),
    }
    w.runs = {k: ok(finish(p)) for k, p in procs.items()}
    # the second writer into the same cache starts after the first has finished: the order of `cache ls` is fixed
    w.runs["int4"] = ok(cli(env, "compile", str(w.export), "--target", "cpu", "--weights", "int4", "--no-budget",
                            "--out", str(w.int4), "--cache"))
    w.runs["kit"] = ok(cli(env, "compile", str(w.export), "--target", "sm61", "--out", str(w.kit), "--cache"))
    return w


# -- sharing -----------------------------------------------------------------------------------------------------


def test_targets_share_payloads_through_one_cache(world, tiny_artifact, tiny_cpu_artifact, sm61_kit_dir):
    w = world
    assert "weight cache" in w.add.stderr and "payloads" in w.add.stderr
    for art in (w.export, w.cpu, w.int4, w.kit):
        m = manifest(art)
        assert m["format_version"] == 2 and m["weights"]["layout"] == "objects", art
        assert not (art / "weights.bin").exists()
        for name in m["weights"]["objects"]:  # every payload is the cache's inode
            assert os.path.samefile(art / "weights" / name, store_object(w.env, name))
    assert manifest(w.int4_plain)["format_version"] == 1  # no --cache: the self-contained format, as before
    # fp32 export, cpu fp32 and the fp32 sm61 kit hold the same tensors: one copy on disk for all three
    assert set(objects(w.cpu)) == set(objects(w.export)) == set(objects(w.kit))
    shared = set(objects(w.int4)) & set(objects(w.export))
    assert shared and set(objects(w.int4)) - shared  # int4 shares the fp32 leftovers, adds its quantized codes
    for name in objects(w.export):
        assert os.stat(store_object(w.env, name)).st_nlink == 4 + (name in shared)  # cache + 3 (+ int4)
    # disk: the second and third fp32 targets cost their graphs only (no weights); int4 its unique payloads
    cache_dir = Path(w.env["QVL_CACHE"]) / "weights"
    together = disk_bytes(w.export, w.cpu, w.int4, w.kit, cache_dir)
    separate = sum(disk_bytes(a) for a in (tiny_artifact, tiny_cpu_artifact, w.int4_plain, sm61_kit_dir))
    weights = manifest(w.export)["weights"]["bytes"]
    assert together < separate - 2 * weights, (together, separate, weights)
    assert disk_bytes(w.export, w.cpu, w.kit, cache_dir) - disk_bytes(w.export, cache_dir) < weights / 10
    # `cache ls --json`: every shared payload names the artifacts that use it
    info = json.loads(ok(cli(w.env, "cache", "ls", "--json")).stdout)
    by_digest = {o["digest"]: o for o in info["objects"]}
    for name in shared:
        assert set(by_digest[name]["artifacts"]) == {str(a) for a in (w.export, w.cpu, w.int4, w.kit)}
    arts = {a["path"]: a for a in info["artifacts"]}
    assert set(arts) == {str(a) for a in (w.export, w.cpu, w.int4, w.kit)}
    assert arts[str(w.int4)]["unique_bytes"] > 0 and arts[str(w.cpu)]["unique_bytes"] == 0
    assert info["totals"]["unreferenced_objects"] == 0
    text = ok(cli(w.env, "cache", "ls")).stdout
    assert str(w.int4) in text and "unique" in text and "shared" in text and text.startswith("weight cache ")


def test_cached_artifacts_answer_like_self_contained(world, tiny_cpu_artifact, sm61_kit_dir, tmp_path):
    w = world
    assert answer(w.env, w.cpu) == answer(w.env, tiny_cpu_artifact)
    assert answer(w.env, w.int4) == answer(w.env, w.int4_plain)
    assert answer(w.env, w.kit) == answer(w.env, sm61_kit_dir)  # the kit's graphs on ONNX Runtime CPU
    packed = tmp_path / "packed"
    ok(cli(w.env, "pack", str(w.int4), "--out", str(packed)))
    assert answer(w.env, packed) == answer(w.env, w.int4_plain)


def test_verify_and_warm_start_cover_cached_payloads(world, monkeypatch, tmp_path):
    from qvl.artifacts import integrity
    from qvl.artifacts.manifest import read_manifest

    w = world
    proc = ok(cli(w.env, "verify", str(w.int4)))
    assert proc.stdout.startswith("OK ") and "blake3-named payloads" in proc.stdout, proc.stdout
    monkeypatch.setenv("QVL_CACHE", str(w.env["QVL_CACHE"]))
    n = integrity.STATS["weight_objects_hashed"]
    summary = {}
    read_manifest(w.int4, summary=summary)
    assert summary["weights"] == "cached" and integrity.STATS["weight_objects_hashed"] == n  # warm: no re-hash
    # another artifact linking the same payloads changes their inodes' ctime; the writer refreshes the records
    copy = tmp_path / "int4-copy"
    shutil.copytree(w.int4, copy)  # new inodes: a copy of the directory is self-contained
    ok(cli(w.env, "cache", "add", str(copy)))
    assert all(os.path.samefile(copy / "weights" / h, w.int4 / "weights" / h) for h in objects(w.int4))
    summary = {}
    read_manifest(w.int4, summary=summary)
    assert summary["weights"] == "cached" and integrity.STATS["weight_objects_hashed"] == n
    summary = {}
    read_manifest(w.int4, summary=summary, weights="full")  # `qvl-compile verify`: always re-hashed
    assert summary["weights"] == "verified" and integrity.STATS["weight_objects_hashed"] == n + len(objects(w.int4))
    shutil.rmtree(copy)


def test_cached_kit_parses_and_builds_with_tensorrt_rtx(world, tmp_path):
    """TensorRT's ONNX parser reads the hard-linked `weights/<blake3>` external data (TensorRT-RTX, CPU-only proof
    build with --allow-target-mismatch; TensorRT 8.6, the sm61 library, is not installed here)."""
    from qvl.errors import QvlError
    from qvl.toolchain.tensorrt.build import load_tensorrt

    try:
        load_tensorrt("tensorrt-rtx")
    except QvlError as exc:
        pytest.skip(f"TensorRT-RTX not importable: {exc}")
    assert all(os.stat(world.kit / "weights" / h).st_nlink > 1 for h in objects(world.kit))
    proc = ok(cli(world.env, "build-engine", str(world.kit), "--out", str(tmp_path / "engines"), "--allow-target-mismatch"))
    assert "wrote 2 engine(s)" in proc.stderr, proc.stderr


def test_compile_from_a_cached_source_keeps_the_cache_optional(world, tmp_path):
    """A format-2 source compiles without --cache into a self-contained format-1 artifact (onnx-ir refuses
    hard-linked external data; the toolchain maps the verified payloads itself)."""
    w = world
    out = tmp_path / "cpu-plain"
    ok(cli(w.env, "compile", str(w.export), "--target", "cpu", "--out", str(out)))
    assert manifest(out)["format_version"] == 1 and (out / "weights.bin").is_file()
    assert answer(w.env, out) == answer(w.env, w.cpu)


# -- damage -------------------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tiny_cpu_artifact, tmp_path):
    """A fresh cache with two copies of the cpu artifact added: every payload shared by A and B."""
    env = {"QVL_CACHE": tmp_path / "qc"}
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(tiny_cpu_artifact, a)
    shutil.copytree(tiny_cpu_artifact, b)
    ok(cli(env, "cache", "add", str(a), str(b)))
    return env, a, b


def test_flipped_byte_in_a_cached_payload_is_refused(pair, tiny_cpu_artifact, tmp_path):
    env, a, b = pair
    ok(cli(env, "verify", str(a)))  # verified record written
    name = max(objects(a).items(), key=lambda kv: kv[1])[0]  # the largest payload
    obj = store_object(env, name)
    st = obj.stat()
    flip_byte(obj, st.st_size // 2)
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back: ctime moved
    for art in (a, b):  # the damage is in the shared inode: both artifacts see it
        assert_one_line_error(cli(env, "run", str(art), "--prompt", "hi", "--max-new-tokens", "2"),
                              f"weights/{name[:16]}", "does not match its blake3 digest")
        assert_one_line_error(cli(env, "verify", str(art)), "does not match its blake3 digest")
    proc = cli(env, "cache", "verify")
    assert_one_line_error(proc, "1 of", name[:16], str(a), str(b))
    # a new compile through the cache replaces the damaged object; the old artifacts keep their damaged inode
    c = tmp_path / "C"
    shutil.copytree(tiny_cpu_artifact, c)
    ok(cli(env, "cache", "add", str(c)))
    ok(cli(env, "cache", "verify"))
    assert answer(env, c) == answer(env, tiny_cpu_artifact)
    assert_one_line_error(cli(env, "verify", str(a)), "does not match its blake3 digest")


def test_truncated_or_missing_payload_is_refused(pair):
    env, a, b = pair
    names = sorted(objects(a), key=lambda h: -objects(a)[h])
    with (a / "weights" / names[0]).open("r+b") as f:
        f.truncate(100)
    assert_one_line_error(cli(env, "run", str(a), "--prompt", "hi", "--max-new-tokens", "2"),
                          f"weights/{names[0][:16]}", "has 100 bytes, manifest says")
    (b / "weights" / names[0]).unlink()  # b shared that (now truncated) inode; its own name is gone now
    assert_one_line_error(cli(env, "verify", str(b)), "artifact weight object missing", names[0][:16])


def test_format_2_manifest_and_paths_are_checked(pair, tmp_path):
    from qvl.artifacts import integrity
    from qvl.artifacts.manifest import read_manifest
    from qvl.errors import QvlError

    env, a, b = pair
    name = next(iter(objects(a)))
    target = a / "weights" / name
    outside = tmp_path / "outside.bin"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(QvlError, match="not a regular file"):
        read_manifest(a)
    m = manifest(b)
    m["format_version"] = 1
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(QvlError, match="weights have no layout"):
        read_manifest(b)
    m["format_version"] = 2  # a payload the graphs read, dropped from the manifest's list
    dropped = next(h for h in m["weights"]["objects"] if h != m["embedding"]["file"].split("/")[-1])
    del m["weights"]["objects"][dropped]
    m["weights"]["bytes"] = sum(m["weights"]["objects"].values())
    m["weights"]["digest"] = integrity.objects_digest(m["weights"]["objects"])
    (b / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(cli(env, "run", str(b), "--prompt", "hi"), "reads weights from 'weights/",
                          "not one of the manifest's weight objects")


# -- pack, gc ------------------------------------------------------------------------------------------------------


def test_pack_output_runs_after_the_cache_is_deleted(pair, tiny_cpu_artifact, tmp_path):
    env, a, _ = pair
    out = tmp_path / "packed"
    proc = ok(cli(env, "pack", str(a), "--out", str(out)))
    assert "self-contained format-1 artifact" in proc.stderr
    assert_one_line_error(cli(env, "pack", str(a), "--out", str(out)), "already exists")
    shutil.rmtree(Path(env["QVL_CACHE"]))
    m = manifest(out)
    assert m["format_version"] == 1 and m["weights"]["file"] == "weights.bin" and not (out / "weights").exists()
    assert all(p.stat().st_nlink == 1 for p in out.iterdir() if p.is_file())  # nothing linked to anything
    ok(cli(env, "verify", str(out)))
    expected = answer(env, tiny_cpu_artifact)
    assert answer(env, out) == expected
    assert answer(env, a) == expected  # and the cached artifact itself: its links hold the bytes
    cp = tmp_path / "cp-r"
    shutil.copytree(a, cp)  # `cp -r` of a cached artifact is a standalone copy too
    ok(cli(env, "verify", str(cp)))


def test_gc_frees_unique_payloads_and_keeps_shared_ones(world, tmp_path):
    env = {"QVL_CACHE": tmp_path / "qc"}
    a, b = tmp_path / "cpu", tmp_path / "int4"
    shutil.copytree(world.cpu, a)  # format-2 copies (new inodes) moved into a fresh cache
    shutil.copytree(world.int4, b)
    ok(cli(env, "cache", "add", str(a), str(b)))
    only_a = set(objects(a)) - set(objects(b))
    shared = set(objects(a)) & set(objects(b))
    assert only_a and shared
    ok(cli(env, "cache", "gc"))
    assert all(store_object(env, h).exists() for h in objects(a) | objects(b))  # nothing to collect yet
    shutil.rmtree(a)
    proc = ok(cli(env, "cache", "gc", "--dry-run"))
    assert proc.stdout.startswith(f"would delete {len(only_a)} payloads"), proc.stdout
    assert all(store_object(env, h).exists() for h in only_a)
    proc = ok(cli(env, "cache", "gc"))
    assert proc.stdout.startswith(f"deleted {len(only_a)} payloads"), proc.stdout
    assert not any(store_object(env, h).exists() for h in only_a)
    assert all(store_object(env, h).exists() for h in objects(b))  # b's payloads, the shared ones included
    ok(cli(env, "verify", str(b)))
    assert answer(env, b) == answer(env, world.int4)
    info = json.loads(ok(cli(env, "cache", "ls", "--json")).stdout)
    assert [x["path"] for x in info["artifacts"]] == [str(b)]  # the deleted artifact was forgotten
    assert info["totals"]["objects"] == len(set(objects(b)) | set(manifest(b)["side_files"][k]["blake3"]
                                                                 for k in manifest(b)["side_files"]))


def test_gc_never_breaks_a_listed_artifact(pair, tmp_path):
    env, a, b = pair
    good = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text("{not json")  # unreadable: gc keeps what the registry says it needs
    shutil.rmtree(a)
    ok(cli(env, "cache", "gc"))
    assert all(store_object(env, h).exists() for h in json.loads(good)["weights"]["objects"])
    (b / "manifest.json").write_text(good)
    moved = tmp_path / "moved"
    b.rename(moved)  # unregistered path, but its links keep the payloads shared: gc keeps them
    proc = ok(cli(env, "cache", "ls"))
    assert "linked from unregistered paths" in proc.stdout, proc.stdout
    ok(cli(env, "cache", "gc"))
    assert all(os.path.samefile(store_object(env, h), moved / "weights" / h) for h in objects(moved))
    ok(cli(env, "verify", str(moved)))


# -- concurrency, crashes ---------------------------------------------------------------------------------------------


def test_concurrent_writers_share_one_cache(tiny_cpu_artifact, tmp_path):
    env = {"QVL_CACHE": str(tmp_path / "qc")}
    arts = [tmp_path / f"art{i}" for i in range(3)]
    for art in arts:
        shutil.copytree(tiny_cpu_artifact, art)
    procs = [start_cli("cache", "add", str(art), env=env) for art in arts]
    for p in procs:
        ok(finish(p))
    for name in objects(arts[0]):
        assert len({os.stat(art / "weights" / name).st_ino for art in arts}) == 1
    ok(cli(env, "cache", "verify"))
    assert not list((tmp_path / "qc" / "weights" / "tmp").iterdir())
    for art in arts:
        ok(cli(env, "verify", str(art)))


def test_killed_writer_leaves_artifact_and_cache_sound(tiny_cpu_artifact, tmp_path):
    env = {"QVL_CACHE": str(tmp_path / "qc")}
    art = tmp_path / "art"
    shutil.copytree(tiny_cpu_artifact, art)
    proc = run_cli("cache", "add", str(art), env={**env, "QVL_FAULT_AT": "cache:object"})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert manifest(art)["format_version"] == 1  # the artifact was not touched
    ok(run_cli("verify", str(art), env=env))
    cache = tmp_path / "qc" / "weights"
    assert len(list((cache / "tmp").iterdir())) == 1  # the complete but unnamed payload
    assert not [p for p in (cache / "objects").rglob("*") if p.is_file()]  # nothing named half-written
    ok(run_cli("cache", "verify", env=env))
    ok(run_cli("cache", "add", str(art), env=env))
    assert manifest(art)["format_version"] == 2
    ok(run_cli("cache", "gc", env=env))
    assert not list((cache / "tmp").iterdir())
    assert answer(env, art) == answer(env, tiny_cpu_artifact)


# -- CLI contract ----------------------------------------------------------------------------------------------------------


def test_cache_cli_user_errors(tiny_artifact, tmp_path):
    env = {"QVL_CACHE": tmp_path / "qc"}
    for sub in ("ls", "verify", "gc"):
        assert_one_line_error(cli(env, "cache", sub), "no weight cache at", "weights")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    assert_one_line_error(cli(env, "compile", str(tiny_artifact), "--target", "cpu", "--out", str(out),
                              "--cache-dir", str(junk)), "not empty and not a qvl-compile weight cache")
    assert not out.exists()  # refused before any work
    assert_one_line_error(cli(env, "cache", "gc", "--cache-dir", str(junk)), "no weight cache at")
    assert (junk / "keep.txt").read_text() == "mine"
    assert_one_line_error(cli(env, "pack", str(junk), "--out", str(tmp_path / "p")), "manifest.json")
    proc = cli(env, "cache", "frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert_one_line_error(cli(env, "cache", "ls", "--cache-dir", str(tmp_path / "qc2"), "--json"), "no weight cache at")


def test_cache_on_another_file_system_leaves_the_artifact_self_contained(tiny_cpu_artifact, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        pytest.skip("no second writable file system (/dev/shm) to put the cache on")
    cache = shm / f"qvl-test-cache-{os.getpid()}"
    try:
        art = tmp_path / "art"
        shutil.copytree(tiny_cpu_artifact, art)
        proc = ok(run_cli("cache", "add", str(art), "--cache-dir", str(cache), env={"QVL_CACHE": str(tmp_path / "qc")}))
        assert "another file system" in proc.stderr and "self-contained" in proc.stderr
        assert manifest(art)["format_version"] == 1
    finally:
        shutil.rmtree(cache, ignore_errors=True)
