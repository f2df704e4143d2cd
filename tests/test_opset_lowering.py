"""OpsetLoweringPass: Gelu-20 expanded to primitive ops, graph version-converted to the target's opset."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.base import TargetCapabilities
from qvl.passes.opset_lowering import OpsetLoweringConfig, OpsetLoweringPass

SM61 = TargetCapabilities("sm61", ort_contrib_ops=False, max_opset=17)
SM75 = TargetCapabilities("sm75+", ("float32", "float16"), ort_contrib_ops=False)  # no opset ceiling
D = 8


def gelu_graph(extra_nodes=()) -> onnx.ModelProto:
    """Both Gelu forms as torch.onnx exports them at opset 20, then an opset-18 ReduceMean (axes input)."""
    nodes = [
        helper.make_node("Gelu", ["x"], ["g_erf"], name="gelu_erf"),  # approximate defaults to "none"
        helper.make_node("Gelu", ["x"], ["g_tanh"], name="gelu_tanh", approximate="tanh"),
        helper.make_node("Add", ["g_erf", "g_tanh"], ["s"], name="add"),
        # the exporter writes noop_with_empty_axes explicitly; onnx's 18 -> 17 adapter leaves it behind
        helper.make_node("ReduceMean", ["s", "axes"], ["y"], name="mean", keepdims=1, noop_with_empty_axes=0),
        *extra_nodes,
    ]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, ["N", 1]),
               helper.make_tensor_value_info("g_erf", T.FLOAT, ["N", D]),
               helper.make_tensor_value_info("g_tanh", T.FLOAT, ["N", D])]
    outputs += [helper.make_tensor_value_info(n.output[0], T.FLOAT, ["N", D]) for n in extra_nodes]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", T.FLOAT, ["N", D])], outputs,
                              [helper.make_tensor("axes", T.INT64, [1], [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _x() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, D), dtype=np.float32) * 3
    x[0] = [-10, -4, -1e-3, 0, 1e-3, 1, 4, 10]  # tails and the origin
    return x


def test_expands_gelu_and_converts_to_opset_17_with_equal_outputs():
    x = _x()
    before = _run(ir.serde.deserialize_model(gelu_graph()), x)
    model = ir.serde.deserialize_model(gelu_graph())
    result = OpsetLoweringPass(target=SM61, graph="vision")(model)
    assert result.report.counts == {"gelu_erf": 1, "gelu_tanh": 1, "opset_converted": 1, "stray_attributes": 1}
    assert result.report.skipped == []
    assert result.report.details == {"from_opset": 20, "to_opset": 17}
    assert model.opset_imports[""] == 17
    assert [n.op_type for n in model.graph] == [
        # erf form: 0.5*x * (1 + Erf(x / sqrt(2)))
        "Constant", "Constant", "Div", "Erf", "Add", "Constant", "Mul", "Mul",
        # tanh form: 0.5*x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x*x*x)))
        "Mul", "Mul", "Constant", "Constant", "Mul", "Add", "Mul", "Constant", "Tanh", "Add", "Constant", "Mul", "Mul",
        "Add",
        "ReduceMean",  # ReduceMean-13: axes as attribute, no noop_with_empty_axes
    ]
    mean = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert list(mean.attributes["axes"].as_ints()) == [-1] and "noop_with_empty_axes" not in mean.attributes
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    after = _run(model, x)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_expansion_matches_the_approximate_attribute_exactly():
    # Each expansion equals its own Gelu form, not the other one (they differ by up to ~1e-3).
    x = _x()
    model = ir.serde.deserialize_model(gelu_graph())
    OpsetLoweringPass(target=SM61, graph="vision")(model)
    _, g_erf, g_tanh = _run(model, x)
    import math

    exact = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x.astype(np.float64))
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    np.testing.assert_allclose(g_erf, exact, atol=1e-6, rtol=0)
    np.testing.assert_allclose(g_tanh, tanh, atol=1e-6, rtol=0)
    assert np.abs(exact - tanh).max() > 1e-4


def test_is_idempotent():
    model = ir.serde.deserialize_model(gelu_graph())
    OpsetLoweringPass(target=SM61, graph="vision")(model)
    ops = [n.op_type for n in model.graph]
    again = OpsetLoweringPass(target=SM61, graph="vision")(model)
    assert not again.modified
    assert again.report.skipped[0].reason == "graph is opset 17, already <= 17: nothing to do"
    assert [n.op_type for n in model.graph] == ops


def test_target_without_opset_ceiling_is_skipped_with_reason():
    model = ir.serde.deserialize_model(gelu_graph())
    ops = [n.op_type for n in model.graph]
    result = OpsetLoweringPass(target=SM75, graph="vision")(model)
    assert not result.modified
    assert "has no ONNX opset ceiling" in result.report.skipped[0].reason
    assert [n.op_type for n in model.graph] == ops and model.opset_imports[""] == 20


def test_target_opset_20_has_nothing_to_do():
    model = ir.serde.deserialize_model(gelu_graph())
    result = OpsetLoweringPass(OpsetLoweringConfig(target_opset=20), target=SM61, graph="vision")(model)
    assert not result.modified
    assert result.report.skipped[0].reason == "graph is opset 20, already <= 20: nothing to do"
    assert "Gelu" in [n.op_type for n in model.graph]


def test_op_without_earlier_version_or_expansion_is_skipped_with_reason():
    # Mish exists only from opset 18 and has no expansion here: the graph must stay valid at opset 20.
    model = ir.serde.deserialize_model(gelu_graph([helper.make_node("Mish", ["x"], ["m"], name="mish")]))
    result = OpsetLoweringPass(target=SM61, graph="vision")(model)
    assert result.report.counts["opset_converted"] == 0
    assert [s.reason for s in result.report.skipped] == [
        "op(s) Mish have no version <= 17 and no expansion; graph stays opset 20"]
    assert model.opset_imports[""] == 20
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_big_initializers_are_not_serialized_and_survive_conversion():
    # Weights travel around the converter as graph inputs: same tensor objects afterwards.
    w = np.arange(D * 256, dtype=np.float32).reshape(D, 256) / 1000
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["y"], approximate="tanh")],
        "mm", [helper.make_tensor_value_info("x", T.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 256])],
        [onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    x = _x()
    before = _run(ir.serde.deserialize_model(proto), x)
    model = ir.serde.deserialize_model(proto)
    tensor = model.graph.initializers["w"].const_value
    OpsetLoweringPass(target=SM61, graph="vision")(model)
    assert model.graph.initializers["w"].const_value is tensor
    assert [v.name for v in model.graph.inputs] == ["x"]
    np.testing.assert_allclose(_run(model, x)[0], before[0], atol=1e-5, rtol=1e-6)
