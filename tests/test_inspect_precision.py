"""`qvl-compile inspect-precision` (Polygraphy MARK_ALL + OnnxrtRunner + Comparator on ONNX Runtime CPU) and the
pure decisions of the Polygraphy engine-build path (`toolchain/tensorrt/build.py`).

The command runs through the real console script in a subprocess, on the tiny INT8 sm61 kit against the fp32
sm61 kit it is derived from. The Polygraphy *build* path needs the full `tensorrt` package, which is not
installable here: its decisions are unit-tested, and its loader calls run against TensorRT-RTX through
Polygraphy's own RTX switch (POLYGRAPHY_USE_TENSORRT_RTX=1), which proves the calls, not a TensorRT 8.6 build.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from qvl.errors import QvlError

QVL_COMPILE = Path(sys.executable).parent / "qvl-compile"


def qvl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(QVL_COMPILE), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _manifest(kit: Path) -> dict:
    return json.loads((kit / "manifest.json").read_text())


# -- inspect-precision through the console script ---------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_vs_fp32(int8_kit_dir, sm61_kit_dir):
    before = (_snapshot(int8_kit_dir), _snapshot(sm61_kit_dir))
    proc = qvl("inspect-precision", str(int8_kit_dir), "--against", str(sm61_kit_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    assert (_snapshot(int8_kit_dir), _snapshot(sm61_kit_dir)) == before  # nothing written into either kit
    return json.loads(proc.stdout)  # stdout is the report only (Polygraphy's log kept off it)


def test_int8_kit_vs_fp32_kit_covers_every_layer_with_finite_nonzero_errors(int8_vs_fp32, int8_kit_dir):
    r = int8_vs_fp32
    m = _manifest(int8_kit_dir)
    decisions = m["precision"]["decisions"]  # layer -> "int8" | "fp32" (the budget search's, or calibration's skips)
    assert list(r["graphs"]) == ["decoder", "vision"] and r["reference_from"] == "--against"
    dec = r["graphs"]["decoder"]
    by_index = {lay["index"]: lay for lay in dec["layers"] if lay["layer"].startswith("decoder.layers.")}
    assert sorted(by_index) == list(range(m["model"]["num_layers"]))  # every decoder layer is in the report
    nonzero_int8 = 0
    for name, g in r["graphs"].items():
        quantized_before = False
        for lay in g["layers"]:
            assert lay["tensors"] > 0 and lay["elements"] > 0, lay
            assert math.isfinite(lay["max_abs"]) and math.isfinite(lay["mean_abs"]) and 0 <= lay["mean_abs"] <= lay["max_abs"]
            if lay["layer"] == "(inputs)":  # embeddings, rotary tables, masks: fed identically to both graphs
                assert lay["max_abs"] == 0
            elif decisions.get(lay["layer"]) == "int8":  # INT8 Q/DQ in the layer: it departs from fp32
                assert lay["max_abs"] > 0 and lay["mean_abs"] > 0 and lay["worst"], lay
                nonzero_int8 += 1
            elif not quantized_before:  # an fp32 layer fed exactly the reference's inputs computes exactly the same
                assert lay["max_abs"] == 0, lay
            quantized_before |= decisions.get(lay["layer"]) == "int8"
        # Q/DQ graphs add tensors: only names in both are compared, and the counts say how many were skipped
        assert g["compared"] + sum(g["skipped"].values()) == g["in_both"] and g["compared"] > 0
        assert g["only_reference"] == 0
        if any(v == "int8" for k, v in decisions.items() if k.startswith(f"{name}.")):
            assert g["only_candidate"] > 0
            assert g["skipped"]["rescaled by SmoothQuant folding"] > 0  # folded norm outputs: rescaled on purpose
        assert g["first_over"] == next((lay["layer"] for lay in g["layers"] if lay["max_abs"] > r["tolerance"]), None)
    assert nonzero_int8 >= 1 and nonzero_int8 == sum(v == "int8" for v in decisions.values())


def test_fp32_kit_against_itself_is_exactly_zero(sm61_kit_dir):
    proc = qvl("inspect-precision", str(sm61_kit_dir), "--against", str(sm61_kit_dir), "--tolerance", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"inspect-precision: {sm61_kit_dir} vs {sm61_kit_dir}")
    for graph in ("decoder", "vision"):
        assert f"{graph}: inputs " in out and "0 only in the artifact" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  decoder.layers.")]
    assert [row[0] for row in rows] == [f"decoder.layers.{i}" for i in range(_manifest(sm61_kit_dir)["model"]["num_layers"])]
    for row in rows:
        assert int(row[1]) > 0 and row[2:5] == ["0", "0", "0"], row
    assert out.count("no layer over the tolerance 0 (max |Δ| 0)") == 2


def test_text_report_names_the_first_layer_over_the_tolerance(int8_kit_dir, sm61_kit_dir, int8_vs_fp32):
    proc = qvl("inspect-precision", str(int8_kit_dir), "--against", str(sm61_kit_dir), "--tolerance", "1e-6")
    assert proc.returncode == 0, proc.stderr
    for g in int8_vs_fp32["graphs"].values():  # the same errors as the --json run: the inputs are deterministic
        first = next((lay for lay in g["layers"] if lay["max_abs"] > 1e-6), None)
        if first is None:
            assert f"no layer over the tolerance 1e-06 (max |Δ| {g['max_abs']:.3g})" in proc.stdout
        else:
            assert f"first layer over the tolerance 1e-06: {first['layer']} (max |Δ| {first['max_abs']:.3g} at {first['worst']})" in proc.stdout
    assert "first layer over the tolerance 1e-06: vision.blocks.0" in proc.stdout  # the kit's vision tower is INT8


def test_user_errors_are_one_line_and_exit_2(int8_kit_dir, sm61_kit_dir, tiny_checkpoint, tiny_cpu_artifact, tmp_path):
    # an INT8 kit records its fp32 reference only as a description (the temporary kit is not kept)
    assert_one_line_error(qvl("inspect-precision", str(int8_kit_dir)), "records no reference artifact", "--against", "hint:")
    assert_one_line_error(qvl("inspect-precision", str(tmp_path / "missing"), "--against", str(sm61_kit_dir)),
                          "artifact directory not found", "hint:")
    assert_one_line_error(qvl("inspect-precision", str(int8_kit_dir), "--against", str(tiny_checkpoint)),
                          "not a qvl-compile artifact")
    # same model, but an in-place KV-cache decoder (cpu target): tensors that do not correspond
    assert_one_line_error(qvl("inspect-precision", str(int8_kit_dir), "--against", str(tiny_cpu_artifact)),
                          "different decoders", "hint:")
    assert_one_line_error(qvl("inspect-precision", str(int8_kit_dir), "--against", str(sm61_kit_dir), "--tolerance", "nan"),
                          "--tolerance must be a finite number")


def test_layer_attribution_follows_metadata_and_dataflow(sm61_kit_dir):
    from qvl.artifacts.manifest import read_manifest
    from qvl.artifacts.writer import load_graphs
    from qvl.toolchain.eval.inspect_precision import INPUTS, tensor_layers

    dec = load_graphs(read_manifest(sm61_kit_dir))["decoder"]
    of, order = tensor_layers(dec, "decoder")
    n = _manifest(sm61_kit_dir)["model"]["num_layers"]
    assert order == [INPUTS] + [f"decoder.layers.{i}" for i in range(n)] + ["decoder.lm_head"]
    for i in range(n):
        assert of[f"present_key_{i}"] == of[f"present_value_{i}"] == f"decoder.layers.{i}"
    assert of["logits"] == "decoder.lm_head"
    labelled = {o.name: node.metadata_props["qvl.layer"] for node in dec.graph for o in node.outputs
                if "qvl.layer" in node.metadata_props}
    assert labelled and all(of[name] == layer for name, layer in labelled.items())


# -- the Polygraphy engine-build path: pure decisions ------------------------------------------------------------


@pytest.mark.parametrize("flavor,version,polygraphy,kind", [
    ("tensorrt", "8.6.1", "0.53.6", "polygraphy"),
    ("tensorrt", "10.3.0", "0.49.26", "polygraphy"),
    ("tensorrt", "8.6.1.post1", None, "tensorrt"),  # no Polygraphy: the TensorRT API directly
    ("tensorrt", "8.6.1", "0.48.1", "tensorrt"),  # too old a Polygraphy
    ("tensorrt-rtx", "1.7.1.116", "0.53.6", "tensorrt-rtx"),  # RTX keeps its API path
])
def test_builder_kind(flavor, version, polygraphy, kind):
    from qvl.toolchain.tensorrt.build import builder_kind

    assert builder_kind(flavor, version, polygraphy) == kind


def test_builder_kind_refuses_tensorrt_older_than_8_6():
    from qvl.toolchain.tensorrt.build import builder_kind

    with pytest.raises(QvlError, match="too old"):
        builder_kind("tensorrt", "8.5.3", "0.53.6")


def _plans(kit: Path, builder: str, settings: dict | None = None, **kw):
    from qvl.toolchain.tensorrt.build import build_plan

    m = _manifest(kit)
    k = m["kit"]
    return {name: build_plan(builder, settings or k["build"], g["profiles"], k["target"],
                             [i["name"] for i in m["graphs"][name]["inputs"]], kit / "engines" / f"{name}.engine", **kw)
            for name, g in k["graphs"].items()}, k


def test_build_plan_for_the_fp32_sm61_kit(sm61_kit_dir):
    plans, k = _plans(sm61_kit_dir, "polygraphy")
    for name, plan in plans.items():
        assert plan.flags == {"refit": True, "tf32": False, "fp16": False, "int8": False}
        assert plan.timing_cache == sm61_kit_dir / "engines" / f"{name}.timing.cache"
        assert plan.workspace_bytes == k["build"]["workspace_bytes"] and plan.builder_optimization_level == 3
        kit_profiles = k["graphs"][name]["profiles"]
        assert [p["name"] for p in plan.profiles] == [p["name"] for p in kit_profiles]
        for got, want in zip(plan.profiles, kit_profiles):
            assert list(got["shapes"]) == sorted(want["shapes"])  # every input, in a fixed order
            assert got["shapes"] == {n: {x: list(s[x]) for x in ("min", "opt", "max")} for n, s in want["shapes"].items()}
        assert plan.notes == ()
    assert [p["name"] for p in plans["decoder"].profiles] == ["prefill", "decode"]


def test_build_plan_int8_for_qdq_kits_and_never_fp16_for_sm61(int8_kit_dir, sm61_kit_dir):
    plans, k = _plans(int8_kit_dir, "polygraphy")
    assert all(p.flags["int8"] and not p.flags["fp16"] for p in plans.values())
    forced = {**k["build"], "fp16": True}  # even a kit that asked for FP16: sm61 never gets it
    plans, _ = _plans(int8_kit_dir, "polygraphy", forced)
    assert all(p.flags["fp16"] is False and p.flags["int8"] for p in plans.values())
    m = _manifest(sm61_kit_dir)
    from qvl.toolchain.tensorrt.build import build_plan

    g = m["kit"]["graphs"]["vision"]
    plan = build_plan("polygraphy", forced, g["profiles"], "sm75+", [i["name"] for i in m["graphs"]["vision"]["inputs"]],
                      Path("e/vision.engine"))
    assert plan.flags["fp16"] is True  # sm75+ may


def test_build_plan_for_tensorrt_rtx_without_a_gpu(sm61_kit_dir):
    plans, _ = _plans(sm61_kit_dir, "tensorrt-rtx", gpu_present=False, label="TensorRT-RTX 1.7.1")
    for plan in plans.values():
        assert plan.timing_cache is None and plan.flags["refit"] is False
        assert plan.notes == ("REFIT not applied: TensorRT-RTX 1.7.1 cannot build refittable engines without a GPU",
                              "timing cache not used: TensorRT-RTX 1.7.1 ignores timing caches (and needs a GPU to create one)")
    plans, _ = _plans(sm61_kit_dir, "tensorrt-rtx", gpu_present=True)
    assert all(p.flags["refit"] and p.timing_cache is None for p in plans.values())


def test_build_plan_refuses_a_profile_missing_an_input(sm61_kit_dir):
    from qvl.toolchain.tensorrt.build import build_plan

    m = _manifest(sm61_kit_dir)
    g = m["kit"]["graphs"]["decoder"]
    names = [i["name"] for i in m["graphs"]["decoder"]["inputs"]] + ["extra_input"]
    with pytest.raises(QvlError, match="profile prefill of decoder.onnx has no shapes for input.s. extra_input"):
        build_plan("polygraphy", m["kit"]["build"], g["profiles"], "sm61", names, Path("e/decoder.engine"),
                   graph_file="decoder.onnx")


def test_polygraphy_config_kwargs_are_what_create_config_accepts(int8_kit_dir, rtx):
    from polygraphy.backend.trt import CreateConfig

    from qvl.toolchain.tensorrt.build import polygraphy_config_kwargs

    plans, k = _plans(int8_kit_dir, "polygraphy")
    plan = plans["decoder"]
    kwargs = polygraphy_config_kwargs(plan, rtx.trt)
    assert kwargs["load_timing_cache"] == str(int8_kit_dir / "engines" / "decoder.timing.cache")
    assert kwargs["memory_pool_limits"] == {rtx.trt.MemoryPoolType.WORKSPACE: k["build"]["workspace_bytes"]}
    assert kwargs["refittable"] is True and kwargs["builder_optimization_level"] == 3
    # TensorRT-RTX is strongly typed (no INT8 / FP16 / TF32 flags): requested INT8 is dropped, not refused
    assert kwargs["int8"] is (getattr(rtx.trt.BuilderFlag, "INT8", None) is not None) and kwargs["fp16"] is False
    for prof, want in zip(kwargs["profiles"], plan.profiles):
        assert list(prof) == list(want["shapes"])
        for name, s in want["shapes"].items():
            assert tuple(prof[name].min) == tuple(s["min"]) and tuple(prof[name].max) == tuple(s["max"])
            assert tuple(prof[name].opt) == tuple(s["opt"])
    CreateConfig(**kwargs)  # every keyword is one this Polygraphy accepts


@pytest.fixture(scope="module")
def rtx():
    from qvl.toolchain.tensorrt.build import load_tensorrt

    try:
        return load_tensorrt("tensorrt-rtx")
    except QvlError as exc:
        pytest.skip(f"TensorRT-RTX wheels not importable ({exc})")


_POLYGRAPHY_RTX_BUILD = r"""
import json, os, sys
os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"  # before Polygraphy is imported: its process-wide switch
import tensorrt_rtx_bindings
sys.modules["tensorrt_rtx"] = tensorrt_rtx_bindings  # the module name Polygraphy's RTX mode imports
from pathlib import Path
from qvl.toolchain.tensorrt import build as b
kit, out = Path(sys.argv[1]), Path(sys.argv[2])
lib = b.load_tensorrt("tensorrt-rtx")
manifest, k = b.read_kit(kit)
g = k.graphs["vision"]
network = b.polygraphy_parse(lib, manifest.path(g.file))
names = [network[1].get_input(i).name for i in range(network[1].num_inputs)]
plan = b.build_plan("tensorrt-rtx", k.build.to_json(), list(g.profiles), k.target, names, out / "vision.engine",
                    gpu_present=False, label=lib.label)
