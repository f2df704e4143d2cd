"""SiblingLinearFusionPass: linear siblings of one input (q/k/v, gate/up) -> one wider MatMul / MatMulNBits + Split."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qvl.passes.base import TargetCapabilities
from qvl.passes.linear_fusion import FUSED_KEY, SiblingLinearFusionConfig, SiblingLinearFusionPass
from qvl.passes.linear_sites import EMBEDDING_NAME, LM_HEAD_LAYER
from qvl.passes.precision import quantize_blockwise

CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)
K = 64
QKV = {"q": 128, "k": 64, "v": 64}  # widths of the 3-sibling group (on input x)
GATE_UP = {"gate": 96, "up": 96}  # the 2-sibling group (on input y)
FP32_OPS = ["MatMul", "Split", "Concat", "MatMul", "Split", "Sigmoid", "Mul", "Mul", "MatMul", "MatMul", "Add"]


def _input(name: str) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(["batch", "seq", K]), type=ir.TensorType(ir.DataType.FLOAT))


def _init(inits: dict, name: str, arr: np.ndarray) -> ir.Value:
    arr = np.ascontiguousarray(arr)
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                 const_value=ir.tensor(arr, name=name))
    inits[name] = v
    return v


def _linear(kind: str, x: ir.Value, inits: dict, name: str, w_kn: np.ndarray, scope: str, *, bits=4, block=32,
            level=0, symmetric=True, bias=False) -> ir.Node:
    """`MatMul(x, W)` or the MatMulNBits form of the same weight, named like the exporter's q/k/v nodes."""
    if kind == "matmul":
        node = ir.Node("", "MatMul", [x, _init(inits, f"w_{name}", w_kn)], name=name)
    else:
        q = quantize_blockwise(w_kn.T, bits, block, symmetric)
        ins = [x, _init(inits, f"w_{name}.q", q.packed), _init(inits, f"w_{name}.scales", q.scales),
               None if symmetric else _init(inits, f"w_{name}.zp", q.zero_points)]
        if bias:
            ins += [None, _init(inits, f"b_{name}", np.linspace(-1, 1, q.n, dtype=np.float32))]
        while ins[-1] is None:
            ins.pop()
        attrs = [ir.AttrInt64(a, v) for a, v in (("K", q.k), ("N", q.n), ("bits", bits), ("block_size", block),
                                                 ("accuracy_level", level))]
        node = ir.Node("com.microsoft", "MatMulNBits", ins, attributes=attrs, name=name)
    node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", scope, name])
    node.outputs[0].name = f"{name}_out"
    return node


def sibling_model(kind: str = "matmul", seed: int = 0, per_node: dict | None = None, **nbits) -> ir.Model:
    """x -> q, k, v -> Concat; y -> gate, up -> silu(gate) * up; z1 -> p1, z2 -> p2 (same K, different inputs) -> Add."""
    rng = np.random.default_rng(seed)
    inits: dict = {}
    x, y, z1, z2 = (_input(n) for n in ("x", "y", "z1", "z2"))

    def lin(inp, name, n, scope):
        w = (rng.standard_normal((K, n)) / np.sqrt(K)).astype(np.float32)
        return _linear(kind, inp, inits, name, w, scope, **{**nbits, **(per_node or {}).get(name, {})})

    qkv = [lin(x, n, w, f"lm.layers.0.self_attn.{n}_proj") for n, w in QKV.items()]
    cat = ir.Node("", "Concat", [q.outputs[0] for q in qkv], attributes=[ir.AttrInt64("axis", -1)], name="cat")
    gate, up = (lin(y, n, w, f"lm.layers.0.mlp.{n}_proj") for n, w in GATE_UP.items())
    sig = ir.Node("", "Sigmoid", [gate.outputs[0]], name="sig")
    silu = ir.Node("", "Mul", [gate.outputs[0], sig.outputs[0]], name="silu")
    mlp = ir.Node("", "Mul", [silu.outputs[0], up.outputs[0]], name="mlp")
    p1, p2 = lin(z1, "p1", 32, "lm.layers.1.p1"), lin(z2, "p2", 32, "lm.layers.1.p2")
    add = ir.Node("", "Add", [p1.outputs[0], p2.outputs[0]], name="add")
    outs = []
    for node, name in ((cat, "attn"), (mlp, "mlp"), (add, "other")):
        node.outputs[0].name = name
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        outs.append(node.outputs[0])
    graph = ir.Graph([x, y, z1, z2], outs, nodes=[*qkv, cat, gate, up, sig, silu, mlp, p1, p2, add],
                     initializers=list(inits.values()), opset_imports={"": 20, "com.microsoft": 1}, name="siblings")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # One thread: MLAS partitions a wider N differently across threads; with many threads the int8 level-0
    # prefill path (M > 1) regroups fp32 sums (measured <= 3.8e-7 relative on 2B shapes, 16 threads).
    so.intra_op_num_threads = 1
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(seq: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((1, seq, K), dtype=np.float32) for n in ("x", "y", "z1", "z2")}


