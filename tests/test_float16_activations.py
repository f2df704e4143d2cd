"""Float16ActivationsPass: a fused ORT graph computes in float16; KV cache float16, every other I/O float32.

Numbers are compared on ONNX Runtime's CPU provider, which (1.32) has float16 kernels for GroupQueryAttention,
MatMulNBits, RotaryEmbedding, (Skip)SimplifiedLayerNormalization, SkipLayerNormalization and
LayerNormalization (checked from its profile below) and runs the rest (MatMul, Gemm, Conv, Add/Mul,
MultiHeadAttention, Gelu, ...) in float32 between float16 tensors, through casts it inserts itself: every
tensor between ops is still rounded to float16, as on the GPU, whose float16 GEMMs accumulate in float32.

Tolerance: float16's unit roundoff is u = 2^-11. The tiny model rounds its hidden state a few dozen times on
the way to the logits (4 layers, ~10 rounded tensors each), so a random-walk estimate of the relative error is
sqrt(40) u ~ 6u; measured: max |dlogit| <= 0.058 for |logit| <= 27 (~5u relative), vision outputs ~3u.
The bound is 16u (0.78%) of the float32 output's largest magnitude: ~3x the measurement, while a real
fault stays far outside it (the same decoder fed doubled positions -- a rotary bug -- is off by 22-63%).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.base import TargetCapabilities
from qvl.passes.float16_activations import FP16_MAX, Float16ActivationsPass, Float16Config
from qvl.toolchain.compile.targets import get_target

CUDA = get_target("cuda")
U = 2.0 ** -11  # float16 unit roundoff
TOL = 16 * U  # relative to the float32 output's largest magnitude (module docstring)
H, NQ, NKV, D, V = 64, 4, 2, 16, 96  # fixture: hidden, query / kv heads, head dim, vocab


# -- a decoder layer built in code: the fused ops the CPU pipeline leaves ------------------------------------


def _init(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def fixture_decoder(seed: int = 0) -> onnx.ModelProto:
    """One fused decoder layer + lm_head: rotary tables from integer positions, SimplifiedLayerNormalization,
    RotaryEmbedding, GroupQueryAttention with past/present, SkipSimplifiedLayerNormalization (its float32 mean /
    inv_std outputs annotated), an MLP with a bool->float Cast, a Constant and a ConstantOfShape, the tied
    Gemm lm_head."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    mk = helper.make_node
    nodes = [
        mk("Cast", ["position_ids"], ["pos_f"], to=T.FLOAT, name="pos_cast"),
        mk("Unsqueeze", ["pos_f", "ax_last"], ["pos_u"], name="pos_unsqueeze"),
        mk("Mul", ["pos_u", "inv_freq"], ["angles"], name="angles"),
        mk("Cos", ["angles"], ["cos"], name="cos"),
        mk("Sin", ["angles"], ["sin"], name="sin"),
        mk("Reshape", ["cos", "table_shape"], ["cos_cache"], name="cos_cache"),
        mk("Reshape", ["sin", "table_shape"], ["sin_cache"], name="sin_cache"),
        mk("Shape", ["position_ids"], ["pos_shape"], name="pos_shape"),
        mk("Gather", ["pos_shape", "one"], ["seq"], axis=0, name="seq"),
        mk("Range", ["zero", "seq", "one"], ["rope_range"], name="rope_range"),
        mk("Unsqueeze", ["rope_range", "ax0"], ["rope_ids"], name="rope_ids"),
        mk("SimplifiedLayerNormalization", ["inputs_embeds", "ln1"], ["x"], axis=-1, epsilon=1e-6, stash_type=1,
           name="ln1"),
        mk("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        mk("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        mk("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        mk("RotaryEmbedding", ["q", "rope_ids", "cos_cache", "sin_cache"], ["q_rot"], num_heads=NQ,
           domain="com.microsoft", name="rope_q"),
        mk("RotaryEmbedding", ["k", "rope_ids", "cos_cache", "sin_cache"], ["k_rot"], num_heads=NKV,
           domain="com.microsoft", name="rope_k"),
        mk("ReduceSum", ["attention_mask", "ax1"], ["mask_sum"], keepdims=0, name="mask_sum"),
        mk("Sub", ["mask_sum", "one"], ["seqlens_64"], name="seqlens_sub"),
        mk("Cast", ["seqlens_64"], ["seqlens_k"], to=T.INT32, name="seqlens_k"),
        mk("Shape", ["attention_mask"], ["mask_shape"], name="mask_shape"),
        mk("Gather", ["mask_shape", "one"], ["total_64"], axis=0, name="total"),
        mk("Cast", ["total_64"], ["total_len"], to=T.INT32, name="total_len"),
        mk("GroupQueryAttention", ["q_rot", "k_rot", "v", "past_key_0", "past_value_0", "seqlens_k", "total_len"],
           ["attn", "present_key_0", "present_value_0"], num_heads=NQ, kv_num_heads=NKV, domain="com.microsoft",
           name="gqa"),
        mk("MatMul", ["attn", "wo"], ["o"], name="o_proj"),
        mk("SkipSimplifiedLayerNormalization", ["o", "inputs_embeds", "ln2"], ["h", "h_mean", "h_inv_std", "resid"],
           epsilon=1e-6, domain="com.microsoft", name="ln2"),
        mk("MatMul", ["h", "w_up"], ["up"], name="up_proj"),
        mk("Greater", ["up", "zero_f"], ["up_pos"], name="up_pos"),
        mk("Cast", ["up_pos"], ["gate"], to=T.FLOAT, name="gate"),
        mk("Mul", ["up", "gate"], ["relu"], name="relu"),
        mk("Constant", [], ["half"], value_float=0.5, name="half"),
        mk("Mul", ["relu", "half"], ["scaled"], name="scaled"),
        mk("Shape", ["scaled"], ["scaled_shape"], name="scaled_shape"),
        mk("ConstantOfShape", ["scaled_shape"], ["quarter"], value=helper.make_tensor("v", T.FLOAT, [1], [0.25]),
           name="quarter"),
        mk("Add", ["scaled", "quarter"], ["shifted"], name="shifted"),
        mk("MatMul", ["shifted", "w_down"], ["down"], name="down_proj"),
        mk("Add", ["resid", "down"], ["y"], name="residual"),
        mk("SimplifiedLayerNormalization", ["y", "ln3"], ["final"], axis=-1, epsilon=1e-6, stash_type=1, name="ln3"),
        mk("Reshape", ["final", "flat_shape"], ["flat"], name="flat"),
        mk("Gemm", ["flat", "embed_tokens.weight"], ["scores"], transB=1, name="lm_head"),
        mk("Reshape", ["scores", "logits_shape"], ["logits"], name="logits"),
    ]
    inits = [
        _init("ax_last", np.array([-1], np.int64)), _init("ax0", np.array([0], np.int64)),
        _init("ax1", np.array([1], np.int64)), _init("one", np.array(1, np.int64)), _init("zero", np.array(0, np.int64)),
        _init("inv_freq", inv_freq), _init("table_shape", np.array([-1, D // 2], np.int64)),
        _init("ln1", 1 + 0.1 * rng.standard_normal(H).astype(np.float32)),
        _init("ln2", 1 + 0.1 * rng.standard_normal(H).astype(np.float32)),
        _init("ln3", 1 + 0.1 * rng.standard_normal(H).astype(np.float32)),
        _init("wq", w(H, NQ * D)), _init("wk", w(H, NKV * D)), _init("wv", w(H, NKV * D)), _init("wo", w(NQ * D, H)),
        _init("w_up", w(H, 2 * H)), _init("w_down", w(2 * H, H)), _init("zero_f", np.array(0.0, np.float32)),
        _init("embed_tokens.weight", rng.standard_normal((V, H)).astype(np.float32)),
        _init("flat_shape", np.array([-1, H], np.int64)), _init("logits_shape", np.array([1, -1, V], np.int64)),
    ]
    f32 = lambda name, shape: helper.make_tensor_value_info(name, T.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes, "decoder_layer",
        [f32("inputs_embeds", [1, "S", H]), helper.make_tensor_value_info("position_ids", T.INT64, [1, "S"]),
         helper.make_tensor_value_info("attention_mask", T.INT64, [1, "T"]),
         f32("past_key_0", [1, NKV, "P", D]), f32("past_value_0", [1, NKV, "P", D])],
        [f32("logits", [1, "S", V]), f32("present_key_0", [1, NKV, "T", D]), f32("present_value_0", [1, NKV, "T", D])],
        inits,
        value_info=[f32("h_mean", None), f32("h_inv_std", None), f32("x", [1, "S", H]), f32("q", [1, "S", NQ * D]),
                    f32("relu", [1, "S", 2 * H]), f32("cos_cache", [None, D // 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


FIXTURE_OPS = [n.op_type for n in fixture_decoder().graph.node]
CONVERTED_OPS = [
    "Cast",  # inputs_embeds -> float16 (the graph's first node)
    "Cast", "Unsqueeze", "Mul", "Cos", "Sin",  # the float32 rotary region ...
    "Reshape", "Cast", "Reshape", "Cast",  # ... its two tables, cast to float16 for RotaryEmbedding
    "Shape", "Gather", "Range", "Unsqueeze",
    "SimplifiedLayerNormalization", "MatMul", "MatMul", "MatMul", "RotaryEmbedding", "RotaryEmbedding",
    "ReduceSum", "Sub", "Cast", "Shape", "Gather", "Cast", "GroupQueryAttention", "MatMul",
    "SkipSimplifiedLayerNormalization", "MatMul", "Greater", "Cast", "Mul", "Constant", "Mul", "Shape",
    "ConstantOfShape", "Add", "MatMul", "Add", "SimplifiedLayerNormalization", "Reshape",
]


def _expected_fixture_ops(fp32_lm_head: bool) -> list[str]:
    if fp32_lm_head:  # the final hidden state -> float32, then the float32 lm_head region
        return [*CONVERTED_OPS, "Cast", "Gemm", "Reshape"]
    return [*CONVERTED_OPS, "Gemm", "Reshape", "Cast"]  # float16 logits -> float32 at the output


def _check(model: ir.Model) -> onnx.ModelProto:
    """onnx's full checker; ORT's SimplifiedLayerNormalization is registered under the ONNX domain, where onnx has
    no schema for it, so the checked copy files it under com.microsoft (checked as a contrib op)."""
    proto = ir.to_proto(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for n in copy.graph.node:
        if n.op_type == "SimplifiedLayerNormalization":
            n.domain = "com.microsoft"
    onnx.checker.check_model(copy, full_check=True)
    return proto


def _session(model, profile_prefix: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _io_types(sess: ort.InferenceSession) -> dict:
    return {v.name: v.type for v in (*sess.get_inputs(), *sess.get_outputs())}


def _fixture_decode(sess, dtype, start: int = 0):
    """Prefill 5 tokens then 2 single-token steps at positions start.., present fed back as past; the logits."""
    rng = np.random.default_rng(0)
    past = [np.zeros((1, NKV, 0, D), dtype)] * 2
    length, out = 0, []
    for seq in (5, 1, 1):
        feeds = {"inputs_embeds": rng.standard_normal((1, seq, H)).astype(np.float32),
                 "position_ids": np.arange(start + length, start + length + seq, dtype=np.int64)[None],
                 "attention_mask": np.ones((1, length + seq), np.int64), "past_key_0": past[0], "past_value_0": past[1]}
        logits, *past = sess.run(None, feeds)
        out.append(logits)
        length += seq
    return out, past


# -- the fixture: exact ops, I/O, numbers --------------------------------------------------------------------


@pytest.mark.parametrize("fp32_lm_head", [True, False])
def test_fixture_exact_ops_io_and_numbers(fp32_lm_head):
    model = ir.serde.deserialize_model(fixture_decoder())
    result = Float16ActivationsPass(Float16Config(fp32_lm_head=fp32_lm_head), target=CUDA, graph="decoder")(model)
    r = result.report
    assert result.modified
    assert [n.op_type for n in model.graph] == _expected_fixture_ops(fp32_lm_head)
    assert r.counts == {
        "initializers_converted": 10 + (0 if fp32_lm_head else 1),  # ln1-3, 6 weights, zero_f (+ embedding)
        "constants_converted": 1, "attributes_rewritten": 1, "casts_rewritten": 1,
        "casts_inserted": 4, "values_retyped": 7 + (0 if fp32_lm_head else 1), "io_float16": 4,
        "nodes_converted": 21 + (0 if fp32_lm_head else 2),  # 6 MatMul, 3 norms, 2 rotary, GQA, 8 MLP ops, Reshape
    }
    g = model.graph
    inits = g.initializers
    assert inits["inv_freq"].const_value.dtype == ir.DataType.FLOAT  # read only by the float32 rotary region
    assert inits["wq"].const_value.dtype == ir.DataType.FLOAT16 and inits["ln1"].dtype == ir.DataType.FLOAT16
    assert {inits[n].dtype for n in ("one", "zero", "ax1", "table_shape")} == {ir.DataType.INT64}
    emb_dtype = ir.DataType.FLOAT if fp32_lm_head else ir.DataType.FLOAT16
    assert inits["embed_tokens.weight"].const_value.dtype == emb_dtype
    node = {n.name: n for n in g}
    assert node["pos_cast"].attributes["to"].value == ir.DataType.FLOAT  # integer positions: float32 region
    assert node["gate"].attributes["to"].value == ir.DataType.FLOAT16  # bool -> float: rewritten
    assert node["half"].attributes["value"].value.dtype == ir.DataType.FLOAT16
    assert node["quarter"].attributes["value"].value.numpy().tolist() == [0.25]
    assert node["quarter"].attributes["value"].value.dtype == ir.DataType.FLOAT16
    # the norms' mean / inv_std_var are U = float whatever T is (h / resid are unannotated: ORT infers them)
    assert [v.dtype for v in node["ln2"].outputs] == [None, ir.DataType.FLOAT, ir.DataType.FLOAT, None]
    assert node["ln1"].outputs[0].dtype == node["q_proj"].outputs[0].dtype == ir.DataType.FLOAT16  # annotated
    # rotary tables: float32 up to their Reshapes, cast to float16 where RotaryEmbedding reads them
    rope = node["rope_q"]
    assert [v.producer().op_type for v in rope.inputs[2:]] == ["Cast", "Cast"]
    assert [v.producer().inputs[0].name for v in rope.inputs[2:]] == ["cos_cache", "sin_cache"]
    assert g.node(0).inputs[0].name == "inputs_embeds" and g.node(0).outputs[0].dtype == ir.DataType.FLOAT16
    head_in = node["lm_head"].inputs[0]
    assert (head_in.producer().op_type, head_in.dtype) == (("Cast", ir.DataType.FLOAT) if fp32_lm_head else ("Reshape", None))
    reasons = [s.reason for s in r.skipped]
    assert any(s.startswith("rotary table computed from integer positions stays float32") for s in reasons)
    assert any(s.startswith("lm_head stays float32") for s in reasons) == fp32_lm_head
    assert list(r.details["float32_nodes"].values()) == [
        ["pos_cast", "pos_unsqueeze", "angles", "cos", "sin", "cos_cache", "sin_cache"],
        *([["lm_head", "logits"]] if fp32_lm_head else [])]
    if not fp32_lm_head:
        assert r.details["embedding"]["dtype"] == "float16"
    assert r.details["bytes_after"] * 2 == r.details["bytes_before"]

    proto = _check(model)
    fp16, fp32 = _session(proto), _session(fixture_decoder())
    io = {"inputs_embeds": "tensor(float)", "position_ids": "tensor(int64)", "attention_mask": "tensor(int64)",
          "past_key_0": "tensor(float16)", "past_value_0": "tensor(float16)", "logits": "tensor(float)",
          "present_key_0": "tensor(float16)", "present_value_0": "tensor(float16)"}
    assert _io_types(fp16) == io
    for start in (0, 1500):  # near the start and the end of a 2048 context
        got, cache16 = _fixture_decode(fp16, np.float16, start)
        ref, cache32 = _fixture_decode(fp32, np.float32, start)
        for a, b in zip(got, ref):
            assert np.isfinite(a).all() and a.dtype == np.float32
            assert np.abs(a - b).max() <= TOL * np.abs(b).max(), (start, np.abs(a - b).max(), np.abs(b).max())
        for a, b in zip(cache16, cache32):
            assert a.dtype == np.float16 and np.abs(a.astype(np.float32) - b).max() <= TOL * np.abs(b).max()


def test_fixture_is_idempotent():
    model = ir.serde.deserialize_model(fixture_decoder())
    first = Float16ActivationsPass(target=CUDA, graph="decoder")(model)
    ops = [(n.op_type, n.name) for n in model.graph]
    dtypes = {n: v.dtype for n, v in model.graph.initializers.items()}
    again = Float16ActivationsPass(target=CUDA, graph="decoder")(model)
    assert first.modified and not again.modified
    assert set(again.report.counts.values()) == {0}
    assert again.report.details["already_float16"] is True
    assert again.report.skipped[-1].reason == "already computes in float16 (an earlier run): nothing changed"
    assert [(n.op_type, n.name) for n in model.graph] == ops
    assert {n: v.dtype for n, v in model.graph.initializers.items()} == dtypes
    _check(model)


@pytest.mark.parametrize("target", ["cpu-avx2", "cuda-sm61", "sm61"])
def test_float32_targets_are_skipped_with_reason(target):
    caps = get_target(target)
    model = ir.serde.deserialize_model(fixture_decoder())
    result = Float16ActivationsPass(target=caps, graph="decoder")(model)
    assert not result.modified and set(result.report.counts.values()) == {0}
    assert [(s.where, s.reason) for s in result.report.skipped] == [(
        "decoder", f"target {target} computes activations in float32 (activation_dtype='float32'); float16 "
                   "activations are for targets with activation_dtype='float16' (ORT CUDA, SM 7.5+)")]
    assert [n.op_type for n in model.graph] == FIXTURE_OPS
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT, ir.DataType.INT64}
    # a target reading the new fields decides, not its name
    fp16_caps = TargetCapabilities("my-gpu", ("float32", "float16"), ort_contrib_ops=True, activation_dtype="float16")
    assert Float16ActivationsPass(target=fp16_caps, graph="decoder")(model).modified


def test_graph_not_configured_is_skipped():
    model = ir.serde.deserialize_model(fixture_decoder())
    r = Float16ActivationsPass(Float16Config(graphs=("vision",)), target=CUDA, graph="decoder")(model).report
    assert r.skipped[0].reason == "graph not configured for float16 activations"
    assert [n.op_type for n in model.graph] == FIXTURE_OPS


def test_rotary_tables_need_float32():
    """Why the rotary region stays float32, measured: cos(position * inv_freq) with the angles in float32 then
    rounded to float16 vs the angles in float16, against float64, over the tiny model's context (2048) and the
    published model's (262144)."""
    inv_freq = (1.0 / 5_000_000 ** (np.arange(0, 32, 2) / 32)).astype(np.float32)  # tiny Qwen3-VL: theta 5e6, D 32
    for context, fp16_angle_error in ((2048, 0.2), (262144, 1.9)):
        pos = np.arange(context)
        exact = np.cos(pos[:, None] * inv_freq.astype(np.float64))
        fp32_tables = np.cos(pos[:, None].astype(np.float32) * inv_freq).astype(np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            fp16_tables = np.cos((pos[:, None].astype(np.float16) * inv_freq.astype(np.float16)).astype(np.float32))
        fp32_error = np.abs(fp32_tables - exact).max()
        # float32 angles: float16 rounding of the table (<= 2^-12) plus float32's own angle error at large positions
        assert fp32_error <= (3e-4 if context == 2048 else 5e-3), fp32_error
        assert np.nanmax(np.abs(fp16_tables - exact)) >= fp16_angle_error
        first_inf = pos[~np.isfinite(fp16_tables).all(axis=1)]
        assert (first_inf[0] == 65520) if context > 65520 else first_inf.size == 0
    assert np.abs(inv_freq.astype(np.float16) / inv_freq - 1).max() > 0.02  # subnormal float16 inv_freq


def test_saturation_instead_of_inf():
    inits = [_init("big", np.array([-3.4e38, 1e5, 70000.0, 1.0, 1e-9], np.float32))]
    x = helper.make_tensor_value_info("x", T.FLOAT, [5])
    y = helper.make_tensor_value_info("y", T.FLOAT, [5])
    graph = helper.make_graph([helper.make_node("Add", ["x", "big"], ["y"], name="add")], "g", [x], [y], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    r = Float16ActivationsPass(target=CUDA, graph="vision")(model).report
    assert r.details["saturated"] == {"big": 3} and r.details["flushed_to_zero"] == {"big": 1}
    assert model.graph.initializers["big"].const_value.numpy().tolist() == [-FP16_MAX, FP16_MAX, FP16_MAX, 1.0, 0.0]
    assert [n.op_type for n in model.graph] == ["Cast", "Add", "Cast"]  # one Cast at each float32 boundary
    out = _session(_check(model)).run(None, {"x": np.zeros(5, np.float32)})[0]
    assert np.isfinite(out).all() and out.dtype == np.float32


def test_cast_ending_at_a_float32_output_stays_the_boundary():
    x = helper.make_tensor_value_info("x", T.FLOAT, [3])
    y = helper.make_tensor_value_info("y", T.FLOAT, [3])
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"), helper.make_node("Cast", ["m"], ["y"], to=T.FLOAT, name="out")]
    graph = helper.make_graph(nodes, "g", [x], [y], [_init("c", np.full(3, 2.0, np.float32))])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    r = Float16ActivationsPass(target=CUDA, graph="vision")(model).report
    assert [(n.op_type, n.attributes["to"].value if n.op_type == "Cast" else None) for n in model.graph] == [
        ("Cast", ir.DataType.FLOAT16), ("Mul", None), ("Cast", ir.DataType.FLOAT)]
    assert r.counts["casts_rewritten"] == 0 and r.counts["casts_inserted"] == 1
    out = _session(_check(model)).run(None, {"x": np.array([1, 2, 3], np.float32)})[0]
    assert out.dtype == np.float32 and out.tolist() == [2, 4, 6]


# -- the tiny artifact, compiled with the CPU fusions -------------------------------------------------------


def _load(artifact, name: str) -> ir.Model:
    """A graph of the artifact with its weights in memory (so a session can be built from the bytes)."""
    model = ir.load(str(artifact / f"{name}.onnx"))
    for v in model.graph.initializers.values():
        v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
    return model


def _decode(sess, dtype, embedding, steps, deepstack, capacity: int = 32, layers: int = 4, kv_heads: int = 2,
            head_dim: int = 32):
    """The runtime's shared-buffer loop (runtime/backends/ort.py): one [1, kv, capacity, d] buffer per layer and
    K/V, bound through io_binding as both past and present; a prefill, then single-token steps."""
    arrays = [np.zeros((1, kv_heads, capacity, head_dim), dtype) for _ in range(2 * layers)]  # kept alive: the
    buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # OrtValues share their memory
    length, logits = 0, []
    for k, ids in enumerate(steps):
        seq = len(ids)
        feeds = {"inputs_embeds": embedding[ids][None].astype(np.float32),
                 "position_ids": np.broadcast_to(np.arange(length, length + seq)[None, None], (3, 1, seq)).copy(),
                 "attention_mask": np.ones((1, length + seq), np.int64),
                 "deepstack_embeds": np.ascontiguousarray(deepstack[:, :, :seq] if k == 0
                                                          else np.zeros((3, 1, seq, embedding.shape[1]), np.float32)),
                 "logit_positions": np.array([seq - 1], np.int64)}
        io = sess.io_binding()
        io.bind_output("logits")
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"past_{kind}_{i}", buffers[2 * i + j])
                io.bind_ortvalue_output(f"present_{kind}_{i}", buffers[2 * i + j])
        sess.run_with_iobinding(io)
        logits.append(io.get_outputs()[0].numpy()[0, -1].copy())
        length += seq
    return logits, [a[:, :, :length] for a in arrays]


def _kernel_input_types(sess) -> dict:
    """{(op, node name): input element types} that ORT's CPU kernels actually received (from a profile)."""
    events = json.load(open(sess.end_profiling()))
    seen = collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            seen[e["args"]["op_name"], node].update(next(iter(t)) for t in e["args"].get("input_type_shape", []))
    return seen


def _ran_in_float16(seen, op: str) -> bool:
    return any("float16" in types for (o, _), types in seen.items() if o == op)


def _ran_in_float32(seen, report) -> list[str]:
    """Ops ORT's CPU ran on float32 inputs through its own casts (outside the pass's float32 regions)."""
    region = {n for names in report.details["float32_nodes"].values() for n in names}
    return sorted({op for (op, node), types in seen.items()
                   if "float" in types and "float16" not in types and op not in ("Cast", "Shape") and node not in region})


@pytest.fixture(scope="module")
def tiny(tiny_cpu_artifact):
    m = json.loads((tiny_cpu_artifact / "manifest.json").read_text())["model"]
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"]) == (4, 2, 32)
    return tiny_cpu_artifact


@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_tiny_decoder_float16_vs_float32(weights, tiny, tmp_path, record_property):
    from qvl.passes.precision import PrecisionConfig, PrecisionPass

    ref, model = _load(tiny, "decoder"), _load(tiny, "decoder")
    embedding = ref.graph.initializers["embed_tokens.weight"].const_value.numpy()
    if weights == "int4":  # the weights stage first; accuracy_level 0: the float32 reference must not quantize A
        for m in (ref, model):
            PrecisionPass(PrecisionConfig(weight_bits=4, block_size=32, accuracy_level=0), target=get_target("cpu"),
                          graph="decoder")(m)
    packed_before = {n: v.const_value.tobytes() for n, v in model.graph.initializers.items() if v.dtype == ir.DataType.UINT8}
    ops_before = collections.Counter(n.op_type for n in model.graph)
    r = Float16ActivationsPass(target=CUDA, graph="decoder")(model).report

    # ops: the same plus the boundary Casts (inputs_embeds, deepstack_embeds, the two rotary tables, the lm_head input)
    assert collections.Counter(n.op_type for n in model.graph) == ops_before + collections.Counter(Cast=5)
    assert r.counts["casts_inserted"] == 5 and r.counts["io_float16"] == 16 and r.counts["casts_rewritten"] == 0
    assert not r.details["sorted"]
    lm_head = next(o for o in model.graph.outputs if o.name == "logits").producer().inputs[0].producer()  # Reshape <- it
    assert lm_head.op_type in ("Gemm", "MatMulNBits")
    assert [s.where for s in r.skipped] == ["node__to_copy", lm_head.name]  # rotary region, lm_head
    g = model.graph
    assert {n: v.const_value.tobytes() for n, v in g.initializers.items() if v.dtype == ir.DataType.UINT8} == packed_before
    for node in g:
        if node.op_type == "MatMulNBits":
            lm_head = node.metadata_props.get("qvl.layer") == "decoder.lm_head"
            want = ir.DataType.FLOAT if lm_head else ir.DataType.FLOAT16
            assert node.inputs[0].dtype == want and node.inputs[2].const_value.dtype == want  # A and scales
            assert node.inputs[1].dtype == ir.DataType.UINT8
    assert {v.dtype for v in g.initializers.values()} <= {ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.INT64,
                                                           ir.DataType.UINT8}
    float32_inits = {n for n, v in g.initializers.items() if v.dtype == ir.DataType.FLOAT}
    assert float32_inits == ({"lm.rotary_emb.inv_freq", "embed_tokens.weight"} if weights == "dense"
                             else {"lm.rotary_emb.inv_freq", "embed_tokens.weight.scales"})

    fp16 = _session(_check(model), profile_prefix=str(tmp_path / "profile"))
    fp32 = _session(ref)
    types = _io_types(fp16)
    kv = {f"{p}_{kind}_{i}" for p in ("past", "present") for kind in ("key", "value") for i in range(4)}
    assert {n for n, t in types.items() if t == "tensor(float16)"} == kv
    assert types["inputs_embeds"] == types["deepstack_embeds"] == types["logits"] == "tensor(float)"

    rng = np.random.default_rng(0)
    steps = [rng.integers(0, len(embedding), 7)] + [rng.integers(0, len(embedding), 1) for _ in range(5)]
    deepstack = (rng.standard_normal((3, 1, 7, embedding.shape[1])) * np.abs(embedding).mean()).astype(np.float32)
    got, cache16 = _decode(fp16, np.float16, embedding, steps, deepstack)
    want, cache32 = _decode(fp32, np.float32, embedding, steps, deepstack)
    diffs = []
    for a, b in zip(got, want):
        assert np.isfinite(a).all()
        diffs.append(float(np.abs(a - b).max()))
        assert diffs[-1] <= TOL * np.abs(b).max(), (diffs[-1], np.abs(b).max())
        top2 = np.sort(b)[-2:]
        if top2[1] - top2[0] > 2 * TOL * np.abs(b).max():  # a clear winner stays the winner
            assert a.argmax() == b.argmax()
    for a, b in zip(cache16, cache32):
        assert a.dtype == np.float16 and np.abs(a.astype(np.float32) - b).max() <= TOL * np.abs(b).max()
    record_property(f"max_dlogit_{weights}", max(diffs))
    print(f"\n{weights}: max |dlogit| fp16 vs fp32 per step {[round(d, 4) for d in diffs]} "
          f"(max |logit| {max(np.abs(b).max() for b in want):.2f})")

    # ORT CPU ran the fused ops in float16 (the rest in float32 between float16 tensors: module docstring)
    seen = _kernel_input_types(fp16)
    fused = ["GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"]
    for op in fused + (["MatMulNBits"] if weights == "int4" else []):
        assert _ran_in_float16(seen, op), op
    print("ORT CPU ran in float32 through its own casts:", _ran_in_float32(seen, r))

    again = Float16ActivationsPass(target=CUDA, graph="decoder")(model)
    assert not again.modified and again.report.details["already_float16"]


def test_tiny_rotary_tables_at_the_end_of_the_context(tiny):
    """The cos/sin tables RotaryEmbedding reads, float16 graph vs float32 graph, at positions 2040..2047: float16
    rounding of a [-1, 1] value (<= 2^-12) and nothing more."""
    ref, model = _load(tiny, "decoder"), _load(tiny, "decoder")
    Float16ActivationsPass(target=CUDA, graph="decoder")(model)
    for m in (ref, model):
        rope = next(n for n in m.graph if n.op_type == "RotaryEmbedding")
        for v in rope.inputs[2:]:
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
            m.graph.outputs.append(v)
    feeds = {"inputs_embeds": np.zeros((1, 8, 64), np.float32),
             "position_ids": np.broadcast_to(np.arange(2040, 2048)[None, None], (3, 1, 8)).copy(),
             "attention_mask": np.ones((1, 8), np.int64), "deepstack_embeds": np.zeros((3, 1, 8, 64), np.float32),
             "logit_positions": np.array([7], np.int64)}
    for kind in ("key", "value"):
        for i in range(4):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, 2, 0, 32), np.float32)
    got = _session(model).run(None, {k: v.astype(np.float16) if k.startswith("past") else v for k, v in feeds.items()})
    want = _session(ref).run(None, feeds)
    for a, b in zip(got[-2:], want[-2:]):
        assert a.dtype == np.float16 and b.dtype == np.float32 and a.shape == b.shape == (8, 16)
        assert np.abs(a.astype(np.float64) - b).max() <= 2.0 ** -12


def test_tiny_vision_float16_vs_float32(tiny, tmp_path):
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.vision_tables import vision_tables

    ref, model = _load(tiny, "vision"), _load(tiny, "vision")
    ops_before = collections.Counter(n.op_type for n in model.graph)
    r = Float16ActivationsPass(target=CUDA, graph="vision")(model).report
    assert collections.Counter(n.op_type for n in model.graph) == ops_before + collections.Counter(Cast=8)  # 4 inputs, 4 outputs
    assert r.counts["io_float16"] == 0 and r.skipped == []
    assert r.details["sorted"]  # the vision fusions leave nodes out of topological order: sorted (stably)
    # one attention segment per vision call: no finfo(float32).min mask constant left to saturate
    # (test_saturation_instead_of_inf covers saturation of such constants)
    assert r.details["saturated"] == {}
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT16, ir.DataType.INT64}

    fp16 = _session(_check(model), profile_prefix=str(tmp_path / "vprofile"))
    fp32 = _session(ref)
    assert _io_types(fp16) == _io_types(fp32)  # every vision input and output stays float32
    grid = np.array([[1, 4, 6]])  # one vision call: one attention segment
    tables = vision_tables(grid, read_manifest(tiny).source.vision_config)
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": rng.standard_normal((int(grid.prod(1).sum()), 1536)).astype(np.float32),
             "pos_interp_indices": tables["interp_indices"], "pos_interp_weights": tables["interp_weights"],
             "rotary_cos": tables["cos"], "rotary_sin": tables["sin"]}
    for name, a, b in zip([o.name for o in fp32.get_outputs()], fp16.run(None, feeds), fp32.run(None, feeds)):
        assert np.isfinite(a).all() and a.dtype == np.float32
        assert np.abs(a - b).max() <= TOL * np.abs(b).max(), (name, np.abs(a - b).max(), np.abs(b).max())
    seen = _kernel_input_types(fp16)
    for op in ("SkipLayerNormalization", "LayerNormalization"):
        assert _ran_in_float16(seen, op), op
    print("\nvision: ORT CPU ran in float32 through its own casts:", _ran_in_float32(seen, r))
    assert not Float16ActivationsPass(target=CUDA, graph="vision")(model).modified
