"""NormFusionPass: RMSNorm / residual+norm / GELU -> ORT fused normalization and activation ops."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.base import TargetCapabilities
from qvl.passes.norm_fusion import NormFusionPass

CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)
TRT = TargetCapabilities("sm61", ort_contrib_ops=False, max_opset=17)
D, F = 16, 24
ZERO_COUNTS = dict.fromkeys(
    ("rms_normalization", "skip_rms_normalization", "skip_layer_normalization", "gelu", "bias_gelu"), 0
)


def _f(name, arr):
    arr = np.asarray(arr, np.float32)
    return helper.make_tensor(name, T.FLOAT, arr.shape, arr.flatten().tolist())


def _rms(x, w, out, p, eps):
    """transformers' RMSNorm as torch.onnx (dynamo) exports it: w * (x * 1/sqrt(mean(x^2) + eps))."""
    return [
        helper.make_node("Pow", [x, "two"], [f"{p}sq"], name=f"{p}pow"),
        # onnxscript's pattern spells noop_with_empty_axes=0 out, as the exporter does
        helper.make_node(
            "ReduceMean", [f"{p}sq", "last"], [f"{p}ms"], name=f"{p}mean", keepdims=1, noop_with_empty_axes=0
        ),
        helper.make_node("Add", [f"{p}ms", eps], [f"{p}mse"], name=f"{p}add_eps"),
        helper.make_node("Sqrt", [f"{p}mse"], [f"{p}rms"], name=f"{p}sqrt"),
        helper.make_node("Reciprocal", [f"{p}rms"], [f"{p}inv"], name=f"{p}rsqrt"),
        helper.make_node("Mul", [x, f"{p}inv"], [f"{p}n"], name=f"{p}mul"),
        helper.make_node("Mul", [w, f"{p}n"], [out], name=f"{p}scale"),
    ]


