"""The decode compute bound (toolchain/eval/decode_bound.py): the decoder's linears grouped by kernel signature
and timed with cache-resident weights on real ORT sessions."""

from __future__ import annotations

import math

import onnx
import pytest

from qvl.passes.precision import PrecisionConfig
from qvl.toolchain.eval.decode_bound import decode_compute_bound, linear_signatures


@pytest.fixture(scope="module")
def int4_artifact(tiny_artifact, tmp_path_factory):
    from qvl.toolchain.quant.accuracy_budget import quantize_artifact

    out = tmp_path_factory.mktemp("bound") / "int4"
    quantize_artifact(tiny_artifact, out, PrecisionConfig(weight_bits=4, block_size=32))
    return out


def _decoder(artifact):
    return onnx.load(str(artifact / "decoder.onnx"), load_external_data=False).graph


def test_signatures_cover_every_matmulnbits_of_the_decoder(int4_artifact, tiny_checkpoint):
    import json

    cfg = json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]
    graph = _decoder(int4_artifact)
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    sigs = linear_signatures(int4_artifact)
    assert sum(s["count"] for s in sigs) == len(nodes) == 7 * cfg["num_hidden_layers"] + 1
    assert {s["op"] for s in sigs} == {"MatMulNBits"} and all(s["bits"] == 4 and s["block_size"] == 32 for s in sigs)
    head = [s for s in sigs if s["N"] == cfg["vocab_size"]]
    assert len(head) == 1 and head[0]["count"] == 1 and head[0]["K"] == cfg["hidden_size"]
    # Bytes per call: packed codes + fp32 scales, no zero points (symmetric).
    for s in sigs:
        blocks = math.ceil(s["K"] / 32)
        assert s["weight_bytes"] == s["N"] * blocks * 16 + s["N"] * blocks * 4 and not s["zero_points"]


def test_fp32_artifact_counts_constant_weight_matmuls(tiny_artifact):
    graph = _decoder(tiny_artifact)
    inits = {t.name for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    sigs = linear_signatures(tiny_artifact)
    assert {s["op"] for s in sigs} == {"MatMul"} and sum(s["count"] for s in sigs) == len(weighted)
    assert all(s["weight_bytes"] == s["K"] * s["N"] * 4 for s in sigs)


def test_compute_bound_sums_the_timed_signatures(int4_artifact):
    # resident_bytes small enough that the lm_head is timed on an N-slice and scaled back up.
    r = decode_compute_bound(int4_artifact, threads=1, samples=2, resident_bytes=1 << 20)
    head = max(r["signatures"], key=lambda s: s["N"])
    assert head["timed_n"] < head["N"] and head["timed_n"] % 16 == 0
    assert r["linears"] == sum(s["count"] for s in r["signatures"])
    assert r["seconds_per_token"] == pytest.approx(sum(s["count"] * s["seconds_per_call"] for s in r["signatures"]))
    assert r["tok_s"] == pytest.approx(1 / r["seconds_per_token"]) and r["tok_s"] > 0
    assert r["run_overhead_s"] > 0 and all(s["seconds_per_call"] > 0 for s in r["signatures"])


def test_gemm_rates_measures_every_kernel_per_phase_shape():
    from qvl.runtime import kernels
    from qvl.toolchain.eval.gemm_rates import KERNELS, QVL_KERNELS, gemm_rates

    r = gemm_rates(1, shapes={"decode": (1, 128, 256), "vision": (32, 128, 256)}, samples=2, min_sample_s=0.005)
    assert set(r["shapes"]) == {"decode", "vision"}
    ran = r["kernels"]
    assert ran[:len(KERNELS)] == list(KERNELS)
    if kernels.choose().active:  # qvl's kernel runs the decoder's linears here: its rates are measured too
        assert ran[len(KERNELS):] == list(QVL_KERNELS)
    for name, row in r["shapes"].items():
        assert all(row[k]["gflops"] > 0 and row[k]["spread_gflops"][0] <= row[k]["spread_gflops"][1] for k in KERNELS)
        # Each kernel computes A @ W within what its weight precision allows (sgemm ~exact, int8 ~1e-2, int4 ~1e-1).
        assert row["sgemm"]["rel_error"] < 1e-5 and row["nbits8_int8"]["rel_error"] < 0.03
        # dynamic_int8 = the +-63 codes cpu-avx2 compiles: no int16 saturation on any host (the full-range form can
        # saturate without VNNI: passes/base.py); both quantize weights to ~1e-2.
        assert row["dynamic_int8"]["rel_error"] < 0.03 and max(row["nbits4_int8"]["rel_error"], row["nbits4_fp32"]["rel_error"]) < 0.3
        for k in ran[len(KERNELS):]:  # same int8 x int4 / int8 products as MatMulNBits at accuracy level 4
            assert row[k]["gflops"] > 0 and row[k]["rel_error"] < (0.03 if "nbits8" in k else 0.3)
        assert row["fastest"] == max(ran, key=lambda k: row[k]["gflops"])
        assert row[KERNELS[0]]["seconds"] == pytest.approx(2 * row["M"] * row["K"] * row["N"] / row[KERNELS[0]]["gflops"] / 1e9)


def test_gemm_rates_skips_a_qvl_row_whose_block_cannot_divide_k():
    from qvl.runtime import kernels
    from qvl.toolchain.eval.gemm_rates import gemm_rates

    if not kernels.choose().active:
        pytest.skip(f"qvl's kernel does not run on this host: {kernels.choose().note}")
    r = gemm_rates(1, shapes={"odd": (2, 96, 64)}, kernels=("sgemm", "qvl_nbits4_int8", "qvl_nbits8_int8"),
                   samples=2, min_sample_s=0.005)
    row = r["shapes"]["odd"]
    assert row["qvl_nbits4_int8"] == {"skipped": "K=96 is not a multiple of a block the kernel takes"}
    assert row["qvl_nbits8_int8"]["gflops"] > 0 and row["fastest"] in ("sgemm", "qvl_nbits8_int8")
