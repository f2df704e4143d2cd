"""Structured MLP channel sparsity (SwiGLU intermediate channels sliced away) and its accuracy budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qvl.passes.sparsity import METADATA_KEY, MlpChannelSparsityPass, SparsityConfig, channel_scores, kept_indices
from qvl.toolchain.compile.targets import get_target

CPU = get_target("cpu-avx2")
SM61_TRT = get_target("sm61")  # TensorRT: slicing is plain ONNX, so it applies there too

K, F = 16, 64  # hidden, MLP width of the fixture
MLP_OPS = ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul", "MatMul"]
TWO_LAYER_OPS = MLP_OPS + ["Add"] + MLP_OPS + ["Add"]


def _scoped(node: onnx.NodeProto, scope: str) -> onnx.NodeProto:
    e = node.metadata_props.add()
    e.key, e.value = "pkg.torch.onnx.name_scopes", repr(["", scope.rsplit(".", 1)[0], scope, node.name])
    return node


def _weights(seed: int, layers: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"gate": (rng.standard_normal((K, F)) / np.sqrt(K)).astype(np.float32),
             "up": (rng.standard_normal((K, F)) / np.sqrt(K)).astype(np.float32),
             "down": (rng.standard_normal((F, K)) / np.sqrt(F)).astype(np.float32)} for _ in range(layers)]


def swiglu_model(weights: list[dict[str, np.ndarray]], activation: str = "silu") -> ir.Model:
    """x -> [h + down(silu(gate(h)) * up(h))] per layer -> y, exported like torch does (weights [K,F]/[F,K]).

    `activation="relu"`: a plain (non-gated) MLP `down(relu(up(h)))` instead, as a pattern mismatch.
    """
    k, f = weights[0]["down"].shape[::-1]
    nodes, inits, infos = [], [], []
    h = "x"
    for i, w in enumerate(weights):
        p, scope = f"l{i}", f"lm.layers.{i}.mlp"
        for name in ("gate", "up", "down"):
            inits.append(numpy_helper.from_array(w[name], f"{p}.{name}"))
        if activation == "silu":
            nodes += [
                _scoped(helper.make_node("MatMul", [h, f"{p}.gate"], [f"{p}_g"], name=f"{p}_gate"), f"{scope}.gate_proj"),
                _scoped(helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_s"], name=f"{p}_sigmoid"), f"{scope}.act_fn"),
                _scoped(helper.make_node("Mul", [f"{p}_g", f"{p}_s"], [f"{p}_a"], name=f"{p}_silu"), f"{scope}.act_fn"),
                _scoped(helper.make_node("MatMul", [h, f"{p}.up"], [f"{p}_u"], name=f"{p}_up"), f"{scope}.up_proj"),
                _scoped(helper.make_node("Mul", [f"{p}_a", f"{p}_u"], [f"{p}_h"], name=f"{p}_mul"), scope + ".mul"),
                _scoped(helper.make_node("MatMul", [f"{p}_h", f"{p}.down"], [f"{p}_y"], name=f"{p}_down"), f"{scope}.down_proj"),
            ]
            inter = ("g", "s", "a", "u", "h")
        else:
            inits = [t for t in inits if t.name != f"{p}.gate"]
            nodes += [
                _scoped(helper.make_node("MatMul", [h, f"{p}.up"], [f"{p}_u"], name=f"{p}_up"), f"{scope}.up_proj"),
                _scoped(helper.make_node("Relu", [f"{p}_u"], [f"{p}_h"], name=f"{p}_relu"), f"{scope}.act_fn"),
                _scoped(helper.make_node("MatMul", [f"{p}_h", f"{p}.down"], [f"{p}_y"], name=f"{p}_down"), f"{scope}.down_proj"),
            ]
            inter = ("u", "h")
        infos += [helper.make_tensor_value_info(f"{p}_{v}", onnx.TensorProto.FLOAT, ["batch", "seq", f]) for v in inter]
        nodes.append(helper.make_node("Add", [h, f"{p}_y"], [f"{p}_out"], name=f"{p}_residual"))
        h = f"{p}_out"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", k])], inits, value_info=infos)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return _session(model).run(None, {"x": x})[0]


def _numpy_forward(x: np.ndarray, weights: list[dict[str, np.ndarray]]) -> np.ndarray:
    h = x.astype(np.float64)
    for w in weights:
        g = h @ w["gate"]
        h = h + (g / (1 + np.exp(-g)) * (h @ w["up"])) @ w["down"]
    return h


def _init(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


# -- the pass on graphs built in code -------------------------------------------------------------------------


def test_prunes_every_layer_op_list_unchanged_initializers_smaller():
    model = swiglu_model(_weights(0))
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25, align=16), target=CPU, graph="decoder")(model).report
    assert [n.op_type for n in model.graph] == TWO_LAYER_OPS
    for p in ("l0", "l1"):
        assert _init(model, f"{p}.gate").shape == (K, 48)
        assert _init(model, f"{p}.up").shape == (K, 48)
        assert _init(model, f"{p}.down").shape == (48, K)
        # intermediate shape annotations follow the new width (ORT checks them)
        for v in ("g", "s", "a", "u", "h"):
            value = next(o for n in model.graph for o in n.outputs if o.name == f"{p}_{v}")
            assert list(value.shape)[-1] == 48
    assert r.counts == {"layers_pruned": 2, "channels_removed": 32, "bytes_saved": 2 * 3 * K * 16 * 4}
    assert r.skipped == []
    layers = r.details["layers"]
    assert set(layers) == {"decoder.layers.0", "decoder.layers.1"}
    l0 = layers["decoder.layers.0"]
    assert (l0["decision"], l0["channels_before"], l0["channels_after"]) == ("pruned", F, 48)
    assert (l0["bytes_before"], l0["bytes_after"], l0["bytes_saved"]) == (3 * K * F * 4, 3 * K * 48 * 4, 3 * K * 16 * 4)
    assert l0["nodes"] == ["l0_gate", "l0_up", "l0_down"]
    assert l0["score_removed_max"] <= l0["score_kept_min"]
    assert r.details["bytes_before"] - r.details["bytes_after"] == r.counts["bytes_saved"]
    mark = json.loads(next(n for n in model.graph if n.name == "l0_down").metadata_props[METADATA_KEY])
    assert mark == {"channels_before": F, "channels_after": 48, "ratio": 0.25}
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT}
    # The same on a TensorRT target: standard ONNX slicing, nothing target-specific.
    trt = swiglu_model(_weights(0))
    assert MlpChannelSparsityPass(SparsityConfig(ratio=0.25, align=16), target=SM61_TRT, graph="decoder")(trt).report.counts == r.counts


def test_removed_channels_are_exactly_the_zeroed_ones_ort_output_unchanged():
    """Zero 16 channels (via Wg columns, Wu columns or Wd rows): those and only those go; output identical."""
    weights = _weights(1)
    rng = np.random.default_rng(5)
    dead = []
    for w in weights:
        idx = np.sort(rng.choice(F, 16, replace=False))
        w["gate"][:, idx[:5]] = 0.0  # silu(0) = 0
        w["up"][:, idx[5:10]] = 0.0  # * 0
        w["down"][idx[10:], :] = 0.0  # contributes 0
        dead.append(idx)
    dense = swiglu_model(weights)
    pruned = swiglu_model(weights)
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25, align=1), target=CPU, graph="decoder")(pruned).report
    assert r.counts["channels_removed"] == 32
    for i, (w, idx) in enumerate(zip(weights, dead)):
        keep = np.setdiff1d(np.arange(F), idx)
        assert np.array_equal(kept_indices(channel_scores(w["gate"], w["up"], w["down"]), 48), keep)
        assert np.array_equal(_init(pruned, f"l{i}.gate"), w["gate"][:, keep])
        assert np.array_equal(_init(pruned, f"l{i}.up"), w["up"][:, keep])
        assert np.array_equal(_init(pruned, f"l{i}.down"), w["down"][keep, :])
        assert r.details["layers"][f"decoder.layers.{i}"]["score_removed_max"] == 0.0
    x = np.random.default_rng(2).standard_normal((2, 5, K)).astype(np.float32)
    before, after = _run(dense, x), _run(pruned, x)
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    np.testing.assert_allclose(before, _numpy_forward(x, weights), atol=1e-5, rtol=0)


def test_pruned_graph_computes_the_mlp_without_the_removed_channels():
    """Non-zero channels removed: ORT on the sliced graph == float64 dense MLP with those channels masked out."""
    weights = _weights(3)
    model = swiglu_model(weights)
    MlpChannelSparsityPass(SparsityConfig(ratio=0.5, align=8), target=CPU, graph="decoder")(model)
    masked = []
    for w in weights:
        keep = kept_indices(channel_scores(w["gate"], w["up"], w["down"]), 32)
        d = np.zeros_like(w["down"])
        d[keep] = w["down"][keep]
        masked.append({**w, "down": d})
    x = np.random.default_rng(4).standard_normal((1, 7, K)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _numpy_forward(x, masked), atol=1e-5, rtol=0)


def test_score_ranks_by_product_of_norms_and_align_rounds_up():
    g = np.ones((4, 6), np.float32)
    u = np.ones((4, 6), np.float32)
    d = np.ones((6, 4), np.float32)
    g[:, 1] *= 3.0
    u[:, 4] *= 0.5
    d[2] *= 0.1
    s = channel_scores(g, u, d)
    assert np.allclose(s, [8, 24, 0.8, 8, 4, 8])
    assert kept_indices(s, 4).tolist() == [0, 1, 3, 5]  # drop 2 then 4
    assert kept_indices(np.ones(4), 2).tolist() == [2, 3]  # ties: lower index removed first
    assert SparsityConfig(ratio=0.25, align=32).kept_channels(6144) == 4608
    assert SparsityConfig(ratio=0.3, align=32).kept_channels(6144) == 4320  # 4301 -> up to 135 x 32
    assert SparsityConfig(ratio=0.1, align=32).kept_channels(64) == 64  # rounding keeps everything
    assert SparsityConfig(ratio=0.0).kept_channels(128) == 128
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"align": 0}):
        with pytest.raises(ValueError):
            SparsityConfig(**bad)


def test_non_swiglu_mlp_is_skipped_with_reason():
    model = swiglu_model(_weights(0, layers=1), activation="relu")
    before = ir.to_proto(model).SerializeToString()
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25), target=CPU, graph="decoder")(model).report
    assert r.counts == {"layers_pruned": 0, "channels_removed": 0, "bytes_saved": 0}
    assert [(s.where, s.reason) for s in r.skipped] == [
        ("decoder.layers.0", "pattern mismatch: l0_down: down projection input comes from Relu, not Mul(silu(gate), up)")]
    assert r.details["layers"]["decoder.layers.0"]["decision"] == "skipped"
    assert ir.to_proto(model).SerializeToString() == before


def test_intermediate_used_outside_the_mlp_is_skipped():
    model = swiglu_model(_weights(0, layers=1))
    g = next(n for n in model.graph if n.name == "l0_gate").outputs[0]
    model.graph.outputs.append(g)  # e.g. a debug output: slicing would change it
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25), target=CPU, graph="decoder")(model).report
    assert r.counts["layers_pruned"] == 0
    assert r.skipped[0].reason == "pattern mismatch: l0_down: intermediate l0_g is used outside the MLP (slicing would change it)"
    assert _init(model, "l0.gate").shape == (K, F)


def test_quantized_mlp_is_skipped_sparsity_runs_before_precision():
    from qvl.passes.precision import PrecisionConfig, PrecisionPass

    model = swiglu_model(_weights(0))
    PrecisionPass(PrecisionConfig(weight_bits=8, block_size=16), target=CPU, graph="decoder")(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 6
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25), target=CPU, graph="decoder")(model).report
    assert r.counts["layers_pruned"] == 0 and [n.op_type for n in model.graph] == ops
    assert {s.where for s in r.skipped} == {"decoder.layers.0", "decoder.layers.1"}
    assert all(s.reason == "MatMulNBits weights (l{}_gate): already quantized; sparsity needs fp32 weights and runs "
               "before precision".format(s.where[-1]) for s in r.skipped)
    # The other order works: prune, then quantize (align keeps the down projection's K a block multiple).
    model = swiglu_model(_weights(0))
    MlpChannelSparsityPass(SparsityConfig(ratio=0.25, align=16), target=CPU, graph="decoder")(model)
    q = PrecisionPass(PrecisionConfig(weight_bits=8, block_size=16), target=CPU, graph="decoder")(model).report
    assert q.counts["matmulnbits"] == 6 and q.skipped == []


def test_layers_keep_and_graph_selection():
    model = swiglu_model(_weights(0))
    r = MlpChannelSparsityPass(SparsityConfig(layers=frozenset({"decoder.layers.1"}), align=16), target=CPU, graph="decoder")(model).report
    assert _init(model, "l0.gate").shape == (K, F) and _init(model, "l1.gate").shape == (K, 48)
    assert [(s.where, s.reason) for s in r.skipped] == [("decoder.layers.0", "not in config.layers")]
    model = swiglu_model(_weights(0))
    r = MlpChannelSparsityPass(SparsityConfig(keep=frozenset({"decoder.layers.0"}), align=16), target=CPU, graph="decoder")(model).report
    assert _init(model, "l0.gate").shape == (K, F) and _init(model, "l1.gate").shape == (K, 48)
    assert [(s.where, s.reason) for s in r.skipped] == [("decoder.layers.0", "kept dense (config.keep)")]
    assert r.details["layers"]["decoder.layers.0"]["decision"] == "dense"
    model = swiglu_model(_weights(0))
    r = MlpChannelSparsityPass(SparsityConfig(), target=CPU, graph="vision")(model).report
    assert r.counts["layers_pruned"] == 0 and r.skipped[0].reason == "graph not configured for MLP channel sparsity"


def test_ratio_zero_is_a_no_op_and_second_application_skips_already_pruned():
    model = swiglu_model(_weights(0))
    before = ir.to_proto(model).SerializeToString()
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.0), target=CPU, graph="decoder")(model)
    assert not r.modified and ir.to_proto(model).SerializeToString() == before
    assert r.report.details["layers"]["decoder.layers.0"]["reason"] == "ratio 0.0 keeps all 64 channels (align 32)"

    first = MlpChannelSparsityPass(SparsityConfig(ratio=0.25, align=16), target=CPU, graph="decoder")(model)
    assert first.modified
    once = ir.to_proto(model).SerializeToString()
    # Documented semantics: a pruned layer is never pruned again (ratio is of the original width).
    second = MlpChannelSparsityPass(SparsityConfig(ratio=0.5, align=16), target=CPU, graph="decoder")(model)
    assert not second.modified and ir.to_proto(model).SerializeToString() == once
    assert second.report.details["already_pruned"] == 2
    assert {s.reason for s in second.report.skipped} == {
        "already pruned (64 -> 48 channels); ratio applies to the original width"}
    entry = second.report.details["layers"]["decoder.layers.1"]
    assert (entry["decision"], entry["channels_before"], entry["channels_after"]) == ("pruned", 64, 48)


# -- the tiny artifact ----------------------------------------------------------------------------------------


def test_tiny_artifact_pruned_loads_and_generates(tiny_artifact, tmp_path):
    from qvl.runtime.model import Model
    from qvl.toolchain.quant.sparsity_budget import sparsify_artifact

    out = tmp_path / "sparse"
    record = sparsify_artifact(tiny_artifact, out, SparsityConfig(ratio=0.25))
    assert record["layers_pruned"] == 4 and record["channels_removed"] == 4 * 32
    assert {k: (v["channels_before"], v["channels_after"]) for k, v in record["layers"].items()} == {
        f"decoder.layers.{i}": (128, 96) for i in range(4)}
    assert record["mlp_weight_bytes_before"] - record["mlp_weight_bytes_after"] == 4 * 3 * 64 * 32 * 4
    assert {v["bytes_saved"] for v in record["layers"].values()} == {3 * 64 * 32 * 4}
    assert record["skipped"] == [{"graph": "vision", "where": "vision",
                                  "reason": "graph not configured for MLP channel sparsity"}]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparsity"] == record and manifest["steps"][-1]["name"] == "sparsity"
    dense_ops = [n.op_type for n in onnx.load(str(tiny_artifact / "decoder.onnx"), load_external_data=False).graph.node]
    g = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert [n.op_type for n in g.node] == dense_ops
    shapes = sorted(tuple(t.dims) for t in g.initializer if 96 in t.dims)
    assert shapes == [(64, 96)] * 8 + [(96, 64)] * 4
    assert manifest["weights"]["bytes"] < json.loads((tiny_artifact / "manifest.json").read_text())["weights"]["bytes"]
    model = Model(out, threads=1)
    prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    tokens = [t for t, _ in model.generate_ids(prompt, 8, ignore_stop=True)]
    assert len(tokens) == 8


def test_budgeted_sparsity_records_accuracy_and_measured_gain(tiny_artifact, tmp_path, record_property):
    """Strict budget: all-pruned is over it, layers are rolled back by their own cost; gain is measured."""
    from qvl.runtime.model import Model
    from qvl.toolchain.quant.accuracy_budget import AccuracyBudget, calibration_cases
    from qvl.toolchain.quant.sparsity_budget import apply_sparsity_with_budget

    cases = [c for c in calibration_cases(tmp_path / "calib") if c[0] in ("text-only", "image-square")]
    budget = AccuracyBudget(max_mean_kl=0.05, min_greedy_agreement=1.0, decode_steps=6)
    out = tmp_path / "budgeted"
    result = apply_sparsity_with_budget(tiny_artifact, out, SparsityConfig(ratio=0.25), budget, threads=1,
                                        cases=cases, speed_repeats=3, speed_tokens=16)
    layers = {f"decoder.layers.{i}" for i in range(4)}
    assert set(result.decisions) == layers
    assert result.within_budget and result.measured.within(budget)
    if not result.all_pruned.within(budget):
        assert set(result.layer_scores) == layers and result.rolled_back
        scores = [result.layer_scores[k]["score"] for k in result.rolled_back]
        assert scores == sorted(scores, reverse=True)
        assert result.evaluations == 1 + len(layers) + len(result.rolled_back)
    assert {k for k, v in result.decisions.items() if v == "dense"} == set(result.rolled_back)
    gain = result.gain
    assert gain["decode_tok_s_dense"] > 0 and gain["decode_tok_s_pruned"] > 0
    assert gain["decode_speedup"] == pytest.approx(gain["decode_tok_s_pruned"] / gain["decode_tok_s_dense"])
    pruned_layers = len(layers) - len(result.rolled_back)
    assert gain["bytes_per_token_dense"] - gain["bytes_per_token_pruned"] == pruned_layers * 3 * 64 * 32 * 4
    assert gain["statement"].startswith("measured decode speedup" if gain["speed_gain"] else "no measured speed gain")
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["sparsity"]
    assert rec["decisions"] == result.decisions and rec["gain"]["statement"] == gain["statement"]
    search = rec["budget_search"]
    assert search["within_budget"] is True and search["measured"]["greedy_agreement"] == result.measured.greedy_agreement
    assert {"mean_kl", "greedy_agreement"} <= set(search["all_pruned"])
    record_property("sparsity", {"all_pruned": {k: search["all_pruned"][k] for k in ("greedy_agreement", "mean_kl")},
                                 "final": {k: search["measured"][k] for k in ("greedy_agreement", "mean_kl")},
                                 "rolled_back": result.rolled_back, "gain": gain["statement"]})
    print(f"\nsparsity 0.25 on tiny: all-pruned agreement {result.all_pruned.greedy_agreement:.3f} / KL "
          f"{result.all_pruned.mean_kl:.3g}; rolled back {result.rolled_back}; final agreement "
          f"{result.measured.greedy_agreement:.3f} / KL {result.measured.mean_kl:.3g}; bytes/token "
          f"{gain['bytes_per_token_dense']} -> {gain['bytes_per_token_pruned']}; {gain['statement']}")
    Model(out, threads=1)  # loads (graph hashes, embedding entry)


@pytest.mark.slow
def test_2b_shaped_mlp_stack_decode_step_is_faster(record_property):
    """Four Qwen3-VL-2B-shaped MLPs (hidden 2048, width 6144 -> 4608): one decode step (M=1) on ORT CPU, 1 thread.

    Memory-bound: the time should follow the weight bytes (x0.75). Measured, printed, not asserted (shared hosts).
    """
    import statistics
    import time

    rng = np.random.default_rng(0)
    weights = [{"gate": rng.standard_normal((2048, 6144), dtype=np.float32) * 0.02,
                "up": rng.standard_normal((2048, 6144), dtype=np.float32) * 0.02,
                "down": rng.standard_normal((6144, 2048), dtype=np.float32) * 0.02} for _ in range(4)]
    model = swiglu_model(weights)
    sessions = {"dense": _session(model)}
    r = MlpChannelSparsityPass(SparsityConfig(ratio=0.25), target=CPU, graph="decoder")(model).report
    assert r.counts["channels_removed"] == 4 * 1536
    sessions["pruned"] = _session(model)
    del weights, model
    x = rng.standard_normal((1, 1, 2048), dtype=np.float32)

    def per_step(name: str, n: int = 10) -> float:
        t = time.perf_counter()
        for _ in range(n):
            sessions[name].run(None, {"x": x})
        return (time.perf_counter() - t) / n

    for name in sessions:
        per_step(name, 3)
    runs = {"dense": [], "pruned": []}
    for _ in range(7):  # alternating, so drift hits both
        for name in runs:
            runs[name].append(per_step(name))
    dense, pruned = statistics.median(runs["dense"]), statistics.median(runs["pruned"])
    record_property("mlp_stack_speedup", dense / pruned)
    print(f"\n2B-shaped 4-layer MLP stack, one token: dense {dense * 1e3:.2f} ms, pruned {pruned * 1e3:.2f} ms, "
          f"x{dense / pruned:.3f} (weights {r.details['bytes_before'] / 1e6:.0f} -> {r.details['bytes_after'] / 1e6:.0f} MB)")
