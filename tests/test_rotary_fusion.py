"""RotaryFusionPass: per-token (MRoPE) rotate-half rotary -> com.microsoft.RotaryEmbedding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.base import TargetCapabilities
from qvl.passes.rotary_fusion import RotaryFusionPass

CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)
TRT = TargetCapabilities("sm61", ort_contrib_ops=False, max_opset=17)
H, D = 4, 16  # heads, head_dim


def _i64(name, values):
    return helper.make_tensor(name, T.INT64, [len(values)], values)


def rope_graph(equal_halves: bool = True) -> onnx.ModelProto:
    """The exporter's q path: y [B,S,H,D] -> Transpose -> x*cos + rotate_half(x)*sin -> Transpose -> Reshape,
    for two tensors (q and k) sharing one per-token cos/sin table built as Concat(c, c) from `angles`."""
    nodes = [
        helper.make_node("Cos", ["angles"], ["c"], name="cos"),
        helper.make_node("Sin", ["angles"], ["s"], name="sin"),
        # equal_halves=False: the second half comes from a different table, so a half-width cache is wrong
        helper.make_node("Concat", ["c", "c" if equal_halves else "s"], ["cc"], name="cat_cos", axis=-1),
        helper.make_node("Concat", ["s", "s"], ["ss"], name="cat_sin", axis=-1),
        helper.make_node("Unsqueeze", ["cc", "one"], ["cos4"], name="unsq_cos"),
        helper.make_node("Unsqueeze", ["ss", "one"], ["sin4"], name="unsq_sin"),
    ]
    for t in ("q", "k"):
        nodes += [
            helper.make_node("Transpose", [t], [f"{t}_x"], name=f"{t}_tr", perm=[0, 2, 1, 3]),
            helper.make_node("Mul", [f"{t}_x", "cos4"], [f"{t}_a"], name=f"{t}_mul_cos"),
            helper.make_node("Slice", [f"{t}_x", "zero", "half", "three", "one"], [f"{t}_x1"], name=f"{t}_slice1"),
            helper.make_node("Slice", [f"{t}_x", "half", "big", "three", "one"], [f"{t}_x2"], name=f"{t}_slice2"),
            helper.make_node("Neg", [f"{t}_x2"], [f"{t}_n"], name=f"{t}_neg"),
            helper.make_node("Concat", [f"{t}_n", f"{t}_x1"], [f"{t}_rot"], name=f"{t}_cat", axis=-1),
            helper.make_node("Mul", [f"{t}_rot", "sin4"], [f"{t}_b"], name=f"{t}_mul_sin"),
            helper.make_node("Add", [f"{t}_a", f"{t}_b"], [f"{t}_r"], name=f"{t}_add"),
            helper.make_node("Transpose", [f"{t}_r"], [f"{t}_back"], name=f"{t}_tr_back", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{t}_back", "flat"], [f"{t}_out"], name=f"{t}_flat"),
        ]
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("q", T.FLOAT, ["B", "S", H, D]),
         helper.make_tensor_value_info("k", T.FLOAT, ["B", "S", H, D]),
         helper.make_tensor_value_info("angles", T.FLOAT, ["B", "S", D // 2])],
        [helper.make_tensor_value_info(f"{t}_out", T.FLOAT, ["B", "S", H * D]) for t in ("q", "k")],
        [_i64("zero", [0]), _i64("one", [1]), _i64("three", [3]), _i64("half", [D // 2]),
         _i64("big", [2**63 - 1]), _i64("flat", [0, 0, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(batch=2, seq=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((batch, seq, H, D), dtype=np.float32),
            "k": rng.standard_normal((batch, seq, H, D), dtype=np.float32),
            # per-token angles (MRoPE rows differ token by token, and batch row by batch row)
            "angles": (rng.standard_normal((batch, seq, D // 2)) * 3).astype(np.float32)}


def _apply(proto: onnx.ModelProto, target=CPU, graph="decoder"):
    model = ir.serde.deserialize_model(proto)
    result = RotaryFusionPass(target=target, graph=graph)(model)
    return ir.serde.serialize_model(model), result


def test_fuses_both_sites_exact_ops_and_numerics():
    before = rope_graph()
    after, result = _apply(before)
    assert result.report.counts == {"rotary_embedding": 2, "head_split_round_trip": 2}
    assert result.report.skipped == []
    ops = Counter((n.domain, n.op_type) for n in after.graph.node)
    # per site: Reshape -> RotaryEmbedding -> Identity (the rewrite's head split + Transpose, the graph's
    # Transpose back + merge Reshape are a round trip and go); one shared cache/position subgraph (CSE): 2 cache
    # Reshapes, Shape, ReduceProd, Range, Reshape; 3 shared Constants ([-1, D/2], 0, 1) + the [0, 0, -1]
    # of the input Reshapes
    assert ops == Counter({
        ("", "Constant"): 4,
        ("", "Cos"): 1, ("", "Sin"): 1, ("com.microsoft", "RotaryEmbedding"): 2, ("", "Identity"): 2,
        ("", "Reshape"): 2 + 2 + 1, ("", "Shape"): 1, ("", "ReduceProd"): 1, ("", "Range"): 1,
    }), ops
    assert not any(n.op_type in ("Neg", "Slice", "Concat", "Mul", "Add", "Unsqueeze", "Transpose") for n in after.graph.node)
    for batch, seq in ((1, 1), (2, 5), (1, 9)):
        feeds = _feeds(batch, seq, seed=seq)
        for ref, got in zip(_run(before, feeds), _run(after, feeds)):
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_unequal_halves_are_skipped_with_reason():
    before = rope_graph(equal_halves=False)
    after, result = _apply(before)
    # the k/q sites share the cos table, so neither may use a half-width cache
    assert result.report.counts == {"rotary_embedding": 0, "head_split_round_trip": 0}
    reasons = {s.reason for s in result.report.skipped}
    assert reasons == {"RotateHalfRope: cos halves differ (Concat(c1, c2) with c1 != c2): "
                       "a half-width cache would not be exact"}, reasons
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]


def test_trt_target_and_unconfigured_graph_are_skipped():
    before = rope_graph()
    after, result = _apply(before, target=TRT)
    assert result.report.counts == {"rotary_embedding": 0, "head_split_round_trip": 0}
    assert "no ORT contrib ops" in result.report.skipped[0].reason
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    _, result = _apply(before, graph="vision")
    assert result.report.skipped[0].reason == "graph not configured for rotary fusion"


def test_idempotent():
    once, _ = _apply(rope_graph())
    twice, result = _apply(once)
    assert result.report.counts == {"rotary_embedding": 0, "head_split_round_trip": 0}
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]
    feeds = _feeds()
    for a, b in zip(_run(once, feeds), _run(twice, feeds)):
        np.testing.assert_array_equal(a, b)


def round_trip_graph(perm2=(0, 2, 1, 3)) -> onnx.ModelProto:
    """x [B, S, H*D] -> split heads -> BNSH -> back -> merge: the layout round trip left in front of GQA."""
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["heads"], name="split_heads"),
        helper.make_node("Transpose", ["heads"], ["bnsh"], name="to_bnsh", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["bnsh"], ["back"], name="to_bsnh", perm=list(perm2)),
        helper.make_node("Reshape", ["back", "merge"], ["y"], name="merge_heads"),
        helper.make_node("Relu", ["y"], ["out"], name="consumer"),
    ]
    graph = helper.make_graph(
        nodes, "round_trip", [helper.make_tensor_value_info("x", T.FLOAT, ["B", "S", H * D])],
        [helper.make_tensor_value_info("out", T.FLOAT, None)],
        [_i64("split", [0, 0, H, D]), _i64("merge", [0, 0, -1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_head_split_round_trip_is_removed_exactly_and_a_real_transpose_is_kept():
    before = round_trip_graph()
    after, result = _apply(before)
    assert result.report.counts == {"rotary_embedding": 0, "head_split_round_trip": 1}
    assert [n.op_type for n in after.graph.node] == ["Identity", "Relu"]
    x = np.random.default_rng(3).standard_normal((2, 3, H * D)).astype(np.float32)
    np.testing.assert_array_equal(_run(after, {"x": x})[0], _run(before, {"x": x})[0])
    # a second transpose that is not the inverse changes the data: left alone, with the reason
    before = round_trip_graph(perm2=(0, 1, 3, 2))
    after, result = _apply(before)
    assert result.report.counts == {"rotary_embedding": 0, "head_split_round_trip": 0}
    assert [(s.where, s.reason) for s in result.report.skipped] == [
        ("merge_heads", "HeadSplitRoundTrip: transposes are not the [0, 2, 1, 3] head swap and back")]
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