def _max_diff(model_before: ir.Model, model_after: ir.Model) -> float:
    worst = 0.0
    for seq in (1, 7):
        for b, a in zip(_run(model_before, _feeds(seq)), _run(model_after, _feeds(seq))):
            assert b.shape == a.shape
            worst = max(worst, float(np.abs(b - a).max()))
    return worst


def _fuse(model: ir.Model, graph: str = "decoder", config=None):
    return SiblingLinearFusionPass(config, target=CPU, graph=graph)(model)


def test_fuses_fp32_matmul_siblings_exactly():
    model = sibling_model("matmul")
    result = _fuse(model)
    assert result.modified
    assert result.report.counts == {"fused_groups": 2, "linears_removed": 3, "matmul_groups": 2, "matmulnbits_groups": 0}
    assert result.report.skipped == []
    assert [n.op_type for n in model.graph] == FP32_OPS
    qkv, split = list(model.graph)[:2]
    assert qkv.name == "q+k+v" and qkv.inputs[0].name == "x"
    assert qkv.inputs[1].const_value.shape == (K, 256)
    assert split.inputs[1].const_value.numpy().tolist() == [128, 64, 64]
    assert [o.name for o in split.outputs] == ["q_out", "k_out", "v_out"]
    assert qkv.metadata_props[FUSED_KEY] == "lm.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert qkv.metadata_props["qvl.layer"] == "decoder.layers.0"  # one layer key, not three
    assert not {"w_q", "w_k", "w_v", "w_gate", "w_up"} & set(model.graph.initializers)
    # p1/p2: same K and N but different inputs: untouched
    assert [n.name for n in model.graph if n.op_type == "MatMul"][-2:] == ["p1", "p2"]
    # fp32: each column's dot product is the same sum of K products, so bit-equal unless MLAS blocks K differently
    # for a wider N (it does not for these shapes); 1e-5 on O(1) outputs allows a few ulps of reordering. Measured 0.
    assert _max_diff(sibling_model("matmul"), model) <= 1e-5


