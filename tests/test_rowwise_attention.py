"""qvl.kernels::RowwiseGroupQueryAttention (runtime/kernels/attention_op.cpp) and its swap in fuse.py: the same
outputs and cache writes as com.microsoft GroupQueryAttention on the CPU, and a position's output independent of
how many positions the call holds (decode step, prefill, follow-up prefill, verify step, batched rows).

Fixture graphs are one GroupQueryAttention node in the form the decoder has it (separate q/k/v, 7 inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qvl.runtime import kernels
from qvl.runtime.cpu_flags import cpu_model_and_flags
from qvl.runtime.kernels import fuse

_flags = (cpu_model_and_flags() or ("", set()))[1]
needs_kernels = pytest.mark.skipif(not {"avx2", "fma"} <= _flags or kernels.library_path() is None,
                                   reason="qvl's kernel library cannot run here (no AVX2/FMA or not built)")

@pytest.fixture(autouse=True)
def _swap_on(monkeypatch):
    monkeypatch.delenv(fuse.ROWWISE_ENV, raising=False)


HQ, HKV, D, CAP = 4, 2, 64, 24
# ORT's kernel and this one sum q.k and p.v in other orders and take exp differently: float rounding only
ATOL, RTOL = 2e-6, 1e-5


def _gqa(heads=HQ, kv_heads=HKV, scale: float | None = 0.125, inputs=7, **attrs) -> onnx.ModelProto:
    names = ["q", "k", "v", "pk", "pv", "sl", "tot", "cos", "sin"][:inputs]
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("GroupQueryAttention", names, ["o", "ok", "ov"], domain="com.microsoft", name="attn",
                            num_heads=heads, kv_num_heads=kv_heads, **attrs)
    f = TensorProto.FLOAT
    vis = [helper.make_tensor_value_info("q", f, ["B", "S", heads * D]),
           helper.make_tensor_value_info("k", f, ["B", "S", kv_heads * D]),
           helper.make_tensor_value_info("v", f, ["B", "S", kv_heads * D]),
           helper.make_tensor_value_info("pk", f, ["B", kv_heads, "P", D]),
           helper.make_tensor_value_info("pv", f, ["B", kv_heads, "P", D]),
           helper.make_tensor_value_info("sl", TensorProto.INT32, ["B"]),
           helper.make_tensor_value_info("tot", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("cos", f, [CAP, D // 2]),
           helper.make_tensor_value_info("sin", f, [CAP, D // 2])][:inputs]
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    graph = helper.make_graph([node], "g", vis, outs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def _swapped(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, fuse.fuse(out)


def _session(model, library: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library:
        so.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qkv(B, S, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, S, HQ * D), dtype=np.float32), rng.standard_normal((B, S, HKV * D), dtype=np.float32),
            rng.standard_normal((B, S, HKV * D), dtype=np.float32))


def _feeds(q, k, v, past_k, past_v, totals):
    return {"q": q, "k": k, "v": v, "pk": past_k, "pv": past_v, "sl": np.asarray(totals, np.int32) - 1,
            "tot": np.array([max(totals)], np.int32)}


def _past(B, held, seed):
    """A cache of CAP positions whose first held[b] positions of row b are filled (the rest zero)."""
    rng = np.random.default_rng(seed)
    pk, pv = np.zeros((2, B, HKV, CAP, D), np.float32)
    for b, n in enumerate(held):
        pk[b, :, :n] = rng.standard_normal((HKV, n, D))
        pv[b, :, :n] = rng.standard_normal((HKV, n, D))
    return pk, pv


# (B, S, held per row): a first prompt, a decode step, a follow-up prefill after a held prefix, batched decode rows
CASES = {"first_prompt": (1, 9, [0]), "decode": (1, 1, [9]), "follow_up": (1, 5, [9]),
         "batched_decode": (3, 1, [3, 9, 0])}


@needs_kernels
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scale", [0.125, None])
def test_the_swap_is_one_node_equal_to_ort(case, scale):
    B, S, held = CASES[case]
    model = _gqa(scale=scale)
    swapped, report = _swapped(model)
    assert [(n.domain, n.op_type) for n in swapped.graph.node] == [(kernels.DOMAIN, fuse.ATTENTION)]
    assert report.attention == 1 and report.skipped == []
    q, k, v = _qkv(B, S, seed=1)
    pk, pv = _past(B, held, seed=2)
    feeds = _feeds(q, k, v, pk, pv, [h + S for h in held])
    want = _session(model, False).run(None, feeds)
    got = _session(swapped, True).run(None, feeds)
    assert got[1].shape == want[1].shape == (B, HKV, CAP, D)
    np.testing.assert_array_equal(got[1], want[1])  # the caches are copies: exact
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)


def _bound_run(session, cache_k, cache_v, q, k, v, totals):
    """One call with present bound to the past buffers (the runtime's `shared` cache): writes the cache in place."""
    io = session.io_binding()
    for name, arr in (("q", q), ("k", k), ("v", v), ("sl", np.asarray(totals, np.int32) - 1),
                      ("tot", np.array([max(totals)], np.int32))):
        io.bind_cpu_input(name, arr)
    io.bind_output("o", "cpu")  # first: copy_outputs_to_cpu keeps the binding order
    for past, present, buf in (("pk", "ok", cache_k), ("pv", "ov", cache_v)):
        io.bind_input(past, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        io.bind_output(present, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0]


@needs_kernels
def test_a_shared_cache_is_written_in_place_as_ort_does():
    model = _gqa()
    sessions = {"ort": _session(model, False), "qvl": _session(_swapped(model)[0], True)}
    q, k, v = _qkv(1, 12, seed=3)
    caches, outs = {}, {}
    for name, s in sessions.items():
        ck, cv = np.zeros((2, 1, HKV, CAP, D), np.float32)
        o1 = _bound_run(s, ck, cv, q[:, :8], k[:, :8], v[:, :8], [8])  # prefill 8
        o2 = _bound_run(s, ck, cv, q[:, 8:12], k[:, 8:12], v[:, 8:12], [12])  # then 4 more
        caches[name], outs[name] = (ck, cv), np.concatenate([o1, o2], axis=1)
    np.testing.assert_array_equal(caches["qvl"][0], caches["ort"][0])
    np.testing.assert_array_equal(caches["qvl"][1], caches["ort"][1])
    assert not caches["qvl"][0][:, :, 12:].any()
    np.testing.assert_allclose(outs["qvl"], outs["ort"], rtol=RTOL, atol=ATOL)


@needs_kernels
def test_a_position_gets_the_same_bits_however_the_call_is_cut():
    """Prefill 12 at once == prefill 7, a 3-position verify step, then two decode steps, bit for bit; and a row
    batched with others == the row alone."""
    s = _session(_swapped(_gqa())[0], True)
    q, k, v = _qkv(1, 12, seed=4)
    whole = _bound_run(s, *np.zeros((2, 1, HKV, CAP, D), np.float32), q, k, v, [12])
    ck, cv = np.zeros((2, 1, HKV, CAP, D), np.float32)
    parts = []
    for a, b in ((0, 7), (7, 10), (10, 11), (11, 12)):
        parts.append(_bound_run(s, ck, cv, q[:, a:b], k[:, a:b], v[:, a:b], [b]))
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)

    held = [5, 11, 2]
    pk, pv = _past(3, held, seed=5)
    qb, kb, vb = _qkv(3, 1, seed=6)
    batched = _bound_run(s, pk.copy(), pv.copy(), qb, kb, vb, [h + 1 for h in held])
    for r, h in enumerate(held):
        alone = _bound_run(s, pk[r:r + 1].copy(), pv[r:r + 1].copy(), qb[r:r + 1], kb[r:r + 1], vb[r:r + 1], [h + 1])
        np.testing.assert_array_equal(batched[r:r + 1], alone)


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (6, 2), (4, 4)])
def test_every_query_tile_shape_gives_the_same_bits(heads, kv_heads):
    """Four, two or one query at a time (the tiles the kernel cuts a task's queries into, by group size and row
    count): 9 positions at once == 5, then 1, then 3, bit for bit, and equal to ORT within rounding."""
    model = _gqa(heads=heads, kv_heads=kv_heads)
    s = _session(_swapped(model)[0], True)
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q = rng.standard_normal((1, 9, heads * D), dtype=np.float32)
    k, v = rng.standard_normal((2, 1, 9, kv_heads * D), dtype=np.float32)
    whole = _bound_run(s, *np.zeros((2, 1, kv_heads, CAP, D), np.float32), q, k, v, [9])
    ck, cv = np.zeros((2, 1, kv_heads, CAP, D), np.float32)
    parts = [_bound_run(s, ck, cv, q[:, a:b], k[:, a:b], v[:, a:b], [b]) for a, b in ((0, 5), (5, 6), (6, 9))]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    z = np.zeros((1, kv_heads, CAP, D), np.float32)
    np.testing.assert_allclose(whole, _session(model, False).run(None, _feeds(q, k, v, z, z, [9]))[0],
                               rtol=RTOL, atol=ATOL)