def _model(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the exporter records every shape too


def decoder_norm_graph(eps_is_input: bool = False) -> onnx.ModelProto:
    """input RMSNorm on a graph input, then residual add + RMSNorm (decoder layout [batch, seq, hidden])."""
    rng = np.random.default_rng(0)
    eps = "eps_in" if eps_is_input else "eps"
    nodes = [
        *_rms("x", "w0", "y0", "a_", eps),
        helper.make_node("Add", ["y0", "skip"], ["h"], name="residual"),
        *_rms("h", "w1", "y1", "b_", eps),
    ]
    inputs = [helper.make_tensor_value_info(n, T.FLOAT, [1, "S", D]) for n in ("x", "skip")]
    if eps_is_input:
        inputs.append(helper.make_tensor_value_info("eps_in", T.FLOAT, []))
    graph = helper.make_graph(
        nodes, "rms", inputs,
        [helper.make_tensor_value_info(n, T.FLOAT, [1, "S", D]) for n in ("y1", "h")],
        [_f("two", 2.0), _f("eps", 1e-6), helper.make_tensor("last", T.INT64, [1], [-1]),
         _f("w0", 1 + 0.1 * rng.standard_normal(D)), _f("w1", 1 + 0.1 * rng.standard_normal(D))],
    )
    return _model(graph)


def vision_norm_gelu_graph(skip_rows: str | int = "N") -> onnx.ModelProto:
    """Packed 2-D residual add + LayerNorm (vision layout [patches, hidden]) and three GELU forms."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["h"], name="residual"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], name="norm", axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["y", "w"], ["t"], name="fc"),
        helper.make_node("Add", ["t", "b1"], ["tb1"], name="bias1"),
        helper.make_node("Gelu", ["tb1"], ["g_tanh"], name="gelu_tanh", approximate="tanh"),
        helper.make_node("Add", ["t", "b2"], ["tb2"], name="bias2"),
        helper.make_node("Gelu", ["tb2"], ["g_erf"], name="gelu_erf"),
        # erf GELU spelled out: 0.5 * x * (1 + erf(x / sqrt(2)))
        helper.make_node("Div", ["t", "sqrt2"], ["e1"], name="div"),
        helper.make_node("Erf", ["e1"], ["e2"], name="erf"),
        helper.make_node("Add", ["e2", "one"], ["e3"], name="add1"),
        helper.make_node("Mul", ["t", "e3"], ["e4"], name="mulx"),
        helper.make_node("Mul", ["e4", "half"], ["g_dec"], name="half"),
    ]
    graph = helper.make_graph(
        nodes, "vision",
        [helper.make_tensor_value_info("x", T.FLOAT, ["N", D]),
         helper.make_tensor_value_info("skip", T.FLOAT, [skip_rows, D])],
        [helper.make_tensor_value_info(n, T.FLOAT, ["N", D]) for n in ("y", "h")]
        + [helper.make_tensor_value_info(n, T.FLOAT, ["N", F]) for n in ("g_tanh", "g_erf", "g_dec")],
        [_f("gamma", 1 + 0.1 * rng.standard_normal(D)), _f("beta", 0.1 * rng.standard_normal(D)),
         _f("w", rng.standard_normal((D, F)) / 4), _f("b1", rng.standard_normal(F)), _f("b2", rng.standard_normal(F)),
         _f("sqrt2", math.sqrt(2.0)), _f("one", 1.0), _f("half", 0.5)],
    )
    return _model(graph)


def _run(model: ir.Model | onnx.ModelProto, feeds) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_decoder_rms_norms_fuse_with_equal_outputs():
    proto = decoder_norm_graph()
    model = ir.serde.deserialize_model(proto)
    result = NormFusionPass(target=CPU, graph="decoder")(model)
    assert result.report.counts == {**ZERO_COUNTS, "rms_normalization": 2, "skip_rms_normalization": 1}
    assert result.report.skipped == []
    assert [(n.domain, n.op_type) for n in model.graph] == [
        ("", "SimplifiedLayerNormalization"),  # input norm of a graph input: no residual to absorb
        ("com.microsoft", "SkipSimplifiedLayerNormalization"),  # residual add + norm; its sum output is `h`
    ]
    skip_node = list(model.graph)[1]
    assert skip_node.attributes["epsilon"].as_float() == np.float32(1e-6)
    rng = np.random.default_rng(2)
    for seq in (1, 7):
        feeds = {"x": _randn(rng, 1, seq, D), "skip": _randn(rng, 1, seq, D)}
        for got, ref in zip(_run(model, feeds), _run(proto, feeds)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_vision_skip_layer_norm_and_gelus_fuse_with_equal_outputs():
    proto = vision_norm_gelu_graph()
    model = ir.serde.deserialize_model(proto)
    result = NormFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {**ZERO_COUNTS, "skip_layer_normalization": 1, "gelu": 1, "bias_gelu": 2}
    assert result.report.skipped == []
    assert [(n.domain, n.op_type) for n in model.graph] == [
        ("com.microsoft", "SkipLayerNormalization"),  # 2-D [patches, hidden] operands
        ("", "MatMul"),
        ("com.microsoft", "FastGelu"),  # Add(bias) + Gelu(tanh) -> FastGelu(x, bias)
        ("com.microsoft", "BiasGelu"),  # Add(bias) + Gelu(erf)
        ("com.microsoft", "Gelu"),  # the spelled-out erf GELU
    ]
    assert result.report.details["fused_ops"] == {"SkipLayerNormalization": 1, "Gelu": 1, "FastGelu": 1, "BiasGelu": 1}
    rng = np.random.default_rng(3)
    for n in (1, 13):
        feeds = {"x": _randn(rng, n, D), "skip": _randn(rng, n, D)}
        for got, ref in zip(_run(model, feeds), _run(proto, feeds)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_non_constant_epsilon_is_skipped_with_reason():
    model = ir.serde.deserialize_model(decoder_norm_graph(eps_is_input=True))
    ops = _ops(model)
    result = NormFusionPass(target=CPU, graph="decoder")(model)
    assert result.report.counts == ZERO_COUNTS
    assert _ops(model) == ops
    assert [(s.where, s.reason) for s in result.report.skipped] == [
        ("a_scale", "RmsNormFusion1: Epsilon is not a float value."),
        ("b_scale", "RmsNormFusion1: Epsilon is not a float value."),
    ]


def test_broadcast_residual_is_skipped_with_reason():
    # skip is [1, hidden] broadcast over the patches: SkipLayerNormalization needs equal operands.
    model = ir.serde.deserialize_model(vision_norm_gelu_graph(skip_rows=1))
    result = NormFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts["skip_layer_normalization"] == 0
    assert _ops(model)[:2] == ["Add", "LayerNormalization"]
    (skip,) = result.report.skipped
    assert skip.where == "norm" and skip.reason.startswith("SkipLayerNorm: ") and "[tokens, hidden]" in skip.reason


def test_is_idempotent():
    for proto, graph in ((decoder_norm_graph(), "decoder"), (vision_norm_gelu_graph(), "vision")):
        model = ir.serde.deserialize_model(proto)
        NormFusionPass(target=CPU, graph=graph)(model)
        ops = [(n.domain, n.op_type, [v.name for v in n.inputs if v is not None]) for n in model.graph]
        again = NormFusionPass(target=CPU, graph=graph)(model)
        assert again.report.counts == ZERO_COUNTS and again.report.skipped == []
        assert not again.modified
        assert [(n.domain, n.op_type, [v.name for v in n.inputs if v is not None]) for n in model.graph] == ops


def test_tensorrt_target_is_skipped_with_reason():
    model = ir.serde.deserialize_model(decoder_norm_graph())
    ops = _ops(model)
    result = NormFusionPass(target=TRT, graph="decoder")(model)
    assert result.report.counts == ZERO_COUNTS
    assert "no ORT contrib ops" in result.report.skipped[0].reason
    assert _ops(model) == ops and "com.microsoft" not in model.opset_imports


# ---- the tiny artifact's real graphs -------------------------------------------------------------------


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _fused_copy(artifact, graph: str, tmp_path):
    """Load the artifact's graph (weights stay memory-mapped), fuse, save a copy with its own external data.

    `ir.save` without `external_data` keeps the original *relative* `weights.bin` locations, which do not
    resolve from another directory, so the copy gets its own data file.
    """
    model = ir.load(artifact / f"{graph}.onnx")
    result = NormFusionPass(target=CPU, graph=graph)(model)
    out = tmp_path / f"{graph}.onnx"
    ir.save(model, out, external_data=f"{graph}.data")
    return model, result.report, out


def vision_feeds(artifact, grid, seed):
    """One vision call's feeds: one attention segment (`grid` is a single [1, h, w] image)."""
    from qvl.runtime.vision_tables import segment_feeds

    vision = json.loads((artifact / "config.json").read_text())["vision_config"]
    (_, h, w), = grid
    names = ["pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin"]
    return segment_feeds(_randn(np.random.default_rng(seed), h * w, 1536), 0, h * w, h, w, vision, names)


def decoder_feeds(text_config, seq, past, seed):
    rng = np.random.default_rng(seed)
    hidden, kv, hd = text_config["hidden_size"], text_config["num_key_value_heads"], text_config["head_dim"]
    feeds = {
        "inputs_embeds": _randn(rng, 1, seq, hidden),
        "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (3, 1, seq)).copy(),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "deepstack_embeds": _randn(rng, 3, 1, seq, hidden),
        "logit_positions": np.arange(seq, dtype=np.int64),  # every position's logits (a verify step's form)
    }
    for i in range(text_config["num_hidden_layers"]):
        feeds[f"past_key_{i}"] = _randn(rng, 1, kv, past, hd)
        feeds[f"past_value_{i}"] = _randn(rng, 1, kv, past, hd)
    return feeds


def test_tiny_decoder_norms_fuse_with_equal_logits(tiny_artifact, tmp_path):
    text = json.loads((tiny_artifact / "config.json").read_text())["text_config"]
    layers = text["num_hidden_layers"]
    model, report, path = _fused_copy(tiny_artifact, "decoder", tmp_path)
    # per layer: input_layernorm, q_norm, k_norm, post_attention_layernorm; plus the final norm
    assert report.counts == {
        **ZERO_COUNTS, "rms_normalization": 4 * layers + 1, "skip_rms_normalization": 2 * layers - 1,
    }
    assert report.skipped == []
    ops = [n.op_type for n in model.graph]
    # residual adds absorbed: every post_attention_layernorm, and input_layernorm of layers 1.. (after DeepStack add)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    # left plain: q_norm + k_norm per layer, layer 0's input norm (on inputs_embeds), the final norm (on the gathered
    # logit positions)
    assert ops.count("SimplifiedLayerNormalization") == 2 * layers + 2
    assert "Pow" not in ops and "Reciprocal" not in ops
    before, after = _session(tiny_artifact / "decoder.onnx"), _session(path)
    for seq, past in ((6, 0), (2, 5)):
        feeds = decoder_feeds(text, seq, past, seed=seq)
        ref, got = before.run(None, feeds), after.run(None, feeds)
        # Logits are O(30) here; 5e-5 is ~1.7e-6 relative. ORT's own graph-optimization levels already
        # move these logits by 1.6e-5 on the unfused graph (summation-order noise, not a semantic change).
        np.testing.assert_allclose(got[0], ref[0], atol=5e-5, rtol=0)
        for g, r in zip(got[1:], ref[1:]):  # present key/value
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)


def test_tiny_vision_norms_fuse_with_equal_outputs(tiny_artifact, tmp_path):
    vision = json.loads((tiny_artifact / "config.json").read_text())["vision_config"]
    model, report, path = _fused_copy(tiny_artifact, "vision", tmp_path)
    # norm1 + norm2 of every block, and the merger's norm: each sits on a residual add
    assert report.counts == {**ZERO_COUNTS, "skip_layer_normalization": 2 * vision["depth"] + 1}
    assert report.skipped == []
    ops = [n.op_type for n in model.graph]
    assert ops.count("SkipLayerNormalization") == 2 * vision["depth"] + 1
    # DeepStack mergers normalize after the 2x2 patch shuffle (a Reshape, not a residual add)
    assert ops.count("LayerNormalization") == len(vision["deepstack_visual_indexes"])
    before, after = _session(tiny_artifact / "vision.onnx"), _session(path)
    for seed, grid in enumerate(([[1, 4, 6]], [[1, 8, 8]])):  # one image per vision call
        feeds = vision_feeds(tiny_artifact, grid, seed)
        for got, ref in zip(after.run(None, feeds), before.run(None, feeds)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
