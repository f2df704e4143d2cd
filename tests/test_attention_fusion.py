"""AttentionFusionPass: KV-cached GQA attention -> com.microsoft.GroupQueryAttention (kv_cache "gqa-shared"), or
standard ONNX TensorScatter + Attention on a fixed-capacity in-place cache (kv_cache "tensor-scatter")."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.attention_fusion import AttentionFusionPass
from qvl.passes.base import TargetCapabilities

CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)
TRT = TargetCapabilities("sm61", ort_contrib_ops=False, max_opset=17)
CUDA_SM61 = TargetCapabilities("cuda-sm61", ort_contrib_ops=True, kv_cache="tensor-scatter", provider="cuda")
NQ, NKV, D = 4, 2, 8
HIDDEN = 16


def _const(name, arr):
    return helper.make_tensor(name, T.INT64 if arr.dtype == np.int64 else T.FLOAT, arr.shape, arr.flatten().tolist())


def attention_graph(unsqueeze_axis: int = 2, with_embeds: bool = False) -> onnx.ModelProto:
    """One decoder attention in exactly the form torch.onnx (dynamo) exports transformers' eager GQA."""
    g = NQ // NKV
    nodes = [
        # causal + padding bias from attention_mask (the exporter's Where-based mask)
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Shape", ["attention_mask"], ["m_shape"]),
        helper.make_node("Gather", ["m_shape", "one"], ["total"], axis=0),
        helper.make_node("Gather", ["q_shape", "two"], ["seq"], axis=0),
        helper.make_node("Sub", ["total", "seq"], ["past_len"]),
        helper.make_node("Range", ["past_len", "total", "one"], ["q_pos"]),
        helper.make_node("Range", ["zero", "total", "one"], ["k_pos"]),
        helper.make_node("Unsqueeze", ["q_pos", "ax1"], ["q_col"]),
        helper.make_node("LessOrEqual", ["k_pos", "q_col"], ["causal"]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["m4b"], to=T.BOOL),
        helper.make_node("And", ["causal", "m4b"], ["allowed"]),
        helper.make_node("Not", ["allowed"], ["blocked"]),
        helper.make_node("Where", ["blocked", "neg", "zerof"], ["bias"]),
        # attention
        helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=2),
        helper.make_node("Concat", ["past_value", "v"], ["present_value"], axis=2),
        helper.make_node("Unsqueeze", ["present_key", "uax"], ["k5"]),
        helper.make_node("Shape", ["present_key"], ["pk_shape"]),
        helper.make_node("Gather", ["pk_shape", "two"], ["t_len"], axis=0),
        helper.make_node("Concat", ["b1", "kvh", "grp", "t_len_1", "dh"], ["exp_shape"], axis=0),
        helper.make_node("Reshape", ["t_len", "m1"], ["t_len_1"]),
        helper.make_node("Expand", ["k5", "exp_shape"], ["k5e"]),
        helper.make_node("Concat", ["b1", "nq", "t_len_1", "dh"], ["rep_shape"], axis=0),
        helper.make_node("Reshape", ["k5e", "rep_shape"], ["k_rep"]),
        helper.make_node("Unsqueeze", ["present_value", "uax"], ["v5"]),
        helper.make_node("Expand", ["v5", "exp_shape"], ["v5e"]),
        helper.make_node("Reshape", ["v5e", "rep_shape"], ["v_rep"]),
        helper.make_node("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_rep"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "out_shape"], ["attn_out"]),
    ]
    # fix node order: t_len_1 is produced after use above; topologically sort by moving Reshape up
    nodes.insert(19, nodes.pop(20))
    inits = [
        _const("one", np.array(1, np.int64)), _const("two", np.array(2, np.int64)), _const("zero", np.array(0, np.int64)),
        _const("ax1", np.array([1], np.int64)), _const("ax12", np.array([1, 2], np.int64)),
        _const("uax", np.array([unsqueeze_axis], np.int64)), _const("m1", np.array([-1], np.int64)),
        _const("b1", np.array([1], np.int64)), _const("kvh", np.array([NKV], np.int64)), _const("grp", np.array([g], np.int64)),
        _const("nq", np.array([NQ], np.int64)), _const("dh", np.array([D], np.int64)),
        _const("out_shape", np.array([1, -1, NQ * D], np.int64)),
        _const("scale", np.array(D ** -0.5, np.float32)), _const("neg", np.array(np.finfo(np.float32).min, np.float32)),
        _const("zerof", np.array(0.0, np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("q", T.FLOAT, [1, NQ, "S", D]),
         helper.make_tensor_value_info("k", T.FLOAT, [1, NKV, "S", D]),
         helper.make_tensor_value_info("v", T.FLOAT, [1, NKV, "S", D]),
         helper.make_tensor_value_info("attention_mask", T.INT64, [1, "T"]),
         helper.make_tensor_value_info("past_key", T.FLOAT, [1, NKV, "P", D]),
         helper.make_tensor_value_info("past_value", T.FLOAT, [1, NKV, "P", D])]
        # the decoder's token input: the scatter form reads the new-token count S from it
        + ([helper.make_tensor_value_info("inputs_embeds", T.FLOAT, [1, "S", HIDDEN])] if with_embeds else []),
        [helper.make_tensor_value_info("attn_out", T.FLOAT, [1, "S", NQ * D]),
         helper.make_tensor_value_info("present_key", T.FLOAT, [1, NKV, "T", D]),
         helper.make_tensor_value_info("present_value", T.FLOAT, [1, NKV, "T", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _feeds(past: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    return {"q": f(1, NQ, seq, D), "k": f(1, NKV, seq, D), "v": f(1, NKV, seq, D),
            "attention_mask": np.ones((1, past + seq), np.int64),
            "past_key": f(1, NKV, past, D), "past_value": f(1, NKV, past, D)}


def _run(model_ir: ir.Model, feeds):
    proto = ir.serde.serialize_model(model_ir)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_fuses_to_group_query_attention_with_equal_outputs():
    before = ir.serde.deserialize_model(attention_graph())
    reference = {shape: _run(before, _feeds(*shape)) for shape in ((0, 5), (6, 1), (4, 3))}
    model = ir.serde.deserialize_model(attention_graph())
    result = AttentionFusionPass(target=CPU, graph="decoder")(model)
    assert result.report.counts == {"group_query_attention": 1, "scatter_attention": 0}
    assert result.report.skipped == []
    ops = [n.op_type for n in model.graph]
    assert ops == [
        "Transpose", "Constant", "Reshape",  # q -> [B, S, Nq*D]
        "Transpose", "Constant", "Reshape",  # k
        "Transpose", "Constant", "Reshape",  # v
        "ReduceSum", "Sub", "Cast", "Shape", "Gather", "Cast",  # seqlens_k / total_sequence_length from attention_mask
        "GroupQueryAttention",
    ]
    for shape, ref in reference.items():
        out = _run(model, _feeds(*shape))
        np.testing.assert_allclose(out[0], ref[0], atol=2e-6, rtol=0)  # attention output
        np.testing.assert_array_equal(out[1], ref[1])  # present key: exact copy
        np.testing.assert_array_equal(out[2], ref[2])


def test_is_idempotent():
    model = ir.serde.deserialize_model(attention_graph())
    AttentionFusionPass(target=CPU, graph="decoder")(model)
    ops = [n.op_type for n in model.graph]
    again = AttentionFusionPass(target=CPU, graph="decoder")(model)
    assert again.report.counts["group_query_attention"] == 0
    assert [n.op_type for n in model.graph] == ops


def test_tensorrt_target_is_skipped_with_reason():
    model = ir.serde.deserialize_model(attention_graph())
    ops = [n.op_type for n in model.graph]
    result = AttentionFusionPass(target=TRT, graph="decoder")(model)
    assert result.report.counts == {"group_query_attention": 0, "scatter_attention": 0}
    assert "no ORT contrib ops" in result.report.skipped[0].reason
    assert [n.op_type for n in model.graph] == ops


def test_non_repeat_kv_layout_is_skipped_with_reason():
    # Unsqueeze on axis 1 is not transformers' repeat_kv: the head grouping would differ.
    model = ir.serde.deserialize_model(attention_graph(unsqueeze_axis=1))
    result = AttentionFusionPass(target=CPU, graph="decoder")(model)
    assert result.report.counts["group_query_attention"] == 0
    assert [s.reason for s in result.report.skipped] == ["attention subgraph did not match the KV-cached GQA pattern"]
    assert "Softmax" in [n.op_type for n in model.graph]


def test_vision_graph_is_not_touched():
    model = ir.serde.deserialize_model(attention_graph())
    result = AttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts["group_query_attention"] == 0
    assert "not configured" in result.report.skipped[0].reason


# -- the tensor-scatter form (ORT CUDA in fp32) ---------------------------------------------------------

CAP = 12


def _scatter_feeds(past: int, seq: int, seed: int = 0):
    """The concat graph's feeds and the scatter graph's: the same past in the first `past` slots of a
    CAP-position buffer whose tail holds garbage (it must be masked out), the mask as wide as the buffer."""
    concat = _feeds(past, seq, seed)
    rng = np.random.default_rng(seed + 1)
    scatter = {k: concat[k] for k in ("q", "k", "v")}
    for name in ("past_key", "past_value"):
        buf = rng.standard_normal((1, NKV, CAP, D), dtype=np.float32) * 100
        buf[:, :, :past] = concat[name]
        scatter[name] = buf
    mask = np.zeros((1, CAP), np.int64)
    mask[:, :past + seq] = 1
    scatter["attention_mask"] = mask
    scatter["inputs_embeds"] = np.zeros((1, seq, HIDDEN), np.float32)
    return concat, scatter


def test_scatter_form_is_standard_onnx_with_equal_outputs_and_an_in_place_cache():
    before = ir.serde.deserialize_model(attention_graph(with_embeds=True))
    model = ir.serde.deserialize_model(attention_graph(with_embeds=True))
    result = AttentionFusionPass(target=CUDA_SM61, graph="decoder")(model)
    assert result.report.counts == {"group_query_attention": 0, "scatter_attention": 1}
    assert result.report.skipped == []
    assert model.opset_imports[""] == 24 and "com.microsoft" not in model.opset_imports
    ops = [n.op_type for n in model.graph]
    assert ops == [
        "Shape", "ConstantOfShape", "ReduceSum", "ReduceSum", "Sub",  # write_indices = held positions - S (on device)
        "TensorScatter", "TensorScatter",  # the new keys/values into the cache, in place
        "Squeeze", "Shape", "Squeeze",  # S and the capacity as host scalars (Range bounds)
        "Unsqueeze", "Range", "Add", "Range", "Unsqueeze", "LessOrEqual", "Unsqueeze", "Cast", "And", "Unsqueeze",  # mask
        "Attention", "Transpose", "Reshape",
    ]
    for past, seq in ((0, 5), (6, 1), (4, 3), (11, 1)):
        concat, scatter = _scatter_feeds(past, seq)
        ref = _run(before, {**concat, "inputs_embeds": scatter["inputs_embeds"]})
        out = _run(model, scatter)
        np.testing.assert_allclose(out[0], ref[0], atol=2e-6, rtol=0)
        total = past + seq
        np.testing.assert_array_equal(out[1][:, :, :total], ref[1])  # the held positions: the concat present
        np.testing.assert_array_equal(out[1][:, :, total:], scatter["past_key"][:, :, total:])  # tail untouched
        np.testing.assert_array_equal(out[2][:, :, :total], ref[2])


def test_scatter_form_writes_in_place_through_io_binding():
    model = ir.serde.deserialize_model(attention_graph(with_embeds=True))
    AttentionFusionPass(target=CUDA_SM61, graph="decoder")(model)
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    concat, scatter = _scatter_feeds(4, 2)
    ref = _run(ir.serde.deserialize_model(attention_graph()), concat)
    bufs = {n: ort.OrtValue.ortvalue_from_numpy(scatter[n].copy()) for n in ("past_key", "past_value")}
    io = sess.io_binding()
    for name in ("q", "k", "v", "attention_mask", "inputs_embeds"):
        io.bind_cpu_input(name, scatter[name])
    io.bind_output("attn_out")
    for kind in ("key", "value"):
        io.bind_ortvalue_input(f"past_{kind}", bufs[f"past_{kind}"])
        io.bind_ortvalue_output(f"present_{kind}", bufs[f"past_{kind}"])  # one buffer: past and present
    sess.run_with_iobinding(io)
    np.testing.assert_allclose(io.get_outputs()[0].numpy(), ref[0], atol=2e-6, rtol=0)
    np.testing.assert_array_equal(bufs["past_key"].numpy()[:, :, :6], ref[1])
    np.testing.assert_array_equal(bufs["past_value"].numpy()[:, :, :6], ref[2])


def test_scatter_form_is_idempotent():
    model = ir.serde.deserialize_model(attention_graph(with_embeds=True))
    AttentionFusionPass(target=CUDA_SM61, graph="decoder")(model)
    ops = [n.op_type for n in model.graph]
    again = AttentionFusionPass(target=CUDA_SM61, graph="decoder")(model)
    assert again.report.counts == {"group_query_attention": 0, "scatter_attention": 0, "already_fused": 1}
    assert [n.op_type for n in model.graph] == ops


def test_scatter_form_without_inputs_embeds_is_skipped_with_reason():
    model = ir.serde.deserialize_model(attention_graph())  # no inputs_embeds: the new-token count is unknown
    result = AttentionFusionPass(target=CUDA_SM61, graph="decoder")(model)
    assert result.report.counts["scatter_attention"] == 0
    assert "no attention_mask (and inputs_embeds)" in result.report.skipped[0].reason
    assert "Softmax" in [n.op_type for n in model.graph]
