"""TensorRT target: engine kit (opset-17 standard ONNX + profiles + memory fit), engine builds, runner logic.

Engines are built with the TensorRT-RTX builder, which parses ONNX and builds on a CPU-only machine.
TensorRT-RTX does not target Pascal, so the sm61 kit is built with `allow_target_mismatch=True`: that
proves every kit graph parses and builds, not that it runs on SM 6.1 (no such hardware here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from qvl.errors import QvlError

CARDS = ("mx250-2gb", "gtx1050-2gb", "gtx1050ti-4gb", "gtx1060-3gb", "gtx1060-6gb")


@pytest.fixture(scope="module")
def sm61_kit(sm61_kit_build):
    return sm61_kit_build  # (kit dir, printed lines): built once per session in conftest


@pytest.fixture(scope="module")
def rtx():
    from qvl.toolchain.tensorrt.build import load_tensorrt

    try:
        return load_tensorrt("tensorrt-rtx")
    except QvlError as exc:
        pytest.skip(f"TensorRT-RTX wheels not importable ({exc}); pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


@pytest.fixture(scope="module")
def built(sm61_kit, rtx, tmp_path_factory):
    from qvl.toolchain.tensorrt.build import build_engine_command

    kit, _ = sm61_kit
    out = tmp_path_factory.mktemp("engines")
    lines: list[str] = []
    t0 = time.perf_counter()
    report = build_engine_command(kit, out, allow_target_mismatch=True, echo=lines.append)
    return report, lines, time.perf_counter() - t0


def _manifest(kit):
    return json.loads((kit / "manifest.json").read_text())


# -- the kit ----------------------------------------------------------------------------------------


def test_sm61_kit_graphs_are_opset_17_standard_onnx(sm61_kit):
    kit, _ = sm61_kit
    m = _manifest(kit)
    assert set(m["graphs"]) == {"vision", "decoder"}
    for name, g in m["graphs"].items():
        model = onnx.load(str(kit / g["file"]), load_external_data=False)
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets == {"": 17}, (name, opsets)
        assert model.ir_version == 8
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), name  # no com.microsoft ops
        assert "Gelu" not in {n.op_type for n in model.graph.node}
        onnx.checker.check_model(str(kit / g["file"]))  # valid at opset 17, external weights included
        assert m["kit"]["graphs"][name]["opset"] == 17
    lowering = {r["graph"]: r for r in m["steps"][-1]["passes"]}
    assert lowering["vision"]["counts"]["gelu_erf"] + lowering["vision"]["counts"]["gelu_tanh"] > 0
    assert lowering["decoder"]["counts"]["opset_converted"] == 1


def test_kit_profiles_are_consistent_and_cover_every_input(sm61_kit):
    kit, lines = sm61_kit
    m = _manifest(kit)
    k = m["kit"]
    assert k["format"] == "qvl-trt-kit" and k["target"] == "sm61"
    ctx, chunk = k["context_length"], k["prefill_chunk"]
    assert ctx == m["model"]["context_length"] == 2048  # the tiny model fits the MX250 at full context
    for name, g in k["graphs"].items():
        inputs = {i["name"] for i in m["graphs"][name]["inputs"]}
        for p in g["profiles"]:
            assert set(p["shapes"]) == inputs
            for s in p["shapes"].values():
                assert all(a <= b <= c for a, b, c in zip(s["min"], s["opt"], s["max"]))
    dec = {p["name"]: p["dims"] for p in k["graphs"]["decoder"]["profiles"]}
    assert set(dec) == {"prefill", "decode"}
    assert dec["decode"]["seq"] == [1, 1, 1] and dec["prefill"]["seq"][2] == chunk
    for dims in dec.values():  # each corner a shape set the graph accepts: total = past + seq
        assert all(dims["total"][i] == dims["past"][i] + dims["seq"][i] for i in range(3))
        assert dims["total"][2] == ctx and dims["batch"] == [1, 1, 1]
    (vis,) = k["graphs"]["vision"]["profiles"]
    assert vis["dims"]["patches"][2] == k["max_image_patches"] and k["max_image_patches"] % 4 == 0
    assert any("opset 17" in line for line in lines)


def test_kit_build_settings_are_fp32_for_sm61(sm61_kit):
    kit, _ = sm61_kit
    b = _manifest(kit)["kit"]["build"]
    assert b["precision"] == "fp32" and b["fp16"] is False and b["int8"] is False  # no Q/DQ in this kit
    assert b["refit"] is True and b["max_onnx_opset"] == 17 and b["fp16_guard"] is True
    assert 0 < b["workspace_bytes"] <= 256 << 20


def test_kit_kv_cache_is_engine_io(sm61_kit):
    kit, _ = sm61_kit
    m = _manifest(kit)
    kv = m["kit"]["kv_cache"]
    dec = m["graphs"]["decoder"]
    assert kv["mode"] == "concat" and m["decoder"]["kv_mode"] == "concat"
    assert set(kv["inputs"]) <= {i["name"] for i in dec["inputs"]}
    assert set(kv["outputs"]) <= {o["name"] for o in dec["outputs"]}
    assert len(kv["inputs"]) == len(kv["outputs"]) == 2 * m["model"]["num_layers"]


def test_kit_runs_in_onnx_runtime_with_parity(sm61_kit, tiny_checkpoint, tmp_path):
    from qvl.toolchain.eval.parity import run_parity

    kit, _ = sm61_kit
    report = run_parity(kit, tiny_checkpoint, tmp_path, threads=1)
    for c in report.cases:
        assert c.greedy_identical and c.max_abs_logit_diff <= 1e-4, (c.name, c.max_abs_logit_diff)
    assert report.passed


def test_sm75_kit_keeps_opset_20_and_builds_with_tensorrt_rtx(tiny_artifact, rtx, tmp_path):
    from qvl.toolchain.tensorrt.build import build_engines
    from qvl.toolchain.tensorrt.kit import make_engine_kit

    report = make_engine_kit(tiny_artifact, "sm75+", tmp_path / "kit75")
    assert all("no ONNX opset ceiling" in r["skipped"][0]["reason"] for r in report.lowering)
    assert report.kit["build"]["fp16"] is True and report.kit["build"]["fp16_guard"] is False
    assert report.kit["memory_fit"]["cards"] == {}  # the SM61 card table is for sm61 kits
    model = onnx.load(str(tmp_path / "kit75" / "vision.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 20 and "Gelu" in {n.op_type for n in model.graph.node}
    built = build_engines(tmp_path / "kit75", graphs=("vision",), library="tensorrt-rtx")  # RTX targets SM 7.5+
    assert built.target_mismatch is None and built.engines["vision"]["bytes"] > 0


def test_non_tensorrt_target_is_a_user_error(tiny_artifact, tmp_path):
    from qvl.toolchain.tensorrt.kit import make_engine_kit

    with pytest.raises(QvlError, match="not a TensorRT target"):
        make_engine_kit(tiny_artifact, "cpu", tmp_path / "k")
    assert not (tmp_path / "k").exists()


# -- INT8 kit: explicit Q/DQ, calibrated, accuracy-budgeted ------------------------------------------


@pytest.fixture(scope="module")
def int8_kit(int8_kit_build):
    return int8_kit_build  # (kit dir, printed lines, report, budget): built once per session in conftest


def test_int8_kit_is_opset_17_standard_onnx_with_qdq_and_never_fp16(int8_kit, sm61_kit):
    kit, lines, report, _ = int8_kit
    m = _manifest(kit)
    fp16 = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for name, g in m["graphs"].items():
        model = onnx.load(str(kit / g["file"]), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import} == {"": 17} and model.ir_version == 8, name
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), name  # no contrib ops
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, name
        assert not any(t.data_type in fp16 for t in model.graph.initializer)
        assert not any(a.name == "to" and a.i in fp16 for n in model.graph.node for a in n.attribute)
        onnx.checker.check_model(str(kit / g["file"]))
    b = m["kit"]["build"]
    assert b["int8"] is True and b["fp16"] is False and b["precision"] == "fp32+int8(explicit Q/DQ)"
    p = m["precision"]
    assert p["pass"] == "qdq_int8" and p["config"]["weight_format"] == "float_qdq"  # TensorRT 8.6: fp32 Q/DQ weights
    assert p["calibration"]["cases"] == ["text-only", "image-square", "image-wide", "image-tall", "two-images", "chunked-prefill"]
    assert p["calibration"]["alpha"] == 0.5 and p["calibration"]["activation_sites"] == {"vision": 32, "decoder": 17}
    assert p["config"]["include_lm_head"] is True  # the kit quantizes the tied lm_head too (its fp32 table stays)
    # Layers are whole transformer layers / vision blocks (re-attributed after opset lowering dropped metadata).
    assert {k for k in p["decisions"] if k.startswith("decoder.")} == {f"decoder.layers.{i}" for i in range(4)} | {"decoder.lm_head"}
    search = p["budget_search"]
    assert search["within_budget"] is True and search["measured"]["mean_kl"] <= 0.01
    assert search["measured"]["greedy_agreement"] >= 0.9
    assert {k for k, v in p["decisions"].items() if v == "fp32"} == set(search["rolled_back"])
    lm_head_int8 = "decoder.lm_head" not in search["rolled_back"]
    assert p["decisions"]["decoder.lm_head"] == ("int8" if lm_head_int8 else "fp32")
    # the runtime's embedding table is still the one fp32 matrix in the weight store
    assert m["embedding"]["dtype"] == "float32" and m["embedding"]["shape"][0] == m["model"]["vocab_size"]
    assert report.precision["decisions"] == p["decisions"]
    # Memory fit counts the quantized weights as int8 (TensorRT stores them so), not as the fp32 bytes on disk.
    fp32_fit = _manifest(sm61_kit[0])["kit"]["memory_fit"]["footprint"]
    fit = m["kit"]["memory_fit"]["footprint"]
    if lm_head_int8:  # int8 codes (TensorRT quantizes the fp32 table at build): a quarter of the fp32 bytes
        assert fit["lm_head_bytes"] == fp32_fit["lm_head_bytes"] // 4, (fit["lm_head_bytes"], fp32_fit["lm_head_bytes"])
    else:
        assert fit["lm_head_bytes"] == fp32_fit["lm_head_bytes"]
    q_bytes = p["linear_weight_bytes_before"] - p["linear_weight_bytes_after"]
    assert q_bytes > 0
    parts = ("vision_weight_bytes", "decoder_layer_weight_bytes", "lm_head_bytes")
    saved = sum(fp32_fit[k] for k in parts) - sum(fit[k] for k in parts)
    assert saved > 0.5 * q_bytes, (saved, q_bytes)  # norms/scales added back are small
    assert any("accuracy budget met" in line for line in lines) and any("int8=on" in line for line in lines)
    print(f"\nint8 kit: {p['converted']} linear layers INT8, rolled back {search['rolled_back']}; vs the fp32 kit: "
          f"mean KL {search['measured']['mean_kl']:.4g}, greedy agreement {search['measured']['greedy_agreement']:.3f} "
          f"(all INT8: KL {search['all_quantized']['mean_kl']:.4g}, agreement {search['all_quantized']['greedy_agreement']:.3f})")


def test_int8_kit_runs_the_parity_suite_in_onnx_runtime_within_the_budget(int8_kit, tiny_checkpoint, tmp_path):
    """Against eager PyTorch fp32: the parity suite (32 greedy steps) and KL / agreement on its prompts."""
    from qvl.toolchain.quant.accuracy_budget import Trace, compare, trace
    from qvl.toolchain.eval.parity import run_parity, suite_cases, suite_images
    from qvl.toolchain.eval.reference import EagerReference

    kit, _, _, budget = int8_kit
    report = run_parity(kit, tiny_checkpoint, tmp_path, threads=1, logit_tol=float("inf"), vision_tol=float("inf"))
    assert len(report.cases) == 6
    agree = total = 0
    for c in report.cases:
        n = 0
        while n < min(len(c.eager_tokens), len(c.artifact_tokens)) and c.eager_tokens[n] == c.artifact_tokens[n]:
            n += 1
        agree, total = agree + n, total + len(c.eager_tokens)
        assert np.isfinite(c.max_abs_logit_diff) or c.max_abs_logit_diff == float("inf")
        if c.vision_max_abs_diff is not None:
            assert c.vision_max_abs_diff < 1.0  # int8 vision tower, still the same image features (scale ~O(1))
    eager = EagerReference(tiny_checkpoint, threads=1)
    cases = suite_cases(suite_images(tmp_path))
    ref = []
    for name, messages, _ in cases:
        r = eager.answer(messages, max_new_tokens=budget.decode_steps)
        ref.append(Trace(name, r.token_ids, [np.asarray(l, np.float32) for l in r.step_logits]))
    m = compare(ref, trace(kit, cases, budget.decode_steps, threads=1))
    print(f"\nint8 kit vs eager fp32: parity-suite prefix agreement {agree}/{total}; over {budget.decode_steps} steps "
          f"mean KL {m.mean_kl:.4g}, greedy agreement {m.greedy_agreement:.3f}, max |dlogit| {m.max_abs_logit_diff:.3g}")
    assert m.within(budget), m.violations(budget)
    assert agree / total >= budget.min_greedy_agreement


def test_int8_kit_parses_and_builds_with_tensorrt_rtx_int8_and_no_fp16(int8_kit, rtx, tmp_path):
    from qvl.toolchain.tensorrt.build import build_engine_command

    kit, _, _, _ = int8_kit
    lines: list[str] = []
    report = build_engine_command(kit, tmp_path / "e", allow_target_mismatch=True, echo=lines.append)
    reports = _manifest(kit)["steps"][-1]["reports"]
    for name, e in report.engines.items():
        assert e["bytes"] > 0 and e["fp16_check"]["fp16_layers"] == [] and e["fp16_check"]["layers_checked"] == e["layers"]
        quantized = reports[name]["counts"]["quantized"]
        assert quantized > 0 and e["int8_check"]["int8_matmuls"] == quantized, (name, e["int8_check"]["int8_matmuls"], quantized)
    print("\nTensorRT-RTX INT8 kit: " + "; ".join(
        f"{n} {e['layers']} layers, INT8 Q/DQ matmuls {e['int8_check']['int8_matmuls']}/{e['int8_check']['matmuls']}, "
        f"FP16 layers 0, build {e['build_seconds']:.1f} s" for n, e in report.engines.items()))


def test_int8_kit_cli_no_budget_and_user_errors(tiny_artifact, tmp_path):
    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("compile", str(tiny_artifact), "--target", "sm61", "--weights", "int4",
                                  "--out", str(tmp_path / "k4")), "has no int4 path")
    assert not (tmp_path / "k4").exists()
    proc = run_cli("compile", str(tiny_artifact), "--target", "sm61", "--weights", "int8", "--no-budget",
                   "--out", str(tmp_path / "k8"))
    assert proc.returncode == 0, proc.stderr
    p = _manifest(tmp_path / "k8")["precision"]
    assert "budget_search" not in p and p["converted"] == 28 + 32 + 1 and "int8=on" in proc.stderr
    assert_one_line_error(run_cli("compile", str(tiny_artifact), "--target", "sm61", "--weights", "int8",
                                  "--out", str(tmp_path / "k8")), "already exists")


# -- memory fit -------------------------------------------------------------------------------------


def test_parameter_counts_from_config_match_the_checkpoint(tiny_checkpoint):
    from safetensors import safe_open

    from qvl.toolchain.tensorrt.memory_fit import ModelDims, parameter_counts

    counts = {"vision": 0, "decoder_layers": 0, "embedding": 0}
    for f in tiny_checkpoint.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                n = int(np.prod(st.get_slice(k).get_shape()))
                counts["vision" if ".visual." in k else "embedding" if "embed_tokens" in k else "decoder_layers"] += n
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert parameter_counts(ModelDims.from_config(config)) == counts


def test_kit_footprint_matches_config_footprint(sm61_kit):
    from qvl.toolchain.tensorrt.memory_fit import footprint_from_config

    kit, _ = sm61_kit
    m = _manifest(kit)
    graph_fp = m["kit"]["memory_fit"]["footprint"]
    cfg_fp = footprint_from_config(m["source"]["config"]).to_dict()
    for key in ("vision_weight_bytes", "decoder_layer_weight_bytes", "lm_head_bytes"):
        assert abs(graph_fp[key] - cfg_fp[key]) <= 0.02 * cfg_fp[key], key  # graphs add a few small constants


def test_memory_fit_report_for_the_2b_config_covers_five_sm61_cards():
    from qvl.toolchain.checkpoints.presets import published_2b_config
    from qvl.toolchain.compile.targets import GiB
    from qvl.toolchain.tensorrt.memory_fit import footprint_from_config, format_memory_fit, memory_fit_report

    cfg = published_2b_config()
    fp32 = memory_fit_report(cfg, preprocessor_max_patches=16384)
    assert tuple(fp32["cards"]) == CARDS
    for key, card in fp32["cards"].items():
        names = [p["placement"] for p in card["placements"]]
        assert names == ["all_gpu", "vision_on_cpu", "vision_and_lm_head_on_cpu", "partial_layers"]
        assert not card["fits_as_built"]  # 2B at fp32 is ~8 GB of weights: no SM61 card holds it whole
        assert card["recommended"] == "partial_layers" and card["on_cpu"]
    assert fp32["footprint"]["decoder_layer_weight_bytes"] > 5 * GiB
    int8 = memory_fit_report(footprint_from_config(cfg, 1.0, "int8"), preprocessor_max_patches=16384)
    assert int8["cards"]["gtx1060-6gb"]["recommended"] == "all_gpu"
    assert int8["cards"]["gtx1060-6gb"]["max_context"] >= 2048
    table = format_memory_fit(fp32)
    assert all(c["name"] in table for c in fp32["cards"].values())


def test_kit_manifest_has_memory_fit_for_five_cards(sm61_kit):
    kit, lines = sm61_kit
    fit = _manifest(kit)["kit"]["memory_fit"]
    assert tuple(fit["cards"]) == CARDS
    assert fit["selected"]["card"] == "mx250-2gb" and fit["selected"]["fits_as_built"]
    assert any("GeForce MX250 2 GB" in line for line in lines)


# -- engine builds (TensorRT-RTX on CPU) ------------------------------------------------------------


def test_every_kit_graph_parses_and_builds_with_tensorrt_rtx(built, sm61_kit):
    report, lines, seconds = built
    assert set(report.engines) == {"vision", "decoder"}
    for name, e in report.engines.items():
        path = report.out / e["file"]
        assert path.stat().st_size == e["bytes"] > 0, name
        assert e["layers"] > 0
    assert report.engines["decoder"]["profiles"] == ["prefill", "decode"]
    record = json.loads((report.out / "build.json").read_text())
    assert record["library"]["flavor"] == "tensorrt-rtx"
    assert "Pascal" in record["target_mismatch"]  # recorded: these engines are a parse/build proof only
    assert any(line.startswith("warning:") for line in lines)
    print("\nTensorRT-RTX builds: " + ", ".join(
        f"{n} parse {e['parse_seconds']:.1f} s + build {e['build_seconds']:.1f} s" for n, e in report.engines.items())
        + f"; total {seconds:.1f} s")


def test_no_layer_computes_in_fp16_for_sm61(built, sm61_kit, rtx):
    from qvl.toolchain.tensorrt.build import fp16_violations, parse_onnx

    report, _, _ = built
    kit, _ = sm61_kit
    for name, e in report.engines.items():
        assert e["fp16_check"]["layers_checked"] == e["layers"] > 0
        assert e["fp16_check"]["fp16_layers"] == []
        parsed = parse_onnx(rtx, kit / f"{name}.onnx")
        n, problems = fp16_violations(rtx, parsed.network)
        assert n == parsed.network.num_layers > 0 and problems == [], problems[:5]


def test_fp16_guard_rejects_a_network_that_computes_in_fp16(rtx, tmp_path):
    from onnx import TensorProto as T
    from onnx import helper

    from qvl.toolchain.tensorrt.build import check_no_fp16, parse_onnx

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=T.FLOAT16), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=T.FLOAT)],
        "fp16", [helper.make_tensor_value_info("x", T.FLOAT, [4, 8])], [helper.make_tensor_value_info("y", T.FLOAT, [4, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fp16.onnx")
    parsed = parse_onnx(rtx, tmp_path / "fp16.onnx")
    with pytest.raises(QvlError, match="FP16"):
        check_no_fp16(rtx, parsed.network, None, "fp16")


def test_sm61_build_with_a_pascal_less_library_is_refused(sm61_kit, rtx, tmp_path):
    from qvl.toolchain.tensorrt.build import build_engines

    kit, _ = sm61_kit
    with pytest.raises(QvlError, match="last TensorRT is 8.6"):
        build_engines(kit, tmp_path / "e", library="tensorrt-rtx")


@pytest.mark.parametrize("flavor,version,target,cc,fast_fp16,needle", [
    ("tensorrt", "10.3.0", "sm61", None, None, "dropped Pascal"),
    ("tensorrt-rtx", "1.7.1", "sm61", None, None, "Turing (SM 7.5) and newer only"),
    ("tensorrt", "8.6.1", "sm61", (6, 1), None, None),
    ("tensorrt", "8.6.1", "sm61", (8, 6), None, "not SM 6.1"),
    ("tensorrt", "8.6.1", "sm61", None, True, "not a Pascal GP10x"),
    ("tensorrt", "8.6.1", "sm61", None, False, None),
    ("tensorrt", "10.3.0", "sm75+", (6, 1), None, "need Turing"),
    ("tensorrt-rtx", "1.7.1", "sm75+", None, None, None),
])
def test_target_mismatch_rules(flavor, version, target, cc, fast_fp16, needle):
    from qvl.toolchain.tensorrt.build import target_mismatch

    reason = target_mismatch(flavor, version, target, cc, fast_fp16)
    assert (reason is None) if needle is None else (needle in reason), reason


def test_no_tensorrt_installed_is_a_user_error(monkeypatch, sm61_kit):
    from qvl.toolchain.tensorrt.build import build_engines

    for mod in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    kit, _ = sm61_kit
    with pytest.raises(QvlError, match="neither TensorRT .* nor TensorRT-RTX is installed"):
        build_engines(kit)


def test_building_a_plain_artifact_is_a_user_error(tiny_artifact):
    from qvl.toolchain.tensorrt.build import build_engines

    with pytest.raises(QvlError, match="not a TensorRT engine kit"):
        build_engines(tiny_artifact)


# -- runner logic (no GPU needed) -------------------------------------------------------------------


def test_runner_plans_prefill_and_decode_chunks():
    from qvl.runtime.backends.tensorrt import DecoderLimits, plan_step

    lim = DecoderLimits(context=2048, prefill_seq=512, prefill_past=1536, decode_past=2047)
    assert plan_step(0, 1300, lim) == [("prefill", 0, 512), ("prefill", 512, 512), ("prefill", 1024, 276)]
    assert plan_step(1300, 1, lim) == [("decode", 0, 1)]
    assert plan_step(10, 1, lim) == [("decode", 0, 1)]
    # past beyond the prefill profile's range: the tail goes one position at a time through decode
    assert plan_step(1530, 10, lim) == [("prefill", 0, 10)]
    assert plan_step(1540, 3, lim) == [("decode", 0, 1), ("decode", 1, 1), ("decode", 2, 1)]
    assert plan_step(1400, 200, lim) == [("prefill", 0, 200)]
    with pytest.raises(QvlError, match="exceeds the engine's context of 2048"):
        plan_step(2000, 49, lim)


def test_runner_limits_and_profile_selection_come_from_the_kit(sm61_kit):
    from qvl.runtime.backends.tensorrt import DecoderLimits, select_profile

    kit, _ = sm61_kit
    k = _manifest(kit)["kit"]
    lim = DecoderLimits.from_kit(k)
    assert lim == DecoderLimits(2048, 512, 2048 - 512, 2047, verify_positions=16)  # logit_positions 1..16 (prefill)
    dec = k["graphs"]["decoder"]["profiles"]
    m = _manifest(kit)["model"]
    h, kv = m["hidden_size"], (1, m["num_kv_heads"], 0, m["head_dim"])

    def past(n):
        return kv[:2] + (n,) + kv[3:]

    assert select_profile(dec, {"inputs_embeds": (1, 100, h), "attention_mask": (1, 100), "past_key_0": past(0)}) == 0
    assert select_profile(dec, {"inputs_embeds": (1, 1, h), "attention_mask": (1, 2000), "past_key_0": past(1999)}) == 1
    # a speculative verify step: 9 positions, logits for all of them (the prefill profile takes up to 16)
    assert select_profile(dec, {"inputs_embeds": (1, 9, h), "past_key_0": past(900), "logit_positions": (9,)}) == 0
    with pytest.raises(QvlError, match="fit no optimization profile"):
        select_profile(dec, {"inputs_embeds": (1, 17, h), "past_key_0": past(900), "logit_positions": (17,)})
    vis = k["graphs"]["vision"]["profiles"]
    assert select_profile(vis, {"pixel_values": (64, 1536)}) == 0
    with pytest.raises(QvlError, match="fit no optimization profile"):
        select_profile(vis, {"pixel_values": (k["max_image_patches"] + 4, 1536)})


def test_runner_casts_host_inputs_to_the_engine_dtype():
    from qvl.runtime.backends.tensorrt import max_bytes, to_engine_dtype

    ids = np.arange(6, dtype=np.int64).reshape(3, 1, 2)
    out = to_engine_dtype(ids, "INT32")  # TensorRT 8.6 binds INT64 inputs as INT32
    assert out.dtype == np.int32 and out.flags.c_contiguous and (out == ids).all()
    assert to_engine_dtype(ids, "INT64").dtype == np.int64
    with pytest.raises(QvlError):
        to_engine_dtype(np.array([1 << 40]), "INT32")
    profiles = [{"shapes": {"a": {"min": [1, 1], "opt": [1, 4], "max": [1, 8]}}},
                {"shapes": {"a": {"min": [1, 1], "opt": [1, 1], "max": [1, 1]}}}]
    assert max_bytes(profiles, "a", 4) == 32


def test_runner_refuses_engines_built_for_another_gpu(sm61_kit, built):
    from qvl.runtime.backends.tensorrt import TrtEngine

    kit, _ = sm61_kit
    report, _, _ = built
    with pytest.raises(QvlError, match="cannot run on sm61"):
        TrtEngine(kit, engines_dir=report.out)


def test_runner_module_is_torch_free():
    code = "import sys, qvl.runtime.backends.tensorrt; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
