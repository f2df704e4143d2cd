"""The CPU decoder's glue fusions (runtime/kernels/fuse.py) and their kernels (MatMulNBitsSwiGluAvx2,
HeadRmsNormRotary) against what ORT computes for the nodes they replace.

Fixture graphs are built here in the form ORT's saved optimized decoder has them (contrib ops, value_info with
symbolic dims). Each fusion: exact op list after, ORT's outputs before vs the fused kernel's after within stated
tolerances, skip reasons for the sites that must not fuse, idempotence; then a tiny decoder end to end.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvl.passes.precision import quantize_blockwise
from qvl.runtime import kernels
from qvl.runtime.cpu_flags import cpu_model_and_flags
from qvl.runtime.kernels import fuse
from tests.conftest import run_cli

_flags = (cpu_model_and_flags() or ("", set()))[1]
needs_kernels = pytest.mark.skipif(not {"avx2", "fma"} <= _flags or kernels.library_path() is None,
                                   reason="qvl's kernel library cannot run here (no AVX2/FMA or not built)")


@pytest.fixture(autouse=True)
def _use_qvl_kernels(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "qvl")
    monkeypatch.delenv(fuse.ENV, raising=False)
    monkeypatch.delenv(fuse.ROWWISE_ENV, raising=False)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def _session(model: onnx.ModelProto, library: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the nodes as written
    if library:
        so.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ops(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


def _fused(model) -> tuple[onnx.ModelProto, fuse.FusionReport]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kernels.rewrite(out)
    return out, fuse.fuse(out)


# --- SwiGLU -------------------------------------------------------------------------------------------------------

def _mlp(K=256, N=384, bits=4, blk=128, act="quickgelu", alpha=1.0, extra_reader=False, seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name in ("gate", "up"):
        q = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.05, bits, blk, True)
        inits += [numpy_helper.from_array(q.packed, f"{name}_B"),
                  numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), f"{name}_S")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"{name}_B", f"{name}_S"], [name], domain="com.microsoft",
                                      name=name, K=K, N=N, bits=bits, block_size=blk, accuracy_level=4))
    if act == "quickgelu":
        nodes.append(helper.make_node("QuickGelu", ["gate"], ["act"], domain="com.microsoft", alpha=alpha))
    else:
        nodes += [helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["gate", "sig"], ["act"])]
    nodes.append(helper.make_node("Mul", ["act", "up"], ["Y"], name="swiglu_mul"))
    outputs = [_vi("Y", ["batch", "seq", N])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["up"], ["R"]))
        outputs.append(_vi("R", ["batch", "seq", N]))
    return _model(nodes, [_vi("A", ["batch", "seq", K])], outputs, inits)


@needs_kernels
@pytest.mark.parametrize("act", ["quickgelu", "sigmoid_mul"])
@pytest.mark.parametrize("bits,blk", [(4, 128), (4, 64), (8, 32)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_swiglu_fuses_to_one_node_equal_to_ort(act, bits, blk, rows):
    model = _mlp(bits=bits, blk=blk, act=act)
    fused, report = _fused(model)
    assert _ops(fused) == [("qvl.kernels", "MatMulNBitsSwiGluAvx2")]
    assert (report.swiglu, report.norm_rotary, report.identity_reshapes, report.skipped) == (1, 0, 0, [])
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    kernels.rewrite(swapped)  # qvl's linears, ORT's activation: isolates the fused combine
    A = np.random.default_rng(1).standard_normal((1, rows, 256), dtype=np.float32)
    ref = _session(model, False).run(None, {"A": A})[0]
    unfused = _session(swapped, True).run(None, {"A": A})[0]
    got = _session(fused, True).run(None, {"A": A})[0]
    assert got.shape == ref.shape == (1, rows, 384)
    # same integer dot products as qvl's unfused linears; silu by expf vs ORT's logistic: float rounding only
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-6)
    # against ORT's MatMulNBits: summation order of the block sums as well
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_swiglu_skips_with_reasons():
    for kwargs, reason in (({"alpha": 1.702}, "QuickGelu alpha is not 1 (not SiLU)"),
                           ({"extra_reader": True}, "the up output has other readers")):
        fused, report = _fused(_mlp(**kwargs))
        assert report.swiglu == 0 and report.skipped == [("swiglu", "swiglu_mul", reason)], report.skipped
        assert ("qvl.kernels", "MatMulNBitsSwiGluAvx2") not in _ops(fused)
    # ORT's kernel kept for the linears (accuracy level 0): nothing for the fusion to take
    model = _mlp()
    for n in model.graph.node[:2]:
        n.attribute[-1].i = 0
    _, report = _fused(model)
    assert report.skipped == [("swiglu", "swiglu_mul", "gate or up is not a qvl MatMulNBitsAvx2")]


# --- per-head RMSNorm + rotary ---------------------------------------------------------------------------------

H, D, P = 4, 64, 32


def _norm_rotary(interleaved=0, with_value_info=True, extra_reader=False, rotary_dim=0, seed=0):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([0, 0, H, D], np.int64), "to_heads"),
             numpy_helper.from_array(np.array([0, 0, H * D], np.int64), "to_hidden"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(D)).astype(np.float32), "norm_w")]
    nodes = [helper.make_node("Reshape", ["X", "to_heads"], ["heads"]),
             helper.make_node("SimplifiedLayerNormalization", ["heads", "norm_w"], ["normed"], axis=-1,
                              epsilon=1e-6, stash_type=1),
             helper.make_node("Reshape", ["normed", "to_hidden"], ["flat"]),
             helper.make_node("RotaryEmbedding", ["flat", "pos", "cos", "sin"], ["Y"], domain="com.microsoft",
                              name="rotary", interleaved=interleaved, num_heads=H, rotary_embedding_dim=rotary_dim)]
    outputs = [_vi("Y", ["batch", "seq", H * D])]
    if extra_reader:
        outputs.append(_vi("normed", ["batch", "seq", H, D]))
    vis = [_vi("heads", ["batch", "seq", H, D]), _vi("normed", ["batch", "seq", H, D]),
           _vi("flat", ["batch", "seq", H * D])] if with_value_info else []
    inputs = [_vi("X", ["batch", "seq", H * D]), _vi("pos", ["batch", "seq"], TensorProto.INT64),
              _vi("cos", [P, D // 2]), _vi("sin", [P, D // 2])]
    return _model(nodes, inputs, outputs, inits, vis)


def _rotary_feeds(B, S, seed=2):
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 6.3, (P, D // 2)).astype(np.float32)
    return {"X": rng.standard_normal((B, S, H * D), dtype=np.float32) * 3,
            "pos": rng.integers(0, P, (B, S)).astype(np.int64),
            "cos": np.cos(angles), "sin": np.sin(angles)}


@needs_kernels
@pytest.mark.parametrize("B,S", [(1, 1), (1, 7), (2, 20)])
def test_norm_rotary_fuses_to_one_node_equal_to_ort(B, S):
    model = _norm_rotary()
    fused, report = _fused(model)
    assert _ops(fused) == [("qvl.kernels", "HeadRmsNormRotary")]
    assert (report.norm_rotary, report.skipped) == (1, [])
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["num_heads"] == H and attrs["epsilon"] == pytest.approx(1e-6)
    feeds = _rotary_feeds(B, S)
    ref = _session(model, False).run(None, feeds)[0]
    got = _session(fused, True).run(None, feeds)[0]
    assert got.shape == ref.shape == (B, S, H * D)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)


@needs_kernels
def test_norm_rotary_fails_the_run_on_a_position_outside_the_caches():
    fused, _ = _fused(_norm_rotary())
    feeds = _rotary_feeds(1, 3)
    feeds["pos"][0, 1] = P
    with pytest.raises(Exception, match="outside the cos/sin caches"):
        _session(fused, True).run(None, feeds)


def test_norm_rotary_skips_with_reasons():
    for kwargs, reason in (({"interleaved": 1}, "interleaved rotary"),
                           ({"with_value_info": False}, "shapes unknown (no value_info)"),
                           ({"extra_reader": True}, "an intermediate has other readers"),
                           ({"rotary_dim": D // 2}, "rotary covers part of the head")):
        fused, report = _fused(_norm_rotary(**kwargs))
        assert report.norm_rotary == 0 and report.skipped == [("norm_rotary", "rotary", reason)], report.skipped
        assert _ops(fused)[-1] == ("com.microsoft", "RotaryEmbedding")


# --- identity reshape pairs ------------------------------------------------------------------------------------

def _reshapes(back_to=(0, 0, 256), graph_output=False):
    inits = [numpy_helper.from_array(np.array([0, 0, 2, 128], np.int64), "split"),
             numpy_helper.from_array(np.array(back_to, np.int64), "join")]
    final = "Y" if graph_output else "joined"
    nodes = [helper.make_node("Reshape", ["X", "split"], ["heads"]),
             helper.make_node("Reshape", ["heads", "join"], [final], name="join")]
    out_shape = ["batch", "seq", *back_to[2:]]
    vis = [_vi("heads", ["batch", "seq", 2, 128])]
    if not graph_output:
        nodes.append(helper.make_node("Relu", ["joined"], ["Y"]))
        vis.append(_vi("joined", out_shape))
    return _model(nodes, [_vi("X", ["batch", "seq", 256])], [_vi("Y", out_shape)], inits, vis)


def test_an_identity_reshape_pair_disappears():
    model = _reshapes()
    fused, report = _fused(model)
    assert _ops(fused) == [("", "Relu")] and list(fused.graph.node[0].input) == ["X"]
    assert report.identity_reshapes == 1 and report.nodes_removed == 2
    X = np.random.default_rng(0).standard_normal((2, 3, 256), dtype=np.float32)
    np.testing.assert_array_equal(_session(fused, False).run(None, {"X": X})[0],
                                  _session(model, False).run(None, {"X": X})[0])


def test_reshape_pairs_that_are_not_identities_stay():
    for kwargs, reason in (({"back_to": (0, 0, 2, 2, 64)}, "not an identity: ['batch', 'seq', 256] -> "
                                                           "['batch', 'seq', 2, 2, 64]"),
                           ({"graph_output": True}, "the pair's output is a graph output")):
        fused, report = _fused(_reshapes(**kwargs))
        assert report.identity_reshapes == 0 and report.skipped == [("identity_reshapes", "join", reason)]
        assert [op for _, op in _ops(fused)][:2] == ["Reshape", "Reshape"]


def test_fusion_is_idempotent():
    for model in (_mlp(), _norm_rotary(), _reshapes()):
        fused, _ = _fused(model)
        once = fused.SerializeToString()
        report = fuse.fuse(fused)
        assert (report.swiglu, report.norm_rotary, report.identity_reshapes, report.attention) == (0, 0, 0, 0)
        assert fused.SerializeToString() == once


# --- through the runtime --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cpu_int4_block64(tiny_cpu_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = tmp_path_factory.mktemp("cpu-int4-b64-fuse") / "art"
    compile_with_precision(tiny_cpu_artifact, "cpu", out, weights="int4", block_size=64)
    return out


@needs_kernels
def test_the_decoder_fuses_every_layer_and_its_logits_match_the_unfused_kernels(tiny_cpu_int4_block64,
                                                                                tiny_cpu_artifact, monkeypatch):
    """As for qvl's linears alone (test_cpu_kernels.py): through a decoder a float-rounding difference in one node
    can flip a later int8 activation rounding, so the bound is relative to what int4 itself changes against fp32;
    the prefill row (no flip at this prompt) must agree to float rounding."""
    from qvl.runtime.backends.ort import Engine

    def logits(artifact, fusion: str, linears: str = "qvl"):
        monkeypatch.setenv(fuse.ENV, fusion)
        monkeypatch.setenv(kernels.ENV, linears)
        engine = Engine(artifact, threads=2)
        cache = engine.new_cache(32)
        ids = np.random.default_rng(0).integers(0, engine.vocab_size, (1, 9))
        pos = np.broadcast_to(np.arange(9)[None, None], (3, 1, 9)).copy()
        out = [engine.step(cache, engine.embed(ids), pos).copy()]
        for i, token in enumerate([146, 5, 77, 1000]):
            out.append(engine.step(cache, engine.embed(np.array([[token]])), np.full((3, 1, 1), 9 + i)).copy())
        return np.concatenate(out), engine.kernel_note, engine.num_layers

    fused, note, layers = logits(tiny_cpu_int4_block64, "1")
    assert f"{layers} SwiGLU, {2 * layers} norm+rotary, {layers} reshape pairs fused" in note, note
    assert f"{layers} attention row by row" in note, note
    unfused, unfused_note, _ = logits(tiny_cpu_int4_block64, "0")
    assert "fused" not in unfused_note
    ort_kernels = logits(tiny_cpu_int4_block64, "1", "ort")[0]
    fp32 = logits(tiny_cpu_artifact, "1", "ort")[0]
    quant_gap = np.abs(ort_kernels - fp32).max(axis=1)
    for reference in (unfused, ort_kernels):
        gap = np.abs(fused - reference).max(axis=1)
        assert gap[0] < 1e-5 * np.abs(reference[0]).max(), gap
        assert (gap < 0.1 * quant_gap).all(), (gap, quant_gap)
    assert (np.abs(fused - fp32).max(axis=1) < 1.05 * quant_gap).all()


@needs_kernels
def test_a_position_has_the_same_logits_decoded_prefilled_or_verified(tiny_cpu_int4_block64):
    """Every node of the fused decoder computes a position alone (the linears per row, attention row by row), so
    the logits of a position do not depend on how the calls were cut: one prefill, a prefill then single decode
    steps, or a prefill then a multi-position (verify) step give the same bits."""
    from qvl.runtime.backends.ort import Engine

    engine = Engine(tiny_cpu_int4_block64, threads=2)
    ids = np.random.default_rng(1).integers(0, engine.vocab_size, (1, 13))

    def last_logits(cuts):
        cache = engine.new_cache(32)
        for a, b in zip(cuts, cuts[1:]):
            pos = np.broadcast_to(np.arange(a, b)[None, None], (3, 1, b - a)).copy()
            out = engine.step(cache, engine.embed(ids[:, a:b]), pos).copy()
        engine.free(cache)
        return out

    whole = last_logits([0, 13])
    np.testing.assert_array_equal(last_logits([0, 9, 10, 11, 12, 13]), whole)
    np.testing.assert_array_equal(last_logits([0, 9, 13]), whole)
    np.testing.assert_array_equal(last_logits([0, 1, 2, 13]), whole)


@needs_kernels
def test_batched_rows_have_the_logits_of_the_rows_alone(tiny_cpu_int4_block64):
    """The serving path's batched decode step (rows of one pool at different lengths) on the fused decoder: every
    row's logits are the bits of that row stepped alone."""
    from qvl.runtime.backends.ort import Engine

    engine = Engine(tiny_cpu_int4_block64, threads=2)
    rng = np.random.default_rng(2)
    lengths = [5, 11, 2]
    prompts = [rng.integers(0, engine.vocab_size, (1, n)) for n in lengths]
    nxt = rng.integers(0, engine.vocab_size, (len(lengths), 1))

    def filled_pool():
        pool, rows = engine.row_pool(16, len(lengths))
        for row, ids in zip(rows, prompts):
            n = ids.shape[1]
            engine.step(row, engine.embed(ids), np.broadcast_to(np.arange(n)[None, None], (3, 1, n)).copy())
        return pool, rows

    pool, rows = filled_pool()
    embeds = np.concatenate([engine.embed(nxt[r:r + 1]) for r in range(len(rows))])
    pos = np.array(lengths, np.int64)[None, :, None].repeat(3, axis=0)
    batched = engine.batched_step(pool, 0, rows, embeds, pos)
    _, solo_rows = filled_pool()
    for r, row in enumerate(solo_rows):
        alone = engine.step(row, engine.embed(nxt[r:r + 1]), np.full((3, 1, 1), lengths[r]))
        np.testing.assert_array_equal(batched[r], alone[0])


