"""Export: graphs, artifact format, parity with eager, and clean failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli


def test_parity_suite_passes(tiny_artifact, tiny_checkpoint, tmp_path):
    """Issue thresholds: vision/DeepStack <= 1e-4, every step's logits <= 1e-4, greedy identical."""
    from qvl.toolchain.eval.parity import run_parity

    report = run_parity(tiny_artifact, tiny_checkpoint, tmp_path, threads=1)
    names = [c.name for c in report.cases]
    assert names == ["text-only", "image-square", "image-wide", "image-tall", "two-images", "chunked-prefill"]
    for c in report.cases:
        assert c.greedy_identical, (c.name, c.eager_tokens, c.artifact_tokens)
        assert len(c.step_max_abs_diff) == 32, c.name
        assert c.max_abs_logit_diff <= 1e-4, (c.name, c.max_abs_logit_diff)
        if c.name != "text-only":
            assert c.vision_max_abs_diff is not None and c.vision_max_abs_diff <= 1e-4
    assert report.passed


def test_parity_cli_exit_codes(tiny_artifact, tiny_checkpoint):
    proc = run_cli("parity", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint), "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True and len(report["cases"]) == 6
    # A stricter-than-possible tolerance makes the same run fail with exit 1 (not 0, not 2).
    from qvl.toolchain.eval.parity import run_parity

    strict = run_parity(tiny_artifact, tiny_checkpoint, tiny_artifact.parent / "imgs", steps=2, logit_tol=0.0, threads=1)
    assert not strict.passed


def test_embedding_stored_once(tiny_artifact, tiny_checkpoint):
    import onnx

    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    vocab, hidden = cfg["text_config"]["vocab_size"], cfg["text_config"]["hidden_size"]
    big = []
    inline_bytes = 0
    for g in manifest["graphs"].values():
        model = onnx.load(str(tiny_artifact / g["file"]), load_external_data=False)
        for init in model.graph.initializer:
            if sorted(init.dims) == sorted([vocab, hidden]):
                big.append((g["file"], init.name, list(init.dims)))
            if init.data_location != onnx.TensorProto.EXTERNAL:
                inline_bytes += len(init.raw_data)
    assert big == [("decoder.onnx", "embed_tokens.weight", [vocab, hidden])]
    # Every parameter is stored once: weights.bin (page-aligned) + small inline constants (norm scales,
    # biases, shape constants) add up to the checkpoint's fp32 parameter bytes, within alignment slack.
    from safetensors.numpy import load_file

    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    param_bytes = sum(t.nbytes for t in tensors.values())
    unique_bytes = sum({t.tobytes(): t.nbytes for t in tensors.values()}.values())  # e.g. all-ones norm scales
    stored = (tiny_artifact / "weights.bin").stat().st_size + inline_bytes
    assert unique_bytes <= stored <= param_bytes + 4096 * 200, (unique_bytes, stored, param_bytes)
    emb = manifest["embedding"]
    assert emb["shape"] == [vocab, hidden] and emb["file"] == "weights.bin"


def test_manifest_describes_graphs(tiny_artifact):
    from qvl.artifacts.manifest import read_manifest

    m = read_manifest(tiny_artifact).to_json()
    assert m["format_version"] == 1 and m["source"]["config"]["model_type"] == "qwen3_vl"
    dec = m["graphs"]["decoder"]
    ins = [i["name"] for i in dec["inputs"]]
    assert ins[:4] == ["inputs_embeds", "position_ids", "attention_mask", "deepstack_embeds"]
    assert ins[4:6] == ["past_key_0", "past_value_0"] and len(ins) == 5 + 2 * m["model"]["num_layers"]
    assert ins[-1] == "logit_positions"  # the last input: which positions get logits (speculative verification)
    assert [o["name"] for o in m["graphs"]["vision"]["outputs"]] == ["image_embeds", "deepstack_0", "deepstack_1", "deepstack_2"]
    assert m["steps"][0]["name"] == "export" and "torch" in m["tool_versions"]
    for f in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "generation_config.json"):
        assert (tiny_artifact / f).is_file()


def test_graphs_load_in_onnxruntime_with_supported_ir(tiny_artifact):
    import onnx
    import onnxruntime as ort

    for f in ("vision.onnx", "decoder.onnx"):
        model = onnx.load(str(tiny_artifact / f), load_external_data=False)
        assert model.ir_version <= 10
        ort.InferenceSession(str(tiny_artifact / f), providers=["CPUExecutionProvider"])


def test_unsupported_model_type_export_exit_2(tiny_checkpoint, tmp_path):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (d / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("export", str(d), "--out", str(tmp_path / "art"))
    assert_one_line_error(proc, "unsupported model_type 'qwen2_vl'")
    assert not (tmp_path / "art").exists()


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_export_failure_midway_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from qvl.toolchain.export import exporter as export_mod

    def boom(model, **options):
        raise RuntimeError("simulated failure while exporting the decoder")

    monkeypatch.setattr(export_mod, "export_decoder_graph", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_mod.export_artifact(tiny_checkpoint, tmp_path / "art")
    assert _leftovers(tmp_path, "art") == []


def test_killed_export_leaves_no_complete_looking_artifact(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from qvl.cli import main; main()", "export", str(tiny_checkpoint), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    # wait until the staging directory exists (export under way), then kill it hard
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".art.partial") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # the staging directory may remain after SIGKILL, but it is hidden, has no manifest and is tagged with its
    # dead owner (the next writer of that path removes it); the `.art.lock` flock file may remain too
    from qvl.toolchain.staging import owner_state

    for p in tmp_path.iterdir():
        if p.name == ".art.lock":
            continue
        assert p.name.startswith(".art.partial") and not (p / "manifest.json").exists()
        assert owner_state(p) == "dead"