@needs_kernels
def test_seqlens_past_the_cache_fail_the_run():
    s = _session(_swapped(_gqa())[0], True)
    q, k, v = _qkv(1, 1, seed=7)
    pk, pv = _past(1, [3], seed=8)
    feeds = _feeds(q, k, v, pk, pv, [3 + 1])
    feeds["sl"] = np.array([CAP + 4], np.int32)
    feeds["tot"] = np.array([CAP + 5], np.int32)
    feeds["pk"], feeds["pv"] = pk[:, :, :3].copy(), pv[:, :, :3].copy()  # a past of 3 cannot hold position 28
    with pytest.raises(Exception, match="seqlens_k does not fit"):
        s.run(None, feeds)


@pytest.mark.parametrize("attrs,inputs,reason", [
    ({"softcap": 30.0}, 7, "softcap=30.0"),
    ({"local_window_size": 8}, 7, "local_window_size=8"),
    ({"smooth_softmax": 1}, 7, "smooth_softmax=1"),
    ({"do_rotary": 1}, 9, "not exactly query, key, value, past_key, past_value, seqlens_k, total_sequence_length"),
    ({"k_quant_type": "PER_CHANNEL"}, 7, "k_quant_type=b'PER_CHANNEL'"),
])
def test_attention_outside_the_kernel_stays_with_its_reason(attrs, inputs, reason):
    model = _gqa(inputs=inputs, **attrs)
    swapped, report = _swapped(model)
    assert [(n.domain, n.op_type) for n in swapped.graph.node] == [("com.microsoft", "GroupQueryAttention")]
    assert report.attention == 0 and report.skipped == [("attention", "attn", reason)]


def test_the_swap_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(fuse.ROWWISE_ENV, "0")
    swapped, report = _swapped(_gqa())
    assert [(n.domain, n.op_type) for n in swapped.graph.node] == [("com.microsoft", "GroupQueryAttention")]
    assert report.attention == 0


def test_the_swap_is_idempotent():
    swapped, _ = _swapped(_gqa())
    once = swapped.SerializeToString()
    report = fuse.fuse(swapped)
    assert report.attention == 0 and report.skipped == []
    assert swapped.SerializeToString() == once