config, flags = b.polygraphy_config(lib, plan, network[0], network[1])
fp16 = b.check_no_fp16(lib, network[1], config, "vision")
int8 = b.int8_matmuls(lib, network[1])
data = b.polygraphy_build(lib, network, config, plan, "vision")
print(json.dumps({"bytes": len(memoryview(data)), "profiles": config.num_optimization_profiles,
                  "workspace": config.get_memory_pool_limit(lib.trt.MemoryPoolType.WORKSPACE),
                  "flags": flags, "fp16": fp16, "int8": int8["int8_matmuls"], "layers": network[1].num_layers}))
"""


def test_polygraphy_loaders_build_the_int8_kit_through_tensorrt_rtx(int8_kit_dir, rtx, tmp_path):
    """NetworkFromOnnxPath -> CreateConfig(profiles, pool, level) -> EngineBytesFromNetwork, as build.py calls
    them, with Polygraphy driving TensorRT-RTX (CPU-only). Not the TensorRT 8.6 path: that needs a GPU box."""
    proc = subprocess.run([sys.executable, "-c", _POLYGRAPHY_RTX_BUILD, str(int8_kit_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    m = _manifest(int8_kit_dir)
    assert r["bytes"] > 0 and r["profiles"] == len(m["kit"]["graphs"]["vision"]["profiles"])
    assert r["workspace"] == m["kit"]["build"]["workspace_bytes"]
    assert r["flags"]["refit"] is False and r["fp16"]["fp16_layers"] == [] and r["fp16"]["layers_checked"] == r["layers"]
    assert r["int8"] == m["steps"][-1]["reports"]["vision"]["counts"]["quantized"] > 0
