"""VisionAttentionFusionPass: vision attention -> com.microsoft.MultiHeadAttention.

Current exports run one attention segment (image / video frame) per call: no mask, and the fused node has no
attention_bias (ORT CPU then takes its flash kernel). Exports of the previous packed form (all images in one
call, block-diagonal mask from `segment_ids`) still fuse, with the mask as attention_bias."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

from qvl.passes.base import TargetCapabilities
from qvl.passes.norm_fusion import NormFusionPass
from qvl.passes.vision_attention_fusion import VisionAttentionFusionPass

CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)
TRT = TargetCapabilities("sm61", ort_contrib_ops=False, max_opset=17)
H, DH = 3, 12  # head_dim 12: scale 1/sqrt(12) is not a power of two, so scaling order shows up in the numbers
D = H * DH


def _f(name, arr):
    arr = np.asarray(arr, np.float32)
    return helper.make_tensor(name, T.FLOAT, arr.shape, arr.flatten().tolist())


def _i(name, values):
    return helper.make_tensor(name, T.INT64, [len(values)], values)


def _rotary(x, p):
    """rotate-half rotary (transformers' apply_rotary_pos_emb_vision) on [N, H, Dh] with [N, 1, Dh] cos/sin."""
    return [
        helper.make_node("Mul", [x, "cos3"], [f"{p}xc"]),
        helper.make_node("Slice", [x, "i0", "half_dh", "am1"], [f"{p}x1"]),
        helper.make_node("Slice", [x, "half_dh", "big", "am1"], [f"{p}x2"]),
        helper.make_node("Neg", [f"{p}x2"], [f"{p}nx2"]),
        helper.make_node("Concat", [f"{p}nx2", f"{p}x1"], [f"{p}rot"], axis=-1),
        helper.make_node("Mul", [f"{p}rot", "sin3"], [f"{p}rs"]),
        helper.make_node("Add", [f"{p}xc", f"{p}rs"], [f"{p}r"]),
    ]


def vision_attention_graph(blocks: int = 2, bias: str = "none", scale_is_input: bool = False) -> onnx.ModelProto:
    """`blocks` vision attention blocks in the form torch.onnx (dynamo) exports `VisionEncoderAdapter`.

    bias="none":  one attention segment per call, no mask (the current export);
    bias="block": the [N, N] block-diagonal image mask from segment_ids (the previous, packed export);
    bias="row":   a [1, N] key mask broadcast over the queries (not expressible as MHA attention_bias).
    """
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Unsqueeze", ["rotary_cos", "am2"], ["cos3"]),
        helper.make_node("Unsqueeze", ["rotary_sin", "am2"], ["sin3"]),
    ]
    if bias != "none":
        nodes += [
            helper.make_node("Unsqueeze", ["segment_ids", "i1"], ["seg_col"]),
            helper.make_node("Unsqueeze", ["segment_ids", "i0"], ["seg_row"]),
        ]
    if bias == "block":
        nodes.append(helper.make_node("Equal", ["seg_col", "seg_row"], ["same"]))
    elif bias == "row":
        nodes.append(helper.make_node("Equal", ["seg_row", "zero_i"], ["same"]))
    if bias != "none":
        nodes += [
            helper.make_node("Not", ["same"], ["blocked"]),
            helper.make_node("Where", ["blocked", "fmin", "zero_f"], ["mask"]),
        ]
    inits = [
        _i("am2", [-2]), _i("am1", [-1]), _i("i0", [0]), _i("i1", [1]), _i("i2", [2]), _i("i3", [3]),
        _i("half_dh", [DH // 2]), _i("big", [2**62]), _i("qkv_shape", [-1, 3, H, DH]), _i("out_shape", [-1, D]),
        helper.make_tensor("zero_i", T.INT64, [], [0]),
        _f("fmin", np.finfo(np.float32).min), _f("zero_f", 0.0),
    ]
    if not scale_is_input:
        inits.append(_f("scale", DH**-0.5))
    value_info = [] if bias == "none" else [
        helper.make_tensor_value_info("mask", T.FLOAT, ["N", "N"] if bias == "block" else [1, "N"])]
    x = "hidden"
    for b in range(blocks):
        p, w = f"b{b}_", f"blocks.{b}.attn."
        nodes += [
            helper.make_node("Gemm", [x, f"{w}qkv.weight", f"{w}qkv.bias"], [f"{p}qkv"], transB=1),
            helper.make_node("Reshape", [f"{p}qkv", "qkv_shape"], [f"{p}view"], allowzero=1),
            helper.make_node("Transpose", [f"{p}view"], [f"{p}perm"], perm=[1, 0, 2, 3]),
        ]
        for j, name in enumerate(("q0", "k0", "v")):
            nodes += [
                helper.make_node("Slice", [f"{p}perm", f"i{j}", f"i{j + 1}", "i0"], [f"{p}{name}_s"]),
                helper.make_node("Squeeze", [f"{p}{name}_s", "i0"], [f"{p}{name}"]),
            ]
        nodes += _rotary(f"{p}q0", f"{p}q_") + _rotary(f"{p}k0", f"{p}k_")
        nodes += [
            helper.make_node("Transpose", [f"{p}q_r"], [f"{p}qt"], perm=[1, 0, 2]),
            helper.make_node("Transpose", [f"{p}v"], [f"{p}vt"], perm=[1, 0, 2]),
            helper.make_node("Transpose", [f"{p}k_r"], [f"{p}kt"], perm=[1, 2, 0]),
            helper.make_node("MatMul", [f"{p}qt", f"{p}kt"], [f"{p}scores"]),
            helper.make_node("Mul", [f"{p}scores", "scale"], [f"{p}scaled"]),
            *([] if bias == "none" else [helper.make_node("Add", [f"{p}scaled", "mask"], [f"{p}masked"])]),
            helper.make_node("Softmax", [f"{p}scaled" if bias == "none" else f"{p}masked"], [f"{p}probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}probs", f"{p}vt"], [f"{p}ctx"]),
            helper.make_node("Transpose", [f"{p}ctx"], [f"{p}ctx_t"], perm=[1, 0, 2]),
            helper.make_node("Reshape", [f"{p}ctx_t", "out_shape"], [f"{p}attn"], allowzero=1),
            helper.make_node("Gemm", [f"{p}attn", f"{w}proj.weight", f"{w}proj.bias"], [f"{p}proj"], transB=1),
            helper.make_node("Add", [x, f"{p}proj"], [f"{p}out"]),
        ]
        inits += [
            _f(f"{w}qkv.weight", rng.standard_normal((3 * D, D)) / 4),
            _f(f"{w}qkv.bias", rng.standard_normal(3 * D) / 4),
            _f(f"{w}proj.weight", rng.standard_normal((D, D)) / 4), _f(f"{w}proj.bias", rng.standard_normal(D) / 4),
        ]
        # the exporter records every value's shape; the pass relies on [N, H, Dh] q/k/v and the mask shape
        value_info += [helper.make_tensor_value_info(f"{p}{n}", T.FLOAT, ["N", H, DH]) for n in ("q_r", "k_r", "v")]
        x = f"{p}out"
    inputs = [
        helper.make_tensor_value_info("hidden", T.FLOAT, ["N", D]),
        helper.make_tensor_value_info("rotary_cos", T.FLOAT, ["N", DH]),
        helper.make_tensor_value_info("rotary_sin", T.FLOAT, ["N", DH]),
    ]
    if bias != "none":
        inputs.append(helper.make_tensor_value_info("segment_ids", T.INT64, ["N"]))
    if scale_is_input:
        inputs.append(helper.make_tensor_value_info("scale", T.FLOAT, []))
    graph = helper.make_graph(
        nodes, "vision_attention", inputs, [helper.make_tensor_value_info(x, T.FLOAT, ["N", D])], inits,
        value_info=value_info,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _feeds(images: list[int], seed: int = 0, scale: float | None = None, packed: bool = True):
    rng = np.random.default_rng(seed)
    n = sum(images)
    angles = rng.uniform(0, 6.3, (n, DH // 2)).astype(np.float32)
    feeds = {
        "hidden": rng.standard_normal((n, D), dtype=np.float32),
        "rotary_cos": np.cos(np.concatenate([angles, angles], -1)),
        "rotary_sin": np.sin(np.concatenate([angles, angles], -1)),
    }
    if packed:
        feeds["segment_ids"] = np.repeat(np.arange(len(images), dtype=np.int64), images)
    if scale is not None:
        feeds["scale"] = np.array(scale, np.float32)
    return feeds


def _run(model: ir.Model | onnx.ModelProto, feeds) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


BLOCK_PREFIX = [  # qkv projection, split, rotary on q and k: all unchanged
    "Gemm", "Reshape", "Transpose", "Slice", "Squeeze", "Slice", "Squeeze", "Slice", "Squeeze",
    "Mul", "Slice", "Slice", "Neg", "Concat", "Mul", "Add",
    "Mul", "Slice", "Slice", "Neg", "Concat", "Mul", "Add",
]


def test_fuses_every_unmasked_block_to_multi_head_attention_without_bias():
    """The current export (one segment per call): MultiHeadAttention(q, k, v) only, no attention_bias."""
    proto = vision_attention_graph(blocks=2, bias="none")
    model = ir.serde.deserialize_model(proto)
    result = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {"multi_head_attention": 2}
    assert result.report.details["per_block"] == {"blocks.0.attn": 1, "blocks.1.attn": 1}
    assert result.report.skipped == []
    to_bsd = ["Constant", "Reshape", "Reshape", "Reshape"]  # q, k, v [N, H, Dh] -> [1, N, D]
    tail = ["MultiHeadAttention", "Constant", "Reshape", "Gemm", "Add"]  # -> [N, D]; projection + residual
    assert _ops(model) == ["Unsqueeze", "Unsqueeze", *BLOCK_PREFIX, *to_bsd, *tail, *BLOCK_PREFIX, *to_bsd, *tail]
    for node in (n for n in model.graph if n.op_type == "MultiHeadAttention"):
        assert node.domain == "com.microsoft" and len(node.inputs) == 3  # no key_padding_mask, no attention_bias
        assert node.attributes["num_heads"].as_int() == H
        assert node.attributes["scale"].as_float() == np.float32(DH**-0.5)
    assert [i.name for i in model.graph.inputs] == ["hidden", "rotary_cos", "rotary_sin"]
    for images in ([5], [12], [1]):  # one segment per call, incl. a single patch
        feeds = _feeds(images, seed=images[0], packed=False)
        np.testing.assert_allclose(_run(model, feeds)[0], _run(proto, feeds)[0], atol=1e-5, rtol=0)


def test_packed_export_fuses_with_the_block_mask_as_attention_bias():
    """The previous (packed) export: the [N, N] block-diagonal mask becomes a shared [1, 1, N, N] attention_bias."""
    proto = vision_attention_graph(blocks=2, bias="block")
    model = ir.serde.deserialize_model(proto)
    result = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {"multi_head_attention": 2}
    assert result.report.details["per_block"] == {"blocks.0.attn": 1, "blocks.1.attn": 1}
    assert result.report.skipped == []
    to_bsd = ["Constant", "Reshape", "Reshape", "Reshape"]  # q, k, v [N, H, Dh] -> [1, N, D]
    tail = ["MultiHeadAttention", "Constant", "Reshape", "Gemm", "Add"]  # -> [N, D]; projection + residual
    assert _ops(model) == [
        "Unsqueeze", "Unsqueeze", "Unsqueeze", "Unsqueeze", "Equal", "Not", "Where",  # tables + mask (once)
        *BLOCK_PREFIX, *to_bsd, "Constant", "Unsqueeze", *tail,  # [N, N] mask -> [1, 1, N, N] bias, once
        *BLOCK_PREFIX, *to_bsd, *tail,  # the second block reuses it
    ]
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert {n.domain for n in mha} == {"com.microsoft"} and mha[0].inputs[5] is mha[1].inputs[5]
    assert mha[0].attributes["num_heads"].as_int() == H
    assert mha[0].attributes["scale"].as_float() == np.float32(DH**-0.5)
    assert model.opset_imports["com.microsoft"] == 1
    for images in ([5], [3, 7], [2, 1, 4]):  # one image, two images, three (incl. a single patch)
        feeds = _feeds(images, seed=len(images))
        np.testing.assert_allclose(_run(model, feeds)[0], _run(proto, feeds)[0], atol=1e-5, rtol=0)


def test_row_mask_is_skipped_with_reason():
    # A [1, N] key mask broadcast over queries is not MHA's (1|B, 1|H, S, total_S) attention_bias.
    model = ir.serde.deserialize_model(vision_attention_graph(blocks=1, bias="row"))
    ops = _ops(model)
    result = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {"multi_head_attention": 0}
    assert _ops(model) == ops
    (skip,) = result.report.skipped
    assert skip.where == "blocks.0.attn"
    assert skip.reason.startswith("attention bias shape [1,N] is not [patches, patches]")


def test_runtime_scale_is_skipped_with_reason():
    model = ir.serde.deserialize_model(vision_attention_graph(blocks=1, bias="block", scale_is_input=True))
    result = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {"multi_head_attention": 0}
    skipped = [(s.where, s.reason) for s in result.report.skipped]
    assert skipped == [("blocks.0.attn", "attention scale is not a constant scalar")]
    assert "Softmax" in _ops(model)


@pytest.mark.parametrize("bias", ["none", "block"])
def test_is_idempotent(bias):
    model = ir.serde.deserialize_model(vision_attention_graph(blocks=2, bias=bias))
    VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    ops = _ops(model)
    again = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert again.report.counts == {"multi_head_attention": 0}
    assert again.report.skipped == [] and not again.modified
    assert _ops(model) == ops


def test_tensorrt_target_and_decoder_graph_are_skipped():
    model = ir.serde.deserialize_model(vision_attention_graph(blocks=1))
    ops = _ops(model)
    trt = VisionAttentionFusionPass(target=TRT, graph="vision")(model)
    assert trt.report.counts == {"multi_head_attention": 0}
    assert "no ORT contrib ops" in trt.report.skipped[0].reason
    dec = VisionAttentionFusionPass(target=CPU, graph="decoder")(model)
    assert "not configured" in dec.report.skipped[0].reason
    assert _ops(model) == ops and "com.microsoft" not in model.opset_imports


# ---- the tiny artifact's real vision graph -----------------------------------------------------------


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _vision_feeds(artifact, grid, seed, input_names):
    """One vision call's feeds (one attention segment: `grid` is one [t=1, h, w] image)."""
    from qvl.runtime.vision_tables import segment_feeds

    vision = json.loads((artifact / "config.json").read_text())["vision_config"]
    (_, h, w), = grid
    pixels = np.random.default_rng(seed).standard_normal((h * w, 1536), dtype=np.float32)
    return segment_feeds(pixels, 0, h * w, h, w, vision, input_names)


def test_tiny_vision_every_block_fuses_with_equal_outputs(tiny_artifact, tmp_path):
    vision = json.loads((tiny_artifact / "config.json").read_text())["vision_config"]
    depth = vision["depth"]
    model = ir.load(tiny_artifact / "vision.onnx")  # weights stay memory-mapped; the artifact is not modified
    names = [i.name for i in model.graph.inputs]
    assert "segment_ids" not in names  # the export is one attention segment per call
    result = VisionAttentionFusionPass(target=CPU, graph="vision")(model)
    assert result.report.counts == {"multi_head_attention": depth}
    assert result.report.details["per_block"] == {f"visual.blocks.{i}.attn": 1 for i in range(depth)}
    assert result.report.skipped == []
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == depth and "Softmax" not in ops and "MatMul" not in ops
    assert all(len(n.inputs) == 3 for n in model.graph if n.op_type == "MultiHeadAttention")  # no attention_bias
    # norm fusion composes with it (SkipLayerNormalization around every block)
    norms = NormFusionPass(target=CPU, graph="vision")(model).report
    assert norms.counts["skip_layer_normalization"] == 2 * depth + 1
    # `ir.save` without external_data would keep the artifact's relative `weights.bin` paths: give the copy its own.
    ir.save(model, tmp_path / "vision.onnx", external_data="vision.data")
    before, after = _session(tiny_artifact / "vision.onnx"), _session(tmp_path / "vision.onnx")
    for seed, grid in enumerate(([[1, 4, 6]], [[1, 8, 8]], [[1, 2, 2]], [[1, 12, 10]])):
        feeds = _vision_feeds(tiny_artifact, grid, seed, names)
        for got, ref in zip(after.run(None, feeds), before.run(None, feeds)):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