@needs_kernels
def test_run_json_names_the_fusions(tiny_cpu_int4_block64, tmp_path):
    result = run_cli("run", str(tiny_cpu_int4_block64), "--prompt", "Say something.", "--max-new-tokens", "6",
                     "--json")
    assert result.returncode == 0, result.stderr
    note = json.loads(result.stdout)["decoder_linear_kernel"]
    assert note.startswith("qvl MatMulNBitsAvx2") and "SwiGLU" in note and "norm+rotary" in note, note
    assert "attention row by row" in note, note


@needs_kernels
def test_the_plain_graph_fuses_too_and_matches_the_optimized_one(tiny_cpu_int4_block64, monkeypatch):
    """An artifact written by another ORT version loads its plain graphs, optimized at load (after the fusions):
    the exported decoder already carries the contrib ops, so the same glue fuses and the logits agree."""
    from qvl.runtime.backends import ort as ort_backend

    def logits(version: str | None):
        if version:
            monkeypatch.setattr(ort_backend.ort, "__version__", version)
        engine = ort_backend.Engine(tiny_cpu_int4_block64, threads=2)
        cache = engine.new_cache(16)
        ids = np.random.default_rng(0).integers(0, engine.vocab_size, (1, 5))
        pos = np.broadcast_to(np.arange(5)[None, None], (3, 1, 5)).copy()
        return engine.step(cache, engine.embed(ids), pos).copy(), engine
    optimized, engine = logits(None)
    assert engine.optimized_graphs
    plain, engine = logits("0.0.0-not-this-ort")
    assert not engine.optimized_graphs and "norm+rotary" in engine.kernel_note, engine.kernel_note
    np.testing.assert_allclose(plain, optimized, rtol=0, atol=1e-4 * np.abs(optimized).max())
