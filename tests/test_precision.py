"""Precision pass (MatMulNBits int8/int4), quantized embedding lookup, accuracy-budgeted assignment."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qvl.passes.base import TargetCapabilities
from qvl.passes.precision import PrecisionConfig, PrecisionPass, dequantize, quantize_blockwise

from qvl.toolchain.compile.targets import get_target

CPU = get_target("cpu-avx2")
SM61_TRT = get_target("sm61")  # TensorRT 8.6: no ORT contrib ops
SM61_ORT = TargetCapabilities(name="sm61-ort-cuda", fast_dtypes=("float32",), int_weight_bits=(8,), ort_contrib_ops=True)

H, F, V = 64, 128, 96  # hidden, MLP width, vocab of the fixture graph
LINEAR_OPS = ["MatMulNBits", "Relu", "MatMulNBits", "Add", "Reshape", "MatMulNBits", "MatMulNBits"]


def _init(graph_inits: list, name: str, array: np.ndarray) -> ir.Value:
    dtype = {np.float32: ir.DataType.FLOAT, np.int64: ir.DataType.INT64}[array.dtype.type]
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=ir.tensor(array, name=name))
    graph_inits.append(v)
    return v


def _scoped(node: ir.Node, scope: str) -> ir.Node:
    node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", scope, "linear"])
    return node


def fixture_model(seed: int = 0, k: int = H) -> ir.Model:
    """Decoder-shaped toy: MLP of two MatMul([K,N] weights) + residual, a biased Gemm, a tied lm_head Gemm(transB=1)."""
    rng = np.random.default_rng(seed)
    inits: list[ir.Value] = []
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", k]), type=ir.TensorType(ir.DataType.FLOAT))
    w_up = _init(inits, "val_10", (rng.standard_normal((k, F)) / np.sqrt(k)).astype(np.float32))
    w_down = _init(inits, "val_11", (rng.standard_normal((F, k)) / np.sqrt(F)).astype(np.float32))
    w_proj = _init(inits, "proj.weight", (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32))
    b_proj = _init(inits, "proj.bias", rng.standard_normal(k).astype(np.float32))
    emb = _init(inits, "embed_tokens.weight", rng.standard_normal((V, k)).astype(np.float32))
    shape2d = _init(inits, "shape2d", np.array([-1, k], dtype=np.int64))
    up = _scoped(ir.Node("", "MatMul", [x, w_up], name="node_linear"), "lm.layers.0.mlp.up_proj")
    act = ir.Node("", "Relu", [up.outputs[0]], name="node_relu")
    down = _scoped(ir.Node("", "MatMul", [act.outputs[0], w_down], name="node_linear_1"), "lm.layers.0.mlp.down_proj")
    res = ir.Node("", "Add", [x, down.outputs[0]], name="node_add")
    flat = ir.Node("", "Reshape", [res.outputs[0], shape2d], name="node_reshape")
    proj = _scoped(ir.Node("", "Gemm", [flat.outputs[0], w_proj, b_proj], name="node_gemm"), "lm.layers.1.proj")
    head = ir.Node("", "Gemm", [proj.outputs[0], emb], attributes=[ir.AttrInt64("transB", 1)], name="node_lm_head")
    head.outputs[0].name = "logits"
    head.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [head.outputs[0]], nodes=[up, act, down, res, flat, proj, head], initializers=inits,
                     opset_imports={"": 20}, name="fixture")
    return ir.Model(graph, ir_version=10)


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _numpy_forward(x: np.ndarray, w_up, w_down, w_proj, b_proj, emb) -> np.ndarray:
    """Float64 reference of the fixture graph; weights in the graph's own layout ([K,N] / [V,H])."""
    x = x.astype(np.float64)
    h = x + np.maximum(x @ w_up, 0) @ w_down
    h = h.reshape(-1, x.shape[-1]) @ w_proj + b_proj
    return h @ emb.T


