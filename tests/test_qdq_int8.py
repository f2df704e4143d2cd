"""Explicit INT8 Q/DQ pass (SmoothQuant, calibrated activations, per-channel weights) on graphs built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qvl.passes.qdq_int8 import (
    QdqInt8Config,
    QdqInt8Pass,
    activation_scale,
    quantize_weight,
    smoothing_factors,
    weight_scales,
)
from qvl.toolchain.quant.calibration import calibrate_model
from qvl.toolchain.compile.targets import get_target

SM61 = get_target("sm61")
H, F, V = 32, 48, 40  # hidden, MLP width, vocab of the fixture graph

# After the pass: q/k/v share one activation Q/DQ after the RMSNorm-style Mul (1/s folded into its weight);
# o_proj reads a Relu (no constant to fold into): explicit Mul(1/s); the LayerNorm -> Gemm(bias) site folds
# 1/s into the LayerNorm scale and bias; Gemm(transB=1) reads a Relu: Mul; the attention-style MatMul of two
# activations and the tied lm_head are untouched.
EXPECTED_OPS = [
    "Tanh", "Mul",
    "QuantizeLinear", "DequantizeLinear",  # shared activation Q/DQ of q/k/v
    "QuantizeLinear", "DequantizeLinear", "MatMul",  # q
    "QuantizeLinear", "DequantizeLinear", "MatMul",  # k
    "QuantizeLinear", "DequantizeLinear", "MatMul",  # v
    "Add", "Add", "Relu",
    "Mul", "QuantizeLinear", "DequantizeLinear",  # o_proj smoothing Mul + activation Q/DQ
    "QuantizeLinear", "DequantizeLinear", "MatMul",  # o_proj
    "Add", "Transpose", "MatMul",  # attention-style: activation x activation, not a linear layer
    "Reshape", "LayerNormalization",
    "QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Gemm",  # fc1 (bias)
    "Relu",
    "Mul", "QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Gemm",  # fc2 (transB=1)
    "Gemm",  # lm_head stays fp32
]


def _init(inits: list, name: str, array: np.ndarray) -> ir.Value:
    dtype = {np.float32: ir.DataType.FLOAT, np.int64: ir.DataType.INT64}[array.dtype.type]
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=ir.tensor(array, name=name))
    inits.append(v)
    return v


def _scoped(node: ir.Node, scope: str) -> ir.Node:
    node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", scope, "linear"])
    return node


def fixture_model(seed: int = 0, opset: int = 17) -> ir.Model:
    rng = np.random.default_rng(seed)
    inits: list[ir.Value] = []
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", H]), type=ir.TensorType(ir.DataType.FLOAT))

    def w(name, shape, outlier=False):
        a = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return _init(inits, name, a)

    gamma = _init(inits, "norm.weight", (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    wq, wk, wv, wo = w("val_1", (H, H)), w("val_2", (H, H)), w("val_3", (H, H)), w("val_4", (H, H))
    ln_s = _init(inits, "ln.weight", (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    ln_b = _init(inits, "ln.bias", (0.1 * rng.standard_normal(H)).astype(np.float32))
    w1, b1 = w("visual.blocks.0.mlp.linear_fc1.weight", (H, F)), _init(inits, "visual.blocks.0.mlp.linear_fc1.bias", (0.1 * rng.standard_normal(F)).astype(np.float32))
    w2 = _init(inits, "visual.blocks.0.mlp.linear_fc2.weight", (rng.standard_normal((H, F)) / np.sqrt(F)).astype(np.float32))  # [N, K]
    emb = _init(inits, "embed_tokens.weight", rng.standard_normal((V, H)).astype(np.float32))
    shape2d = _init(inits, "shape2d", np.array([-1, H], dtype=np.int64))

    nodes = []

    def add(node):
        nodes.append(node)
        return node.outputs[0]

    xh = add(ir.Node("", "Tanh", [x], name="node_tanh"))
    normed = add(ir.Node("", "Mul", [gamma, xh], name="node_norm"))  # RMSNorm weight * normalized x
    q = add(_scoped(ir.Node("", "MatMul", [normed, wq], name="node_q"), "lm.layers.0.self_attn.q_proj"))
    k = add(_scoped(ir.Node("", "MatMul", [normed, wk], name="node_k"), "lm.layers.0.self_attn.k_proj"))
    v = add(_scoped(ir.Node("", "MatMul", [normed, wv], name="node_v"), "lm.layers.0.self_attn.v_proj"))
    qk = add(ir.Node("", "Add", [q, k], name="node_add_qk"))
    qkv = add(ir.Node("", "Add", [qk, v], name="node_add_qkv"))
    r = add(ir.Node("", "Relu", [qkv], name="node_relu"))
    o = add(_scoped(ir.Node("", "MatMul", [r, wo], name="node_o"), "lm.layers.0.self_attn.o_proj"))
    h = add(ir.Node("", "Add", [x, o], name="node_res"))
    kt = add(ir.Node("", "Transpose", [h], attributes=[ir.AttrInt64s("perm", [0, 2, 1])], name="node_kt"))
    scores = add(ir.Node("", "MatMul", [kt, h], name="node_scores"))  # [b, H, H]: activation x activation
    flat = add(ir.Node("", "Reshape", [h, shape2d], name="node_flat"))
    ln = add(ir.Node("", "LayerNormalization", [flat, ln_s, ln_b], attributes=[ir.AttrInt64("axis", -1)], name="node_ln"))
    g1 = add(ir.Node("", "Gemm", [ln, w1, b1], name="node_fc1"))
    g1r = add(ir.Node("", "Relu", [g1], name="node_relu2"))
    g2 = add(ir.Node("", "Gemm", [g1r, w2], attributes=[ir.AttrInt64("transB", 1)], name="node_fc2"))
    head = add(ir.Node("", "Gemm", [g2, emb], attributes=[ir.AttrInt64("transB", 1)], name="node_lm_head"))
    head.name, scores.name = "logits", "scores"
    for value, name in ((normed, "normed"), (r, "relu"), (ln, "ln"), (g1r, "relu2"), (g2, "fc2_out")):
        value.name = name
    for out, shape in ((head, ["rows", V]), (scores, ["batch", H, H])):
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
    graph = ir.Graph([x], [head, scores], nodes=nodes, initializers=inits, opset_imports={"": opset}, name="fixture")
    return ir.Model(graph, ir_version=8)


def _feeds(seed: int, n: int = 4):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.standard_normal((1, 5 + i, H)).astype(np.float32)
        x[..., 3] *= 8.0  # an outlier channel: what SmoothQuant migrates into the weights
        out.append({"x": x})
    return out


def _stats(model: ir.Model, graph: str = "decoder") -> dict:
    return calibrate_model(model, graph, _feeds(1))


def _session(model: ir.Model, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, optimize=True):
    return _session(model, optimize).run(None, {"x": x})


# -- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_format", ["float_qdq", "int8"])
def test_exact_op_list_counts_and_layers(weight_format):
    model = fixture_model()
    stats = _stats(model)
    # one entry per activation read by a linear layer (q/k/v share one; the lm_head's input is measured too)
    assert sorted(stats) == ["decoder/fc2_out", "decoder/ln", "decoder/normed", "decoder/relu", "decoder/relu2"]
    assert all(v.shape == (F if k.endswith("relu2") else H,) and v.dtype == np.float32 for k, v in stats.items())
    r = QdqInt8Pass(QdqInt8Config(stats, weight_format=weight_format), target=SM61, graph="decoder")(model).report
    ops = [n.op_type for n in model.graph]
    expected = EXPECTED_OPS if weight_format == "float_qdq" else _without_weight_q(EXPECTED_OPS)
    assert ops == expected, ops
    assert r.counts == {"quantized": 6, "from_matmul": 4, "from_gemm": 2, "activation_qdq": 4,
                        "smoothing_folded": 2, "smoothing_mul": 2}
    assert [(s.where, s.reason.split(":")[0]) for s in r.skipped] == [("node_lm_head", "decoder.lm_head")]
    assert "runtime's fp32 embedding table" in r.skipped[0].reason
    layers = r.details["layers"]
    assert layers["decoder.layers.0"]["nodes"] == ["node_q", "node_k", "node_v", "node_o"]
    assert layers["decoder.blocks.0"]["nodes"] == ["node_fc1", "node_fc2"]
    assert layers["decoder.lm_head"]["decision"] == "fp32"
    # Per-channel weight Q/DQ on the N axis of the stored layout; every zero point int8 0; no fp16 anywhere.
    axes = {n.name: n.attributes["axis"].value for n in model.graph if n.op_type == "DequantizeLinear" and "axis" in n.attributes}
    assert axes == {"node_q/w_dq": 1, "node_k/w_dq": 1, "node_v/w_dq": 1, "node_o/w_dq": 1, "node_fc1/w_dq": 1, "node_fc2/w_dq": 0}
    for n in model.graph:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = n.inputs[2].const_value.numpy()
            assert zp.dtype == np.int8 and not zp.any()
    dtypes = {v.dtype for v in model.graph.initializers.values()}
    assert dtypes <= {ir.DataType.FLOAT, ir.DataType.INT8, ir.DataType.INT64}
    # 1/s folded into new constants; the original (possibly shared) ones are left as they were.
    norm = next(n for n in model.graph if n.name == "node_norm")
    assert norm.inputs[0].name == "norm.weight.smooth" and "norm.weight" not in model.graph.initializers
    lnode = next(n for n in model.graph if n.name == "node_ln")
    assert [v.name for v in lnode.inputs[1:]] == ["ln.weight.smooth", "ln.bias.smooth"]
    # Checker-valid at opset 17 (the sm61 ceiling) with no non-standard domain.
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17}


def _without_weight_q(ops: list[str]) -> list[str]:
    """int8 weight format: the weight QuantizeLinear is gone (the codes are stored)."""
    out, i = [], 0
    while i < len(ops):
        # a weight pair is "QuantizeLinear, DequantizeLinear" directly followed by MatMul/Gemm or by another pair
        if ops[i] == "QuantizeLinear" and ops[i + 2] in ("MatMul", "Gemm") and ops[i + 1] == "DequantizeLinear":
            i += 1
            continue
        out.append(ops[i])
        i += 1
    return out


# -- numerics -------------------------------------------------------------------------------------


def _numpy_forward(model0: ir.Model, stats: dict, x: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """float64 reference of the fake-quantized graph from the fp32 weights and the calibration stats."""
    g = {k: v.const_value.numpy() for k, v in model0.graph.initializers.items()}

    def fq_act(a, key, ws):
        """smooth by s, quantize per tensor: returns (fake-quantized x/s, s)."""
        w_row = np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0)
        s = smoothing_factors(stats[key], w_row, alpha)
        sc = activation_scale(stats[key], s)
        xs = (a / s).astype(np.float32)
        return np.clip(np.rint(xs / sc), -128, 127).astype(np.float32) * sc, s

    def fq_w(w_kn, s):
        w2 = (w_kn * s[:, None]).astype(np.float32)
        sc = weight_scales(w2)
        return quantize_weight(w2, sc).astype(np.float32) * sc[None, :]

    keys = {k.split("/", 1)[1]: k for k in stats}
    x = x.astype(np.float32)
    normed = (g["norm.weight"] * np.tanh(x)).astype(np.float32)
    a, s = fq_act(normed, keys["normed"], [g["val_1"], g["val_2"], g["val_3"]])
    q, k, v = (a.astype(np.float64) @ fq_w(g[n], s) for n in ("val_1", "val_2", "val_3"))
    r = np.maximum(q + k + v, 0).astype(np.float32)
    a, s = fq_act(r, keys[_act_name(model0, "node_o")], [g["val_4"]])
    h = x + a.astype(np.float64) @ fq_w(g["val_4"], s)
    flat = h.reshape(-1, H)
    mu = flat.mean(-1, keepdims=True)
    ln = (flat - mu) / np.sqrt(((flat - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g["ln.weight"] + g["ln.bias"]
    w1 = g["visual.blocks.0.mlp.linear_fc1.weight"]
    a, s = fq_act(ln.astype(np.float32), keys[_act_name(model0, "node_fc1")], [w1])
    g1 = np.maximum(a.astype(np.float64) @ fq_w(w1, s) + g["visual.blocks.0.mlp.linear_fc1.bias"], 0).astype(np.float32)
    w2 = g["visual.blocks.0.mlp.linear_fc2.weight"].T  # [K, N]
    a, s = fq_act(g1, keys[_act_name(model0, "node_fc2")], [w2])
    g2 = a.astype(np.float64) @ fq_w(w2, s)
    return g2 @ g["embed_tokens.weight"].T.astype(np.float64)


def _act_name(model: ir.Model, node_name: str) -> str:
    return next(n for n in model.graph if n.name == node_name).inputs[0].name


@pytest.mark.parametrize("weight_format", ["float_qdq", "int8"])
def test_ort_matches_numpy_fake_quant_reference_and_stays_close_to_fp32(weight_format):
    fp32 = fixture_model(seed=2)
    stats = _stats(fp32)
    model = fixture_model(seed=2)
    QdqInt8Pass(QdqInt8Config(stats, weight_format=weight_format), target=SM61, graph="decoder")(model)
    x = _feeds(3, 1)[0]["x"] * 0.9  # inside the calibrated range
    got = _run(model, x, optimize=False)[0]
    ref = _numpy_forward(fp32, stats, x)
    exact = _run(fp32, x)[0]
    scale = float(np.abs(ref).max())
    # The only differences to the float64 reference of the same fake-quantized computation are float32
    # accumulation order and the LayerNorm/tanh ulps feeding one activation quantizer.
    assert np.abs(got - ref).max() <= 2e-3 * scale, (np.abs(got - ref).max(), scale)
    # INT8 W8A8 against fp32 on this toy: within a few percent of the output range.
    assert np.abs(got - exact).max() <= 0.06 * np.abs(exact).max(), np.abs(got - exact).max() / np.abs(exact).max()
    # All of ORT's graph optimizations except its QDQ fusions keep that computation (DQ -> fp32 GEMM: what
    # TensorRT's int32-accumulating INT8 GEMM computes, up to fp32 rounding).
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {"x": x})[0] - got).max() <= 1e-5 * scale
    # ORT's QDQ fusions (MatMulIntegerToFloat / QGemm) run U8S8 integer kernels that may saturate on AVX2
    # without VNNI (ONNX Runtime's quantization docs): measured here, not asserted against the reference.
    fused = np.abs(_run(model, x)[0] - got).max() / scale
    print(f"\nORT CPU fused QDQ kernels vs the fake-quantized reference: max |diff| {fused:.3g} of the output range")


def test_dequantized_tensors_equal_numpy_reference_exactly():
    """What the Q/DQ pairs compute -- the int8-rounded smoothed activation and weight -- equals numpy bit for bit."""
    fp32 = fixture_model(seed=4)
    stats = _stats(fp32)
    model = fixture_model(seed=4)
    QdqInt8Pass(QdqInt8Config(stats), target=SM61, graph="decoder")(model)
    names = {n.name: n for n in model.graph}
    # o_proj's input r = relu(q + k + v) (itself from the quantized q/k/v), and its two DQ outputs
    for v in (names["node_relu"].outputs[0], names["node_o/act_dq"].outputs[0], names["node_o/w_dq"].outputs[0]):
        model.graph.outputs.append(v)
    x = _feeds(5, 1)[0]["x"]
    rv, got_a, got_w = _run(model, x, optimize=False)[-3:]
    wo = fp32.graph.initializers["val_4"].const_value.numpy()
    key = "decoder/" + _act_name(fp32, "node_o")
    s = smoothing_factors(stats[key], np.abs(wo).max(axis=1), 0.5)
    sc = activation_scale(stats[key], s)
    xs = rv * (np.float32(1.0) / s)  # the inserted Mul multiplies by 1/s
    want_a = np.clip(np.rint(xs / sc), -128, 127).astype(np.float32) * sc
    w2 = (wo * s[:, None]).astype(np.float32)
    wsc = weight_scales(w2)
    want_w = quantize_weight(w2, wsc).astype(np.float32) * wsc[None, :]
    assert np.array_equal(got_a, want_a)
    assert np.array_equal(got_w, want_w)
    assert np.abs(np.rint(got_a / sc)).max() <= 127  # within the calibrated range: no saturation


def test_smoothing_is_exact_without_quantization_error():
    """x/s @ diag(s) W == x @ W: with alpha=0.5 the smoothed fp32 graph (Q/DQ removed) matches the original."""
    act = np.array([0.5, 8.0, 1.0, 0.0], np.float32)
    w = np.array([1.0, 0.25, 2.0, 3.0], np.float32)
    s = smoothing_factors(act, w, 0.5)
    assert np.allclose(s[:3], np.sqrt(act[:3]) / np.sqrt(w[:3])) and s[3] == 1.0  # zero activation: s = 1
    assert np.all(smoothing_factors(act, w, None) == 1.0)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    W = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    assert np.allclose((x / s) @ (s[:, None] * W), x @ W, rtol=1e-5, atol=1e-6)


# -- skips, idempotence, config -------------------------------------------------------------------


def test_keep_fp32_missing_stats_and_non_constant_weights_are_skipped_with_reasons():
    model = fixture_model()
    stats = dict(_stats(model))
    del stats["decoder/" + _act_name(model, "node_fc1")]
    stats["decoder/" + _act_name(model, "node_fc2")] = np.ones(3, np.float32)  # wrong length
    r = QdqInt8Pass(QdqInt8Config(stats, keep_fp32=frozenset({"decoder.layers.0"})), target=SM61, graph="decoder")(model).report
    reasons = {s.where: s.reason for s in r.skipped}
    assert reasons["node_q"] == "decoder.layers.0: keep_fp32 (decoder.layers.0)"
    assert reasons["node_o"] == "decoder.layers.0: keep_fp32 (decoder.layers.0)"
    assert reasons["node_fc1"].endswith(f"no calibration statistics for activation '{_act_name(model, 'node_fc1')}'")
    assert reasons["node_fc2"].endswith(f"calibration statistics of shape (3,) for K={F}")
    assert "node_scores" not in reasons  # activation x activation is not a linear layer at all
    assert r.counts["quantized"] == 0 and r.details["kept_fp32"] == 4
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
    assert r.details["layers"]["decoder.layers.0"]["decision"] == "fp32"


def test_partial_group_keeps_the_norm_and_inserts_a_mul():
    """If only some readers of a norm output are quantized, 1/s cannot go into the norm: an explicit Mul."""
    model = fixture_model()
    stats = _stats(model)
    r = QdqInt8Pass(QdqInt8Config(stats, keep_fp32=frozenset({"node_k"})), target=SM61, graph="decoder")(model).report
    assert r.counts["quantized"] == 5 and r.counts["smoothing_folded"] == 1 and r.counts["smoothing_mul"] == 3
    norm = next(n for n in model.graph if n.name == "node_norm")
    assert norm.inputs[0].name == "norm.weight"
    k = next(n for n in model.graph if n.name == "node_k")
    assert k.inputs[0] is norm.outputs[0] and k.inputs[1].name == "val_2"  # fp32 k_proj reads the unsmoothed norm


def test_idempotent():
    model = fixture_model()
    stats = _stats(model)
    first = QdqInt8Pass(QdqInt8Config(stats), target=SM61, graph="decoder")(model)
    ops = [(n.op_type, n.name) for n in model.graph]
    inits = sorted(model.graph.initializers)
    second = QdqInt8Pass(QdqInt8Config(stats), target=SM61, graph="decoder")(model)
    assert first.modified and not second.modified
    assert second.report.details["already_quantized"] == 6
    assert [(n.op_type, n.name) for n in model.graph] == ops and sorted(model.graph.initializers) == inits


def test_graph_and_target_gates():
    model = fixture_model()
    stats = _stats(model)
    r = QdqInt8Pass(QdqInt8Config(stats, graphs=("vision",)), target=SM61, graph="decoder")(model).report
    assert r.skipped[0].reason == "graph not configured for INT8 Q/DQ" and not r.counts["quantized"]
    r = QdqInt8Pass(QdqInt8Config(stats), target=SM61, graph="decoder")(fixture_model(opset=20)).report
    assert "opset 20 > the target's 17" in r.skipped[0].reason
    r = QdqInt8Pass(QdqInt8Config(stats), target=SM61, graph="decoder")(fixture_model(opset=11)).report
    assert "opset 11 < 13" in r.skipped[0].reason
    with pytest.raises(ValueError):
        QdqInt8Config(alpha=1.5)
    with pytest.raises(ValueError):
        QdqInt8Config(weight_format="fp16")


@pytest.fixture(scope="module")
def rtx():
    from qvl.errors import QvlError
    from qvl.toolchain.tensorrt.build import load_tensorrt

    try:
        return load_tensorrt("tensorrt-rtx")
    except QvlError as exc:
        pytest.skip(f"TensorRT-RTX not importable ({exc})")


@pytest.mark.parametrize("weight_format", ["float_qdq", "int8"])
def test_both_weight_forms_parse_and_build_with_tensorrt_rtx(weight_format, rtx, tmp_path):
    """TensorRT-RTX (CPU-only build) accepts fp32 W -> Q -> DQ (the TensorRT 8.x form) and int8 W -> DQ."""
    from qvl.toolchain.tensorrt.build import fp16_violations, int8_matmuls, parse_onnx

    model = fixture_model()
    QdqInt8Pass(QdqInt8Config(_stats(model), weight_format=weight_format), target=SM61, graph="decoder")(model)
    path = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(model), path)
    parsed = parse_onnx(rtx, path)
    n, problems = fp16_violations(rtx, parsed.network)
    assert problems == []
    check = int8_matmuls(rtx, parsed.network)
    # q, k, v, o, fc1, fc2 take INT8 operands; the activation x activation MatMul and the lm_head stay FP32
    assert check["matmuls"] == 8 and check["int8_matmuls"] == 6, check
    config = parsed.builder.create_builder_config()
    prof = parsed.builder.create_optimization_profile()
    prof.set_shape("x", [1, 1, H], [1, 4, H], [1, 8, H])
    config.add_optimization_profile(prof)
    assert parsed.builder.build_serialized_network(parsed.network, config) is not None, parsed.logger.errors()[-3:]


# -- the tied lm_head (include_lm_head, what the sm61 kit uses) ---------------------------------------


def test_lm_head_int8_reads_the_unchanged_embedding_table():
    fp32 = fixture_model(seed=6)
    stats = _stats(fp32)
    model = fixture_model(seed=6)
    r = QdqInt8Pass(QdqInt8Config(stats, include_lm_head=True), target=SM61, graph="decoder")(model).report
    ops = [n.op_type for n in model.graph]
    # activation Q/DQ (never smoothed: no Mul) + the table's own weight Q/DQ in front of the Gemm
    assert ops == EXPECTED_OPS[:-1] + ["QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Gemm"], ops
    assert r.skipped == [] and r.counts["quantized"] == 7 and r.counts["from_gemm"] == 3
    assert r.details["layers"]["decoder.lm_head"]["decision"] == "int8"
    names = {n.name: n for n in model.graph}
    wq = names["node_lm_head/w_q"]
    # the Q/DQ reads the embedding initializer itself, bit-identical to the checkpoint's: the runtime's
    # host-side lookup keeps working on it, and nothing is duplicated in the weight store
    assert wq.inputs[0] is model.graph.initializers["embed_tokens.weight"]
    assert np.array_equal(wq.inputs[0].const_value.numpy(), fp32.graph.initializers["embed_tokens.weight"].const_value.numpy())
    assert wq.attributes["axis"].value == 0 and names["node_lm_head/w_dq"].attributes["axis"].value == 0  # per vocab row
    assert r.details["nodes"]["node_lm_head"]["smoothing"] == "none"
    # numerics: logits = fakeq(h) @ fakeq_rows(E)^T with h the graph's own (quantized) fc2 output
    model.graph.outputs.append(names["node_lm_head"].inputs[0].producer().inputs[0].producer().inputs[0])  # h (pre-Q)
    x = _feeds(7, 1)[0]["x"] * 0.9
    logits, h = _run(model, x, optimize=False)[0], _run(model, x, optimize=False)[-1]
    emb = fp32.graph.initializers["embed_tokens.weight"].const_value.numpy()
    key = "decoder/" + _act_name(fp32, "node_lm_head")
    sc = activation_scale(stats[key], np.ones(H, np.float32))
    hq = np.clip(np.rint(h / sc), -128, 127).astype(np.float32) * sc
    wsc = weight_scales(emb.T)  # per output channel = per vocabulary row
    eq = (quantize_weight(emb.T, wsc).astype(np.float32) * wsc[None, :]).T
    ref = hq.astype(np.float64) @ eq.T.astype(np.float64)
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    # idempotent
    again = QdqInt8Pass(QdqInt8Config(stats, include_lm_head=True), target=SM61, graph="decoder")(model).report
    assert again.counts["quantized"] == 0 and [n.op_type for n in model.graph] == ops


def test_lm_head_stays_fp32_in_the_pre_quantized_int8_form():
    model = fixture_model()
    r = QdqInt8Pass(QdqInt8Config(_stats(model), include_lm_head=True, weight_format="int8"), target=SM61, graph="decoder")(model).report
    assert [(s.where, s.reason.split(": ", 1)[1]) for s in r.skipped] == [(
        "node_lm_head", "tied lm_head: its [vocab, hidden] matrix is also the runtime's fp32 embedding table "
                        "(host lookup); pre-quantized int8 weights would drop it, so it stays fp32")]
    assert [n.op_type for n in model.graph][-1:] == ["Gemm"] and r.details["layers"]["decoder.lm_head"]["decision"] == "fp32"