@pytest.mark.parametrize("bits,level,symmetric,bias", [
    (4, 0, True, False), (4, 0, False, True), (8, 0, True, False), (8, 0, False, False),
    (4, 4, True, False), (4, 4, False, True), (8, 4, True, False),
])
def test_fuses_matmulnbits_siblings(bits, level, symmetric, bias):
    opts = dict(bits=bits, level=level, symmetric=symmetric, bias=bias)
    model = sibling_model("nbits", **opts)
    result = _fuse(model)
    assert result.report.counts == {"fused_groups": 2, "linears_removed": 3, "matmul_groups": 0, "matmulnbits_groups": 2}
    assert [n.op_type for n in model.graph] == [op.replace("MatMul", "MatMulNBits") for op in FP32_OPS]
    qkv = next(iter(model.graph))
    attrs = {k: a.value for k, a in qkv.attributes.items()}
    assert attrs == {"K": K, "N": 256, "bits": bits, "block_size": 32, "accuracy_level": level}
    assert qkv.inputs[1].const_value.shape == (256, K // 32, 32 * bits // 8)
    assert (len(qkv.inputs) > 3 and qkv.inputs[3] is not None) == (not symmetric)
    assert (len(qkv.inputs) == 6) == bias
    diff = _max_diff(sibling_model("nbits", **opts), model)
    if level == 0:
        assert diff == 0.0  # fp32 compute on the same dequantized columns, one thread: bit-exact (measured 0)
    else:
        # int8 activations: A's per-block quantization does not depend on N and the int dot products are exact;
        # measured 0 (ORT 1.32, this CPU) but MLAS's fp32 block accumulation is not specified: allow a few ulps.
        assert diff <= 1e-5


@pytest.mark.parametrize("override,reason", [
    ({"level": 4}, "accuracy_level 4 differs from 0 of sibling q"),
    ({"block": 16}, "block_size 16 differs from 32 of sibling q"),
    ({"symmetric": False}, "zero_points UINT8 rank 1 differs from absent of sibling q"),
    ({"bits": 8}, "bits 8 differs from 4 of sibling q"),
])
def test_mismatching_matmulnbits_sibling_is_skipped(override, reason):
    per_node = {"v": override}
    model = sibling_model("nbits", per_node=per_node)
    result = _fuse(model)
    assert result.report.counts["fused_groups"] == 2 and result.report.counts["linears_removed"] == 2
    assert [(s.where, s.reason) for s in result.report.skipped] == [("v", f"x: {reason}")]
    names = [n.name for n in model.graph if n.op_type == "MatMulNBits"]
    assert names == ["q+k", "v", "gate+up", "p1", "p2"]
    assert _max_diff(sibling_model("nbits", per_node=per_node), model) == 0.0


def test_refused_members_keep_their_reasons():
    model = sibling_model("matmul")
    g = model.graph
    v, up = (next(n for n in g if n.name == name) for name in ("v", "up"))
    w_v = ir.Value(name="w_v_in", shape=ir.Shape([K, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    g.inputs.append(w_v)
    v.replace_input_with(1, w_v)  # a non-constant weight
    g.outputs.append(up.outputs[0])  # a sibling whose output is a graph output
    result = _fuse(model)
    assert result.report.counts == {"fused_groups": 1, "linears_removed": 1, "matmul_groups": 1, "matmulnbits_groups": 0}
    assert [(s.where, s.reason) for s in result.report.skipped] == [
        ("v", "x: weight w_v_in is not a constant initializer"),
        ("up", "y: output up_out is a graph output"),
        ("gate", "y: 1 compatible sibling(s), fewer than min_siblings=2"),
    ]
    assert [n.name for n in g if n.op_type == "MatMul"] == ["q+k", "v", "gate", "up", "p1", "p2"]


def test_lm_head_and_g_idx_are_never_fused():
    model = sibling_model("nbits")
    g = model.graph
    q, gate = (next(n for n in g if n.name == name) for name in ("q", "gate"))
    q.metadata_props["qvl.layer"] = "decoder.lm_head"  # the tied lm_head: the runtime reads its rows
    g_idx = _init({}, "g_idx", np.arange(K, dtype=np.int32) // 32)
    g.register_initializer(g_idx)
    gate.resize_inputs(5)
    gate.replace_input_with(4, g_idx)
    result = _fuse(model)
    assert [(s.where, s.reason) for s in result.report.skipped] == [
        ("q", "x: tied lm_head / embedding matrix (the runtime reads its rows)"),
        ("gate", "y: g_idx (act-order) present: its row permutation is per weight"),
        ("up", "y: 1 compatible sibling(s), fewer than min_siblings=2"),
    ]
    assert [n.name for n in g if n.op_type == "MatMulNBits"] == ["q", "k+v", "gate", "up", "p1", "p2"]
    # min_siblings=3 leaves even k/v alone
    model = sibling_model("nbits")
    result = _fuse(model, config=SiblingLinearFusionConfig(min_siblings=3))
    assert result.report.counts["fused_groups"] == 1 and [s.where for s in result.report.skipped] == ["gate", "up"]


def test_idempotent_and_gated_by_graph():
    model = sibling_model("nbits")
    assert _fuse(model).modified
    ops = [(n.op_type, n.name) for n in model.graph]
    again = _fuse(model)
    assert not again.modified and set(again.report.counts.values()) == {0} and again.report.skipped == []
    assert [(n.op_type, n.name) for n in model.graph] == ops
    other = _fuse(sibling_model(), graph="vision", config=SiblingLinearFusionConfig(graphs=("decoder",)))
    assert not other.modified and other.report.skipped[0].reason == "graph not configured for sibling linear fusion"
    with pytest.raises(ValueError):
        SiblingLinearFusionConfig(min_siblings=1)


# -- the tiny artifact -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_int4_artifact(tiny_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = tmp_path_factory.mktemp("lf-int4") / "art"
    compile_with_precision(tiny_artifact, "cpu", out, weights="int4")
    return out


def _decoder_outputs(path, info, seq: int = 5, capacity: int = 8) -> list[np.ndarray]:
    """A prefill of `seq` random embeddings on zeroed in-place (GroupQueryAttention) caches."""
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((1, seq, info.hidden_size), dtype=np.float32),
             "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (3, 1, seq)).copy(),
             "attention_mask": np.ones((1, seq), np.int64),
             "deepstack_embeds": np.zeros((info.num_deepstack, 1, seq, info.hidden_size), np.float32),
             "logit_positions": np.array([seq - 1], np.int64)}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, info.num_kv_heads, capacity, info.head_dim), np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("which,op", [("fp32", "MatMul"), ("int4", "MatMulNBits")])
def test_tiny_artifact_decoder(which, op, tiny_cpu_artifact, request, tmp_path):
    from qvl.artifacts.manifest import read_manifest
    from qvl.artifacts.writer import embedding_entry, load_graphs, save_graphs
    from qvl.toolchain.eval.inspect_precision import tensor_layers

    art = tiny_cpu_artifact if which == "fp32" else request.getfixturevalue("tiny_int4_artifact")
    manifest = read_manifest(art)
    info = manifest.model
    graphs = load_graphs(manifest)
    vision = _fuse(graphs["vision"], graph="vision")
    assert not vision.modified  # the vision blocks' qkv is one Linear already; nothing else shares an input
    decoder = graphs["decoder"]
    layers_before = tensor_layers(decoder, "decoder")[1]
    head = next(n for n in decoder.graph if n.metadata_props.get("qvl.layer") == LM_HEAD_LAYER
                or (len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].name == EMBEDDING_NAME))
    result = _fuse(decoder)
    layers = info.num_layers
    assert tensor_layers(decoder, "decoder")[1] == layers_before  # the same layer keys, no "+"-joined ones
    assert result.report.counts == {"fused_groups": 2 * layers, "linears_removed": 3 * layers,
                                    "matmul_groups": 2 * layers if op == "MatMul" else 0,
                                    "matmulnbits_groups": 2 * layers if op == "MatMulNBits" else 0}
    assert result.report.skipped == []
    groups = result.report.details["groups"]
    assert [g["fused"] for g in groups[:2]] == ["lm.layers.0.self_attn.q_proj+k_proj+v_proj", "lm.layers.0.mlp.gate_proj+up_proj"]
    assert [g["layer"] for g in groups] == [f"decoder.layers.{i // 2}" for i in range(2 * layers)]
    # per layer: qkv, o_proj, gate+up, down_proj (+ the int4 lm_head; the fp32 one is a Gemm)
    assert sum(n.op_type == op for n in decoder.graph) == 4 * layers + (op == "MatMulNBits")
    assert head in list(decoder.graph) and head.outputs[0].uses()  # the tied lm_head: the same node, not fused
    assert not _fuse(decoder).modified

    save_graphs({"decoder": decoder}, tmp_path)
    assert embedding_entry(decoder)["shape"] == [info.vocab_size, info.hidden_size]  # still found, still whole
    before = _decoder_outputs(manifest.graph_path("decoder"), info)
    after = _decoder_outputs(tmp_path / "decoder.onnx", info)
    for b, a in zip(before, after):  # logits and every present K/V: measured bit-equal for both forms
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