def _dequantized(model: ir.Model, node_name: str) -> np.ndarray:
    """The `[N, K]` weight a converted node computes with, from its own initializers (spec formula)."""
    from qvl.passes.precision import QuantizedWeight

    node = next(n for n in model.graph if n.name == node_name)
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    attrs = {k: a.value for k, a in node.attributes.items()}
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    q = QuantizedWeight(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(),
                        None if zp is None else zp.const_value.numpy(), attrs["bits"], attrs["block_size"],
                        attrs["N"], attrs["K"])
    return dequantize(q)


# -- the pass on a graph built in code ------------------------------------------------------------------------


def test_converts_linear_layers_and_the_tied_lm_head():
    model = fixture_model()
    result = PrecisionPass(PrecisionConfig(weight_bits=4, block_size=32), target=CPU, graph="decoder")(model)
    r = result.report
    assert [n.op_type for n in model.graph] == LINEAR_OPS
    assert [n.domain for n in model.graph if n.op_type == "MatMulNBits"] == ["com.microsoft"] * 4
    assert r.counts == {"matmulnbits": 4, "dynamic_int8": 0, "from_matmul": 2, "from_gemm": 2, "lm_head": 1,
                        "embedding_table": 0}  # tied: the table is the lm_head's (untied: test_untied_embeddings.py)
    assert r.skipped == []
    head = next(n for n in model.graph if n.name == "node_lm_head")
    attrs = {k: a.value for k, a in head.attributes.items()}
    assert attrs == {"K": H, "N": V, "bits": 4, "block_size": 32, "accuracy_level": 4}
    assert head.inputs[0] is next(n for n in model.graph if n.name == "node_gemm").outputs[0]
    assert [v.name for v in head.inputs[1:]] == ["embed_tokens.weight.q", "embed_tokens.weight.scales"]
    assert tuple(head.inputs[1].shape) == (V, H // 32, 16) and head.inputs[1].dtype == ir.DataType.UINT8
    assert tuple(head.inputs[2].shape) == (V * H // 32,) and head.inputs[2].dtype == ir.DataType.FLOAT
    # The fp32 matrix is gone (stored once, quantized) and the report says where the packed one is.
    assert "embed_tokens.weight" not in model.graph.initializers
    emb = r.details["embedding"]
    assert emb == {"source": "embed_tokens.weight", "B": "embed_tokens.weight.q", "scales": "embed_tokens.weight.scales",
                   "zero_points": None, "bits": 4, "block_size": 32, "shape": [V, H], "fp32_removed": True}
    # The biased Gemm keeps its bias as MatMulNBits' bias input (index 5).
    gemm = next(n for n in model.graph if n.name == "node_gemm")
    assert len(gemm.inputs) == 6 and gemm.inputs[3] is None and gemm.inputs[4] is None
    assert gemm.inputs[5].name == "proj.bias"
    # Layer grouping from name scopes; exporter-numbered weights are renamed after their module.
    layers = r.details["layers"]
    assert set(layers) == {"decoder.layers.0", "decoder.layers.1", "decoder.lm_head"}
    assert layers["decoder.layers.0"]["nodes"] == ["node_linear", "node_linear_1"]
    assert "lm.layers.0.mlp.up_proj.weight.q" in model.graph.initializers
    before = (H * F * 2 + H * H + H + V * H) * 4
    assert r.details["bytes_before"] == before
    packed = (H * F * 2 + H * H + V * H) // 2
    scales = (F * H // 32 + H * F // 32 + H * H // 32 + V * H // 32) * 4
    assert r.details["bytes_after"] == packed + scales + H * 4
    # Nothing but float32 activations and uint8/float32/int64 constants: no fp16/bf16 anywhere.
    assert {v.dtype for v in model.graph.initializers.values()} <= {ir.DataType.FLOAT, ir.DataType.UINT8, ir.DataType.INT64}
    assert r.details["activation_dtype"] == "float32"


@pytest.mark.parametrize("bits,symmetric,rel_tol", [(8, True, 0.02), (8, False, 0.02), (4, True, 0.3), (4, False, 0.3)])
def test_ort_matches_numpy_dequantized_reference(bits, symmetric, rel_tol):
    """ORT (accuracy_level 0: fp32 compute) == float64 forward pass on the spec-dequantized weights."""
    fp32 = fixture_model(seed=1)
    model = fixture_model(seed=1)
    PrecisionPass(PrecisionConfig(weight_bits=bits, block_size=32, accuracy_level=0, symmetric=symmetric), target=CPU, graph="decoder")(model)
    if not symmetric:
        assert "embed_tokens.weight.zp" in model.graph.initializers
    x = np.random.default_rng(2).standard_normal((2, 5, H)).astype(np.float32)
    got = _session(model).run(None, {"x": x})[0]
    exact = _session(fp32).run(None, {"x": x})[0]
    w = {n.name: _dequantized(model, n.name) for n in model.graph if n.op_type == "MatMulNBits"}
    ref = _numpy_forward(x, w["node_linear"].T, w["node_linear_1"].T, w["node_gemm"].T,
                         fp32.graph.initializers["proj.bias"].const_value.numpy(), w["node_lm_head"])
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-5 * scale, (np.abs(got - ref).max(), scale)
    # And the quantization itself is within what int8 / int4 weights should cost on this toy.
    assert np.abs(got - exact).max() <= rel_tol * np.abs(exact).max()


@pytest.mark.parametrize("bits,block_size", [(8, 32), (8, 128), (4, 32), (4, 64)])
def test_accuracy_level_4_error_within_int8_activation_bound(bits, block_size):
    """accuracy_level 4 quantizes A per block to int8 (|error| <= amax/254 per element): bounded, not exact."""
    rng = np.random.default_rng(3)
    k, n = 256, 80
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = quantize_blockwise(w, bits, block_size, symmetric=True)
    inits = []
    a = ir.Value(name="A", shape=ir.Shape([7, k]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = _init(inits, "w", np.ascontiguousarray(w.T))
    mm = ir.Node("", "MatMul", [a, wv], name="mm")
    mm.outputs[0].name = "Y"
    model = ir.Model(ir.Graph([a], [mm.outputs[0]], nodes=[mm], initializers=inits, opset_imports={"": 20}), ir_version=10)
    PrecisionPass(PrecisionConfig(weight_bits=bits, block_size=block_size, accuracy_level=4), target=CPU, graph="vision")(model)
    x = rng.standard_normal((7, k)).astype(np.float32)
    got = _session(model).run(None, {"A": x})[0]
    wd = dequantize(q)
    assert np.array_equal(_dequantized(model, "mm"), wd)  # same packing as the standalone quantizer
    ref = x.astype(np.float64) @ wd.T
    amax = np.abs(x.reshape(7, k // block_size, block_size)).max(-1)
    bound = (amax / 254.0) @ np.abs(wd).reshape(n, k // block_size, block_size).sum(-1).T
    assert np.all(np.abs(got - ref) <= bound + 1e-4), (np.abs(got - ref) / bound).max()


def test_k_not_divisible_by_block_size_is_skipped_with_reason():
    model = fixture_model(k=48)  # every layer but the MLP down projection (K=128) has K=48
    r = PrecisionPass(PrecisionConfig(weight_bits=8, block_size=32), target=CPU, graph="decoder")(model).report
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMulNBits", "Add", "Reshape", "Gemm", "Gemm"]
    reasons = {s.where: s.reason for s in r.skipped}
    assert reasons == {
        "node_linear": "decoder.layers.0: K=48 not divisible by block_size=32",
        "node_gemm": "decoder.layers.1: K=48 not divisible by block_size=32",
        "node_lm_head": "decoder.lm_head: K=48 not divisible by block_size=32",
    }
    assert r.counts["matmulnbits"] == 1 and r.details["layers"]["decoder.layers.0"]["decision"] == "mixed"
    assert "embed_tokens.weight" in model.graph.initializers and r.details["embedding"] is None


def test_tensorrt_target_is_skipped_and_graph_untouched():
    model = fixture_model()
    r = PrecisionPass(PrecisionConfig(weight_bits=8), target=SM61_TRT, graph="decoder")(model).report
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMul", "Add", "Reshape", "Gemm", "Gemm"]
    assert len(r.skipped) == 1 and r.skipped[0].where == "decoder"
    assert "target sm61 has no ORT contrib ops" in r.skipped[0].reason
    assert r.counts["matmulnbits"] == 0 and not PrecisionPass(PrecisionConfig(), target=SM61_TRT, graph="decoder")(model).modified


def test_width_without_fast_kernels_is_skipped_and_sm61_never_gets_fp16():
    model = fixture_model()
    r = PrecisionPass(PrecisionConfig(weight_bits=4), target=SM61_ORT, graph="decoder")(model).report
    assert r.counts["matmulnbits"] == 0
    assert "no fast int4 weight kernels" in r.skipped[0].reason
    r = PrecisionPass(PrecisionConfig(weight_bits=8), target=SM61_ORT, graph="decoder")(model).report
    assert r.counts["matmulnbits"] == 4
    proto = ir.to_proto(model)
    float16 = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    assert not any(v.dtype in float16 for v in model.graph.initializers.values())
    assert not any(n.op_type == "Cast" for n in model.graph) and proto.graph.output[0].type.tensor_type.elem_type == 1


def test_keep_fp32_layers_and_lm_head_switch():
    model = fixture_model()
    cfg = PrecisionConfig(weight_bits=8, keep_fp32=frozenset({"decoder.layers.0"}), include_lm_head=False)
    r = PrecisionPass(cfg, target=CPU, graph="decoder")(model).report
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMul", "Add", "Reshape", "MatMulNBits", "Gemm"]
    reasons = {s.where: s.reason for s in r.skipped}
    assert reasons["node_linear"] == "decoder.layers.0: keep_fp32 (decoder.layers.0)"
    assert reasons["node_lm_head"] == "decoder.lm_head: include_lm_head=False"
    assert r.details["layers"]["decoder.layers.0"]["decision"] == "fp32"
    assert r.details["kept_fp32"] == 3
    # A node name or module scope works too.
    model = fixture_model()
    r = PrecisionPass(PrecisionConfig(keep_fp32=frozenset({"decoder/node_gemm", "lm.layers.0.mlp.up_proj", "vision/node_linear_1"})), target=CPU, graph="decoder")(model).report
    assert {s.where for s in r.skipped} == {"node_gemm", "node_linear"}


def test_idempotent():
    model = fixture_model()
    first = PrecisionPass(PrecisionConfig(weight_bits=4), target=CPU, graph="decoder")(model)
    ops = [(n.op_type, n.name) for n in model.graph]
    inits = sorted(model.graph.initializers)
    second = PrecisionPass(PrecisionConfig(weight_bits=4), target=CPU, graph="decoder")(model)
    assert first.modified and not second.modified
    assert second.report.counts["matmulnbits"] == 0 and second.report.details["already_quantized"] == 4
    assert [(n.op_type, n.name) for n in model.graph] == ops and sorted(model.graph.initializers) == inits
    assert set(second.report.details["layers"]) == {"decoder.layers.0", "decoder.layers.1", "decoder.lm_head"}


def test_config_validation():
    for bad in ({"weight_bits": 3}, {"block_size": 48}, {"block_size": 8}, {"accuracy_level": 2}):
        with pytest.raises(ValueError):
            PrecisionConfig(**bad)


# -- quantized embedding lookup ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits,block_size,symmetric", [(8, 32, True), (8, 64, False), (4, 32, True), (4, 32, False), (4, 64, False)])
def test_embedding_lookup_bit_identical_to_matmulnbits(bits, block_size, symmetric):
    """lookup(ids) == the lm_head MatMulNBits column for a one-hot A (ORT, accuracy_level 0), bit for bit."""
    from qvl.runtime.quantized_embedding import QuantizedEmbedding

    rng = np.random.default_rng(4)
    inits = []
    hidden, vocab = 128, 300
    a = ir.Value(name="A", shape=ir.Shape(["m", hidden]), type=ir.TensorType(ir.DataType.FLOAT))
    emb = _init(inits, "embed_tokens.weight", (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32))
    head = ir.Node("", "Gemm", [a, emb], attributes=[ir.AttrInt64("transB", 1)], name="lm_head")
    head.outputs[0].name = "logits"
    model = ir.Model(ir.Graph([a], [head.outputs[0]], nodes=[head], initializers=inits, opset_imports={"": 20}), ir_version=10)
    cfg = PrecisionConfig(weight_bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    d = PrecisionPass(cfg, target=CPU, graph="decoder")(model).report.details["embedding"]
    g = model.graph.initializers
    table = QuantizedEmbedding(g[d["B"]].const_value.numpy(), g[d["scales"]].const_value.numpy(),
                               g[d["zero_points"]].const_value.numpy() if d["zero_points"] else None, bits, block_size, hidden)
    columns = _session(model).run(None, {"A": np.eye(hidden, dtype=np.float32)})[0].T  # [vocab, hidden]
    ids = np.array([0, 7, vocab - 1, 7, 123])
    assert np.array_equal(table.lookup(ids), columns[ids])
    assert np.array_equal(table[np.arange(vocab)], columns)
    assert table.lookup(ids.reshape(1, 5)).shape == (1, 5, hidden)
    assert np.abs(table.lookup(np.arange(vocab)) - emb.const_value.numpy()).max() <= (0.01 if bits == 8 else 0.1) * 0.05 * 5
    with pytest.raises(IndexError):
        table.lookup([vocab])


# -- the tiny artifact -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_traces(tiny_artifact, tmp_path_factory):
    from qvl.toolchain.quant.accuracy_budget import calibration_cases, trace

    cases = calibration_cases(tmp_path_factory.mktemp("calib"))
    prompts: dict = {}
    return cases, prompts, trace(tiny_artifact, cases, 16, threads=1, prompts=prompts)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_artifact_runs(bits, tiny_artifact, reference_traces, tmp_path, record_property):
    import onnx

    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.quantized_embedding import QuantizedEmbedding
    from qvl.toolchain.quant.accuracy_budget import compare, quantize_artifact, trace

    out = tmp_path / f"int{bits}"
    record = quantize_artifact(tiny_artifact, out, PrecisionConfig(weight_bits=bits))
    manifest = json.loads((out / "manifest.json").read_text())
    fp32_manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    vocab, hidden = fp32_manifest["embedding"]["shape"]
    # Every linear layer converted: 4 layers x 7 + lm_head in the decoder, 6 blocks x 4 + 4 mergers x 2 in vision.
    assert record["converted"] == 29 + 32 and record["skipped"] == []
    assert manifest["steps"][-1]["name"] == "precision" and manifest["precision"]["layers"]["decoder.lm_head"]["decision"] == f"int{bits}"
    for name, n_q in (("decoder", 29), ("vision", 32)):
        g = onnx.load(str(out / f"{name}.onnx"), load_external_data=False).graph
        assert sum(n.op_type == "MatMulNBits" for n in g.node) == n_q
        assert not any(sorted(i.dims) == sorted([vocab, hidden]) for i in g.initializer)  # no fp32 embedding left
        assert not any(n.op_type in ("MatMul", "Gemm") and any(i in {x.name for x in g.initializer} for i in n.input)
                       for n in g.node)
    emb = manifest["embedding"]
    assert emb["format"] == "matmulnbits" and emb["bits"] == bits and emb["shape"] == [vocab, hidden]
    assert emb["packed"]["shape"] == [vocab, hidden // 32, 32 * bits // 8] and emb["zero_points"] is None
    before, after = fp32_manifest["weights"]["bytes"], manifest["weights"]["bytes"]
    assert after < before * (0.35 if bits == 8 else 0.2), (before, after)

    engine = Engine(out, threads=1)
    assert isinstance(engine.embedding, QuantizedEmbedding)
    ids = np.array([1, 151643, 42])
    fp32_rows = Engine(tiny_artifact, threads=1).embed(ids)
    assert np.abs(engine.embed(ids) - fp32_rows).max() <= np.abs(fp32_rows).max() / (2 ** (bits - 1)) * 1.01

    cases, prompts, ref = reference_traces
    got = trace(out, cases, 16, threads=1, prompts=prompts)
    assert all(np.isfinite(l).all() and l.shape == (vocab,) for t in got for l in t.logits)
    m = compare(ref, got)
    record_property(f"int{bits}", {k: v for k, v in m.to_dict().items() if k != "cases"})
    print(f"\nint{bits} vs fp32 over the parity suite: greedy agreement {m.greedy_agreement:.3f}, "
          f"max |dlogit| {m.max_abs_logit_diff:.4g} (relative {m.max_rel_logit_diff:.4g}), mean KL {m.mean_kl:.3g}; "
          f"weights.bin {before} -> {after} bytes")
    if bits == 8:  # int8 weights on the decisive tiny model keep every greedy token
        assert m.greedy_agreement >= 0.9 and m.max_rel_logit_diff < 0.1


def test_budget_rolls_back_costliest_layers(tiny_artifact, reference_traces, tmp_path):
    """int4 decoder over a strict budget: per-layer costs are measured, rolled back in order until within."""
    from qvl.runtime.model import Model
    from qvl.toolchain.quant.accuracy_budget import AccuracyBudget, apply_with_budget

    cases = [c for c in reference_traces[0] if c[0] in ("text-only", "image-square")]
    budget = AccuracyBudget(max_mean_kl=0.02, min_greedy_agreement=1.0, decode_steps=6)
    cfg = PrecisionConfig(weight_bits=4, graphs=("decoder",))
    out = tmp_path / "budgeted"
    result = apply_with_budget(tiny_artifact, out, cfg, budget, cases=cases, threads=1)
    print(f"\nbudget: all-int4 {result.all_quantized.greedy_agreement:.3f} agreement / KL {result.all_quantized.mean_kl:.3g}; "
          f"rolled back {result.rolled_back}; final {result.measured.greedy_agreement:.3f} / {result.measured.mean_kl:.3g}")
    layers = {"decoder.layers.0", "decoder.layers.1", "decoder.layers.2", "decoder.layers.3", "decoder.lm_head"}
    assert set(result.decisions) == layers
    assert not result.all_quantized.within(budget)  # int4 on random weights is over this budget
    assert set(result.layer_scores) == layers and result.rolled_back
    scores = [result.layer_scores[k]["score"] for k in result.rolled_back]
    assert scores == sorted(scores, reverse=True)
    assert result.within_budget and result.measured.within(budget)
    assert result.evaluations == 1 + len(layers) + len(result.rolled_back)
    assert {k for k, v in result.decisions.items() if v == "fp32"} == set(result.rolled_back)
    assert all(v == "int4" for k, v in result.decisions.items() if k not in result.rolled_back)

    manifest = json.loads((out / "manifest.json").read_text())
    search = manifest["precision"]["budget_search"]
    assert search["decisions"] == result.decisions and search["within_budget"] is True
    assert search["measured"]["greedy_agreement"] == result.measured.greedy_agreement
    quantized_head = result.decisions["decoder.lm_head"] == "int4"
    assert (manifest["embedding"].get("format") == "matmulnbits") == quantized_head
    Model(out, threads=1)  # loads (graph hashes, embedding entry)


@pytest.mark.slow
def test_budget_full_search_vision_and_decoder(tiny_artifact, tmp_path):
    """The whole search: int4 vision + decoder on the full parity suite, 16 decode steps."""
    from qvl.toolchain.quant.accuracy_budget import AccuracyBudget, apply_with_budget

    budget = AccuracyBudget(max_mean_kl=0.01, min_greedy_agreement=0.95, decode_steps=16)
    result = apply_with_budget(tiny_artifact, tmp_path / "b", PrecisionConfig(weight_bits=4), budget, threads=1)
    print(f"\nfull search: rolled back {result.rolled_back}; decisions {result.decisions}; "
          f"final agreement {result.measured.greedy_agreement:.3f}, KL {result.measured.mean_kl:.3g}, {result.seconds:.0f}s")
    assert result.within_budget
    assert len(result.decisions) == 4 + 1 + 6 + 1 + 3


# -- asymmetric int4 on AVX2 (onnxruntime issue #29853) ------------------------------------------------------


def test_asymmetric_int4_with_int8_compute_is_refused_on_avx2_and_allowed_elsewhere():
    """ORT's AVX2 int4 decode kernel with zero points and accuracy_level 4 is reported ~46 % wrong on AVX2-only CPUs:
    the cpu-avx2 target refuses that one combination (not a skip: fp32 layers would silently ignore the request)."""
    asym4 = PrecisionConfig(weight_bits=4, block_size=32, accuracy_level=4, symmetric=False)
    with pytest.raises(ValueError, match="#29853"):
        PrecisionPass(asym4, target=CPU, graph="decoder")(fixture_model())
    assert not CPU.asymmetric_int4_int8_compute and get_target("cpu-avx512").asymmetric_int4_int8_compute
    # Everything else on cpu-avx2 still compiles: symmetric int4 at level 4, asymmetric int4 at level 0, asymmetric int8.
    for cfg in (PrecisionConfig(weight_bits=4, block_size=32, accuracy_level=4),
                PrecisionConfig(weight_bits=4, block_size=32, accuracy_level=0, symmetric=False),
                PrecisionConfig(weight_bits=8, block_size=32, accuracy_level=4, symmetric=False)):
        model = fixture_model()
        assert PrecisionPass(cfg, target=CPU, graph="decoder")(model).report.counts["matmulnbits"] == 4
    # On an AVX-512 target the asymmetric level-4 graph is built and computes what its dequantized weights say.
    model, fp32 = fixture_model(seed=3), fixture_model(seed=3)
    PrecisionPass(asym4, target=get_target("cpu-avx512"), graph="decoder")(model)
    assert [n.op_type for n in model.graph] == LINEAR_OPS and "embed_tokens.weight.zp" in model.graph.initializers
    x = np.random.default_rng(4).standard_normal((1, 3, H)).astype(np.float32)
    got, exact = _session(model).run(None, {"x": x})[0], _session(fp32).run(None, {"x": x})[0]
    assert np.abs(got - exact).max() <= 0.3 * np.abs(exact).max()


def test_cli_refuses_asymmetric_int4_for_cpu_avx2_before_writing(tiny_artifact, tmp_path):
    from conftest import assert_one_line_error, run_cli

    out = tmp_path / "asym"
    proc = run_cli("compile", str(tiny_artifact), "--weights", "int4", "--asymmetric", "--no-budget", "--out", str(out))
    assert proc.returncode == 2
    assert_one_line_error(proc, "#29853", "cpu-avx2")
    assert "--asymmetric" in proc.stderr and not out.exists()
    proc = run_cli("compile", str(tiny_artifact), "--asymmetric", "--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert_one_line_error(proc, "--asymmetric needs --weights")
    # The same request for cpu-avx512 compiles, records the zero points and answers.
    proc = run_cli("compile", str(tiny_artifact), "--target", "cpu-avx512", "--weights", "int4", "--asymmetric",
                   "--no-budget", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"]["config"]["symmetric"] is False and manifest["embedding"]["zero_points"] is not None
    proc = run_cli("run", str(out), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    # cpu-avx512 keeps the full int8 range for its DynamicQuantizeMatMul vision weights (VNNI accumulates in int32);
    # on a host without VNNI the runtime says those can saturate.
    from qvl.runtime.backends.select import host_has_vnni

    assert manifest["precision"]["config"]["dynamic_int8_weight_max"] == 127
    saturation_note = "can saturate" in proc.stderr and "--target cpu-avx2" in proc.stderr
    assert saturation_note == (host_has_vnni() is False), proc.stderr


def test_cpu_avx2_dynamic_int8_codes_stay_within_63_and_do_not_saturate():
    # MLAS's u8s8 GEMM without VNNI sums pairs of u8 x s8 products in saturating int16: codes within +-63 cannot
    # overflow it, full-range codes can (measured: 10 % max error at the vision shape on an AVX2 host).
    from qvl.passes.precision import quantize_columns_int8

    assert CPU.dynamic_int8_weight_max == 63 and get_target("cpu-avx512").dynamic_int8_weight_max == 127
    fp32, model = fixture_model(seed=8), fixture_model(seed=8)
    cfg = PrecisionConfig(weight_bits=8, dynamic_int8_graphs=("decoder",), dynamic_int8_weight_max=63)
    PrecisionPass(cfg, target=CPU, graph="decoder")(model)
    up = next(n for n in model.graph if n.name == "node_linear")
    codes, scale = quantize_columns_int8(fp32.graph.initializers["val_10"].const_value.numpy(), 63)
    got_codes = up.inputs[1].const_value.numpy()
    assert np.array_equal(got_codes, codes) and np.abs(got_codes).max() == 63
    assert np.array_equal(up.inputs[2].const_value.numpy(), scale)
    # Large activations (u8 codes near 255 after per-tensor quantization) on many rows: within int8 error everywhere.
    x = (np.random.default_rng(9).standard_normal((4, 64, H)) * 3).astype(np.float32)
    got, exact = _session(model).run(None, {"x": x})[0], _session(fp32).run(None, {"x": x})[0]
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max(), np.abs(got - exact).max() / np.abs(exact).max()
    with pytest.raises(ValueError, match="dynamic_int8_weight_max"):
        PrecisionConfig(dynamic_int8_weight_max=128)


# -- DynamicQuantizeMatMul for the graphs the target picks (M >> 1) ---------------------------------------------


def test_dynamic_int8_graph_uses_dynamic_quantize_matmul_and_keeps_lm_head_nbits():
    from qvl.passes.precision import quantize_columns_int8

    fp32, model = fixture_model(seed=5), fixture_model(seed=5)
    cfg = PrecisionConfig(weight_bits=4, block_size=32, dynamic_int8_graphs=("decoder",))
    r = PrecisionPass(cfg, target=CPU, graph="decoder")(model).report
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul", "Add",
                                                "Reshape", "DynamicQuantizeMatMul", "MatMulNBits"]
    assert r.counts["dynamic_int8"] == 3 and r.counts["matmulnbits"] == 1 and r.counts["lm_head"] == 1
    gemm = next(n for n in model.graph if n.name == "node_gemm")
    assert gemm.inputs[3] is None and gemm.inputs[4].name == "proj.bias"  # no zero point, the bias kept
    assert r.details["layers"]["decoder.layers.0"]["kernel"] == "dynamic_int8"
    # Codes and scales are the per-column symmetric int8 of the [K, N] weight.
    up = next(n for n in model.graph if n.name == "node_linear")
    codes, scale = quantize_columns_int8(fp32.graph.initializers["val_10"].const_value.numpy())
    assert np.array_equal(up.inputs[1].const_value.numpy(), codes) and np.array_equal(up.inputs[2].const_value.numpy(), scale)
    # ORT computes within int8 error of the fp32 graph (activations quantized per tensor at run time).
    x = np.random.default_rng(6).standard_normal((2, 5, H)).astype(np.float32)
    got, exact = _session(model).run(None, {"x": x})[0], _session(fp32).run(None, {"x": x})[0]
    assert np.abs(got - exact).max() <= 0.15 * np.abs(exact).max(), np.abs(got - exact).max() / np.abs(exact).max()
    # Idempotent: a second run finds nothing to convert.
    again = PrecisionPass(cfg, target=CPU, graph="decoder")(model)
    assert not again.modified and again.report.details["already_quantized"] == 4


def test_dynamic_int8_only_in_the_listed_graphs_and_k_block_rule_does_not_apply():
    model = fixture_model(seed=7, k=48)  # K=48: not a multiple of block 32 -> MatMulNBits sites skip, dynamic ones don't
    r = PrecisionPass(PrecisionConfig(weight_bits=8, block_size=32, dynamic_int8_graphs=("vision",)), target=CPU,
                      graph="decoder")(model).report
    assert r.counts["dynamic_int8"] == 0 and any("not divisible by block_size" in s.reason for s in r.skipped)
    model = fixture_model(seed=7, k=48)
    r = PrecisionPass(PrecisionConfig(weight_bits=8, block_size=32, dynamic_int8_graphs=("decoder",)), target=CPU,
                      graph="decoder")(model).report
    # up (K=48), down (K=128) and proj (K=48) convert; the lm_head stays MatMulNBits and K=48 skips it, with the reason
    assert r.counts["dynamic_int8"] == 3 and r.counts["matmulnbits"] == 0
    assert [s.reason for s in r.skipped] == ["decoder.lm_head: K=48 not divisible by block_size=32"]
