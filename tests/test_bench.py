"""`qvl-compile bench` on the tiny checkpoint: report shape and internal consistency, never speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qvl.errors import QvlError


def _numbers(obj, path=""):
    """Every int/float leaf of a JSON-like object, with its path."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def bench_result(tiny_artifact, tiny_checkpoint):
    from qvl.toolchain.eval.bench import run_bench

    steps = []
    result = run_bench(
        tiny_artifact, tiny_checkpoint, eager_dtype="fp32", threads=1, repeats=1,
        progress=lambda msg, done, total: steps.append((msg, done, total)),
        text_tokens=32, new_tokens=8, bandwidth_bytes=64 << 20, bandwidth_samples=2, bound_samples=2,
    )
    return result, steps


def test_bench_report_shape_and_consistency(bench_result, tiny_artifact):
    result, steps = bench_result
    result = json.loads(json.dumps(result))  # what --json prints round-trips

    for key in ("engines", "bandwidth_gbs", "bandwidth_spread_gbs", "bytes_per_token", "roofline_decode_tok_s",
                "ratios", "cpu", "artifact"):
        assert key in result, key
    assert set(result["engines"]) == {"qvl", "eager"}
    assert set(result["ratios"]) >= {"decode", "ttft_text", "ttft_image"}

    # every number anywhere is finite and non-negative; the headline ones strictly positive
    for path, v in _numbers(result):
        assert math.isfinite(v) and v >= 0, (path, v)
    metrics = ("decode_tok_s", "decode_tok_s_image", "ttft_text_s", "ttft_image_s", "prefill_tok_s",
               "prefill_tok_s_image", "vision_s", "peak_rss_bytes", "load_s", "bytes_per_token",
               "roofline_decode_tok_s", "decode_efficiency")
    for name, eng in result["engines"].items():
        for m in metrics:
            assert eng[m] > 0, (name, m, eng[m])
        assert eng["peak_rss_bytes"] >= eng["rss_after_load_bytes"] > 0
        for case in ("text", "image"):
            c = eng["cases"][case]
            assert c["new_tokens"] == 8 and len(c["runs"]) == 1
            assert all(r["generated_tokens"] == 8 for r in c["runs"])  # stop ids ignored: exactly 8 tokens
            assert c["ttft_s"] >= c["preprocess_s"] + c["vision_s"]
        assert eng["cases"]["text"]["prompt_tokens"] == 32
        assert eng["cases"]["text"]["vision_s"] == 0
    assert result["engines"]["qvl"]["info"]["torch_imported"] is False
    assert result["engines"]["eager"]["info"]["torch_threads"] == 1

    # the image case: 448x448, patch 16, merge 2 -> 28x28 patches -> 196 visual tokens, a 32-token question
    img = result["config"]["image"]
    assert img["visual_tokens"] == 196 and img["grid_thw"] == [1, 28, 28] and img["question_tokens"] == 32
    assert result["engines"]["qvl"]["cases"]["image"]["prompt_tokens"] == img["prompt_tokens"]
    assert result["engines"]["eager"]["cases"]["image"]["prompt_tokens"] == img["prompt_tokens"]

    # bandwidth: best of the samples, spread = [min, median, max]
    bw, (lo, med, hi) = result["bandwidth_gbs"], result["bandwidth_spread_gbs"]
    assert lo <= med <= hi and bw == hi == max(result["bandwidth_samples_gbs"])
    assert len(result["bandwidth_samples_gbs"]) == 4  # 2 before + 2 after

    # roofline = bandwidth / bytes per token; efficiency = measured / roofline; ratios = qvl / eager
    bpt = result["bytes_per_token"]
    assert result["roofline_decode_tok_s"] == pytest.approx(bw * 1e9 / bpt, rel=1e-9)
    q, e = result["engines"]["qvl"], result["engines"]["eager"]
    assert result["decode_efficiency"] == pytest.approx(q["decode_tok_s"] / result["roofline_decode_tok_s"])
    assert result["ratios"]["decode"] == pytest.approx(q["decode_tok_s"] / e["decode_tok_s"])
    assert result["ratios"]["ttft_text"] == pytest.approx(q["ttft_text_s"] / e["ttft_text_s"])
    assert result["ratios"]["ttft_image"] == pytest.approx(q["ttft_image_s"] / e["ttft_image_s"])

    # bytes per token come from the decoder graph: at least the tied [vocab, hidden] lm_head, at most the
    # whole weight store, and (fp32 both sides) within 1% of eager's decoder parameter bytes
    from qvl.artifacts.manifest import read_manifest

    manifest = read_manifest(tiny_artifact, verify_graphs=False).to_json()
    emb = manifest["embedding"]
    lm_head = int(np.prod(emb["shape"])) * np.dtype(emb["dtype"]).itemsize
    assert lm_head < bpt <= manifest["weights"]["bytes"]
    assert bpt == result["bytes_per_token_detail"]["external_bytes"] + result["bytes_per_token_detail"]["inline_bytes"]
    assert e["bytes_per_token"] == pytest.approx(bpt, rel=0.01)
    assert result["artifact"]["size_bytes"] > manifest["weights"]["bytes"]

    cpu = result["cpu"]
    assert set(cpu["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert cpu["mlas_isa"] in ("AVX-512", "AVX2", "SSE") and cpu["onnxruntime"]
    assert "CPUExecutionProvider" in cpu["ort_providers_used"]

    # progress: one call per step, in order, ending at done == total
    dones = [d for _, d, _ in steps]
    assert dones == sorted(dones) and steps[-1][1] == steps[-1][2] == len(steps) - 1


def test_bench_bounds_are_measured_in_the_same_run(bench_result, tiny_checkpoint):
    from qvl.toolchain.eval.bench_bounds import vision_flops

    result, steps = bench_result
    assert {"decode compute bound", "GEMM rates per phase"} <= {m for m, _, _ in steps}
    b, q = result["bounds"], result["engines"]["qvl"]
    compute = result["decode_compute_bound"]
    # the compute bound is the decoder's linears timed in this run; the lower bound binds
    assert b["compute_tok_s"] == pytest.approx(1 / compute["seconds_per_token"])
    assert b["bandwidth_tok_s"] == result["roofline_decode_tok_s"]
    assert b["binding_tok_s"] == min(b["compute_tok_s"], b["bandwidth_tok_s"])
    assert b["binding"] == ("compute" if b["compute_tok_s"] < b["bandwidth_tok_s"] else "bandwidth")
    assert b["decode_efficiency_vs_binding"] == pytest.approx(q["decode_tok_s"] / b["binding_tok_s"])

    # vision FLOPs from the checkpoint's config and the image's grid; GFLOP/s against the same run's SGEMM rate
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    v = b["vision"]
    expect = vision_flops(cfg["vision_config"], result["config"]["image"]["grid_thw"])
    assert v["flops"] == expect["flops"] == expect["linear_flops"] + expect["attention_flops"]
    assert v["patches"] == 28 * 28 and v["mlp_shape"] == [784, cfg["vision_config"]["hidden_size"],
                                                         cfg["vision_config"]["intermediate_size"]]
    assert v["seconds"] == q["vision_s"] and v["gflops"] == pytest.approx(v["flops"] / q["vision_s"] / 1e9)
    rates = result["gemm_rates"]["shapes"]
    assert rates["vision"]["M"] == 784 and rates["prefill"]["M"] == 32 and rates["decode"]["M"] == 1
    assert v["sgemm_peak_gflops"] == rates["vision"]["sgemm"]["gflops"]
    assert v["fraction_of_sgemm_peak"] == pytest.approx(v["gflops"] / v["sgemm_peak_gflops"])


def test_vision_flops_of_the_2b_config_on_one_448_image():
    # Counted by hand from Qwen3-VL-2B's vision config: 24 blocks, hidden 1024, MLP 4096, patch 16, temporal 2,
    # 2x2 merge to 2048, three DeepStack mergers + the main one; 28 x 28 patches.
    from qvl.toolchain.eval.bench_bounds import vision_flops

    cfg = json.loads((Path(__file__).parents[1] / "toolchain/data/qwen3-vl-2b-instruct.config.json").read_text())
    f = vision_flops(cfg["vision_config"], [1, 28, 28])
    p, h, i = 784, 1024, 4096
    embed = 2 * p * (3 * 2 * 16 * 16) * h
    blocks = 24 * 2 * p * (4 * h * h + 2 * h * i)
    mergers = 4 * 2 * (p // 4) * (4096 * 4096 + 4096 * 2048)
    assert f["linear_flops"] == embed + blocks + mergers
    assert f["attention_flops"] == 24 * 4 * p * p * h


def test_bench_plot_and_table(bench_result, tmp_path):
    from qvl.toolchain.eval.bench_report import format_bench, plot_bench

    result, _ = bench_result
    out = plot_bench(result, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    table = format_bench(result)
    assert "decode tok/s" in table and "TTFT image" in table and "GB/s" in table
    assert "decode bounds:" in table and "binds" in table and "SGEMM peak" in table


def test_default_inputs_are_exact(tiny_artifact, tmp_path):
    """The real-size inputs: 128 prompt tokens after the template; 196 visual tokens + a 32-token question."""
    from qvl.runtime.prompt import PromptBuilder
    from qvl.toolchain.eval.bench_inputs import build_inputs

    inputs = build_inputs(tiny_artifact, tmp_path)
    builder = PromptBuilder.from_dir(tiny_artifact)
    assert len(builder.build(inputs["text"]["messages"], add_generation_prompt=True)) == 128
    assert inputs["text"]["prompt_tokens"] == 128
    assert inputs["image"]["visual_tokens"] == 196 and inputs["image"]["question_tokens"] == 32


def test_runtime_ignore_stop(tiny_artifact):
    """`generate_ids(ignore_stop=True)` decodes past a stop id; without it generation stops there."""
    from qvl.runtime.model import Model

    model = Model(tiny_artifact, threads=1)
    prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}])
    first = next(iter(model.generate_ids(prompt, 4)))[0]
    model.stop_ids = [first]  # make the first greedy token a stop id
    assert len(list(model.generate_ids(prompt, 4))) == 1
    assert len(list(model.generate_ids(prompt, 4, ignore_stop=True))) == 4


def test_bench_rejects_bad_dtype(tiny_artifact, tiny_checkpoint):
    from qvl.toolchain.eval.bench import run_bench

    with pytest.raises(QvlError, match="eager dtype"):
        run_bench(tiny_artifact, tiny_checkpoint, eager_dtype="fp16")
