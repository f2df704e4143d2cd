"""`compile`: pass pipeline per target, manifest reports, parity of the compiled artifact."""

from __future__ import annotations

import json

import onnx

from conftest import assert_one_line_error, run_cli


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_cpu_compile_fuses_every_decoder_attention(tiny_cpu_artifact):
    m = json.loads((tiny_cpu_artifact / "manifest.json").read_text())
    layers = m["model"]["num_layers"]
    ops = _ops(tiny_cpu_artifact / "decoder.onnx")
    assert ops.count("GroupQueryAttention") == layers
    assert "Softmax" not in ops  # no unfused attention left
    assert "ReduceMean" not in ops and "Pow" not in ops  # every RMSNorm fused
    assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == 4 * layers + 1
    vision_ops = _ops(tiny_cpu_artifact / "vision.onnx")
    depth = m["model"]["vision"]["depth"]
    assert vision_ops.count("MultiHeadAttention") == depth and "Softmax" not in vision_ops
    assert m["decoder"]["kv_mode"] == "shared"
    compile_step = m["steps"][-1]
    assert compile_step["name"] == "compile" and compile_step["target"] == "cpu-avx2"
    gqa = [r for r in compile_step["passes"] if r["name"] == "attention_fusion" and r["graph"] == "decoder"]
    assert gqa[0]["counts"]["group_query_attention"] == layers


def test_compiled_artifact_stores_each_weight_once(tiny_cpu_artifact, tiny_artifact):
    # Same weight bytes as the plain export: fusion adds no copies (tied embedding included).
    a = (tiny_cpu_artifact / "weights.bin").stat().st_size
    b = (tiny_artifact / "weights.bin").stat().st_size
    assert a == b


def test_compiled_artifact_parity_with_in_place_cache(tiny_cpu_artifact, tiny_checkpoint, tmp_path):
    from qvl.runtime import load
    from qvl.toolchain.eval.parity import run_parity

    assert load(tiny_cpu_artifact, threads=1).engine.kv_mode == "shared"
    report = run_parity(tiny_cpu_artifact, tiny_checkpoint, tmp_path, threads=1)
    for c in report.cases:
        assert c.greedy_identical and c.max_abs_logit_diff <= 1e-4, (c.name, c.max_abs_logit_diff)
    assert report.passed


def test_in_place_cache_buffers_are_reused(tiny_cpu_artifact):
    from qvl.runtime import load

    model = load(tiny_cpu_artifact, threads=1)
    prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    eng = model.engine
    cache = eng.new_cache(capacity=len(prompt) + 4)
    ptrs = [b.data_ptr() for b in cache.tensors]
    emb = eng.embed(prompt.input_ids)[None]
    import numpy as np

    pos = np.broadcast_to(np.arange(len(prompt))[None, None], (3, 1, len(prompt))).copy()
    eng.step(cache, emb, pos)
    eng.step(cache, eng.embed([5])[None], np.full((3, 1, 1), len(prompt), np.int64))
    assert [b.data_ptr() for b in cache.tensors] == ptrs  # same buffers, written in place
    assert cache.length == len(prompt) + 1
    assert np.abs(cache.buffers[0][0, :, : cache.length]).sum() > 0
    assert not cache.buffers[0][0, :, cache.length :].any()  # untouched tail


def test_sm61_compile_emits_no_contrib_ops(tiny_artifact, tmp_path):
    from qvl.toolchain.compile.pipeline import compile_artifact

    rep = compile_artifact(tiny_artifact, "sm61", tmp_path / "sm61")
    for f in ("decoder.onnx", "vision.onnx"):
        model = onnx.load(str(tmp_path / "sm61" / f), load_external_data=False)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), f
    assert any("no ORT contrib ops" in s["reason"] for r in rep.pass_reports for s in r["skipped"])


def test_unknown_target_is_a_user_error(tiny_artifact, tmp_path):
    assert_one_line_error(run_cli("compile", str(tiny_artifact), "--target", "sm99", "--out", str(tmp_path / "x")), "unknown target")


def test_dump_after_writes_intermediate_graphs(tiny_artifact, tmp_path):
    proc = run_cli("compile", str(tiny_artifact), "--target", "cpu", "--out", str(tmp_path / "c"), "--dump-after", "attention_fusion")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "dump" / "decoder.after-attention_fusion.onnx").is_file()


def test_compile_int8_cli_records_budget_and_runs(tiny_artifact, tmp_path):
    proc = run_cli("compile", str(tiny_artifact), "--target", "cpu", "--weights", "int8", "--out", str(tmp_path / "q"), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy budget met" in proc.stderr
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert m["precision"]["budget_search"]["within_budget"] is True
    assert m["embedding"]["format"] == "matmulnbits" and m["embedding"]["bits"] == 8
    ops = _ops(tmp_path / "q" / "decoder.onnx")
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    from qvl.runtime import load

    text = load(tmp_path / "q", threads=1).generate([{"role": "user", "content": "Hello"}], max_new_tokens=4)
    assert isinstance(text, str)


def test_int4_for_sm61_is_refused(tiny_artifact, tmp_path):
    proc = run_cli("compile", str(tiny_artifact), "--target", "sm61", "--weights", "int4", "--out", str(tmp_path / "q"))
    assert_one_line_error(proc, "sm61 has no int4 path")
    assert not (tmp_path / "q").exists()


def test_compile_sparsity_without_budget_prunes_and_runs(tiny_artifact, tmp_path):
    proc = run_cli("compile", str(tiny_artifact), "--target", "cpu", "--sparsity", "0.25", "--no-budget",
                   "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["sparsity"]["layers_pruned"] == m["model"]["num_layers"]
    assert m["sparsity"]["mlp_weight_bytes_after"] < m["sparsity"]["mlp_weight_bytes_before"]
    from qvl.runtime import load

    assert isinstance(load(tmp_path / "s", threads=1).generate([{"role": "user", "content": "Hi"}], max_new_tokens=3), str)


def test_bad_sparsity_ratio_is_a_user_error(tiny_artifact, tmp_path):
    proc = run_cli("compile", str(tiny_artifact), "--target", "cpu", "--sparsity", "1.5", "--out", str(tmp_path / "s"))
    assert_one_line_error(proc, "--sparsity must be a fraction")


def test_default_block_size_per_width_and_shape():
    from qvl.toolchain.checkpoints.presets import _tiny_config, published_2b_config
    from qvl.toolchain.compile.pipeline import default_block_size

    assert default_block_size(4, published_2b_config()) == 128  # every K of the 2B model is a multiple of 128
    assert default_block_size(8, published_2b_config()) == 32  # where ORT's kernel runs the int8 linears
    assert default_block_size(8, published_2b_config(), int8_block=128) == 128  # the CPU targets (qvl's kernel)
    assert default_block_size(8, _tiny_config(), int8_block=128) == 32
    assert default_block_size(4, _tiny_config()) == 32  # tiny hidden 64: block 128 would skip every layer
