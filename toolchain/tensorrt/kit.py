"""TensorRT engine kit: TensorRT-flavoured ONNX graphs + optimization profiles + build settings.

`make_engine_kit(source, target, out)` writes a directory that is at once

* a valid runtime artifact (manifest graphs / weights / embedding exactly as `compile_artifact` writes
  them), so ONNX Runtime on the CPU runs the very graphs TensorRT will parse, and the parity suite
  checks them against eager PyTorch; and
* an engine kit: the manifest's `kit` section records, per graph, the optimization profiles (min / opt /
  max shape of every input, one profile for prefill and one for decode), the build settings (precision
  flags, workspace, refit), the KV-cache I/O contract and a memory-fit report. `toolchain/tensorrt/build.py`
  builds engines from it on the machine with the GPU.

Pipeline: `compile_artifact(source, target)` (standard ONNX only: the fusion passes skip TensorRT
targets, which have no ORT contrib ops) -> `OpsetLoweringPass` (sm61: Gelu-20 expanded, graph converted
to opset 17, the ceiling of TensorRT 8.6's parser, the last TensorRT for SM 6.1) -> checks (opset,
domains) -> memory fit -> profiles -> manifest.

INT8 kits: `toolchain/tensorrt/int8_kit.py`; memory fit and optimization profiles:
`toolchain/tensorrt/memory_fit.py`; the CLI body: `toolchain/tensorrt/command.py`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.artifacts.schema import KIT_FORMAT, KIT_VERSION, Kit, KitBuild, KitGraph, Manifest, MemoryFit
from qvl.artifacts.writer import load_graphs, save_graphs_in_place
from qvl.errors import QvlError
from qvl.passes.linear_sites import linear_sites
from qvl.toolchain.compile.pipeline import compile_artifact
from qvl.toolchain.compile.pipelines import pipeline_for, run_pipeline
from qvl.toolchain.compile.targets import GiB, get_target
from qvl.toolchain.fsutil import atomic_output_dir
from qvl.toolchain.tensorrt.memory_fit import (
    MIN_CONTEXT,
    PREFILL_CHUNK,
    SM61_CARDS,
    decoder_profiles,
    fit_card,
    footprint_from_graphs,
    memory_fit_report,
    profile_shapes,
    vision_max_patches,
    vision_profiles,
    workspace_bytes,
)

TRT_TARGETS = ("sm61", "sm75+")
STANDARD_DOMAINS = ("", "ai.onnx")
OPSET17_IR_VERSION = 8  # ONNX 1.12: IR version 8 / opset 17

# -- the kit ------------------------------------------------------------------------------------


@dataclass
class KitReport:
    out: Path
    target: str
    seconds: float
    lowering: list[dict]
    kit: dict = field(default_factory=dict)
    precision: dict | None = None  # INT8 kits: the manifest's precision record (pass, calibration, budget)


def _preprocessor_max_patches(folder: Path, patch: int) -> int | None:
    import json

    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    size = cfg.get("size") or {}
    max_pixels = size.get("longest_edge") or cfg.get("max_pixels")
    return int(max_pixels // (patch * patch)) if max_pixels else None


def _graph_opset(model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def build_settings(target_name: str, has_qdq: bool, workspace: int) -> dict:
    target = get_target(target_name)
    fp16 = "float16" in target.fast_dtypes
    return {
        "precision": "fp32" + ("+int8(explicit Q/DQ)" if has_qdq else "") + ("+fp16" if fp16 else ""),
        "fp16": fp16,  # sm61: never (FP16 runs at 1/64 rate on GP10x)
        "int8": bool(has_qdq and 8 in target.int_weight_bits),  # only with explicit Q/DQ in the graphs
        "tf32": False,
        "refit": True,
        "workspace_bytes": int(workspace),
        "builder_optimization_level": 3,
        "max_onnx_opset": target.max_opset,
        "tensorrt": ">=8.6,<9" if target_name == "sm61" else ">=10",
        "fp16_guard": target_name == "sm61",
    }


def _check_standard(graphs: dict, caps, lowering: list[dict]) -> None:
    problems = []
    for name, model in graphs.items():
        opset = _graph_opset(model)
        if caps.max_opset is not None and (opset is None or opset > caps.max_opset):
            reasons = "; ".join(s["reason"] for r in lowering if r["graph"] == name for s in r["skipped"])
            problems.append(f"{name} is opset {opset} > {caps.max_opset} ({reasons or 'not lowered'})")
        foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph if n.domain not in STANDARD_DOMAINS})
        if foreign:
            problems.append(f"{name} has non-standard ops {', '.join(foreign)}")
    if problems:
        raise QvlError(f"cannot make a {caps.name} engine kit: {problems[0]}",
                       hint="TensorRT parses standard ONNX only, up to the target's opset")


def _save_kit_graphs(graphs: dict, caps, staging: Path, files: dict) -> dict:
    """Save each graph in place (initializers keep their weight-store references); manifest graph entries.
    Opset <= 17 targets get the ONNX 1.12 era's IR version (TensorRT 8.6's parser)."""
    cap = OPSET17_IR_VERSION if caps.max_opset is not None and caps.max_opset <= 17 else None
    return save_graphs_in_place(graphs, staging, files, ir_version_cap=cap)


def kit_section(graphs: dict, entries: dict, manifest: Manifest, caps, staging: Path, *, card: str | None,
                prefill_chunk: int) -> dict:
    """The manifest's `kit` (`schema.Kit`): memory fit (from the graphs' deployed weight bytes), profiles, build
    settings, KV contract."""
    config = manifest.source.config
    fp = footprint_from_graphs(graphs, config)
    d = fp.dims
    pre_max = _preprocessor_max_patches(staging, config["vision_config"]["patch_size"])
    chosen = card or _default_card(caps.memory_bytes)
    cards = SM61_CARDS if caps.name == "sm61" else {}
    fit = memory_fit_report(fp, cards, chunk=prefill_chunk, preprocessor_max_patches=pre_max)
    if chosen is not None:
        sel = fit["cards"][chosen] if chosen in fit["cards"] else {"name": SM61_CARDS[chosen][0], **fit_card(fp, SM61_CARDS[chosen][1], chunk=prefill_chunk)}
        memory = sel["memory_bytes"]
        context = sel["max_context"] if sel["recommended"] else min(MIN_CONTEXT, d.context_length)
        selected = {"card": chosen, "name": sel["name"], "recommended": sel["recommended"], "fits": sel["recommended"] is not None,
                    "fits_as_built": sel["fits_as_built"], "max_context": sel["max_context"], "on_cpu": sel["on_cpu"]}
    else:  # sm75+: no card table; size the profiles for the model's context up to 8192 positions
        memory = caps.memory_bytes or 8 * GiB
        context = min(8192, d.context_length)
        selected = {"card": None, "memory_bytes": memory, "fits": None}
    context = max(min(context, d.context_length), 2)
    chunk = min(prefill_chunk, context)
    patches = vision_max_patches(fp, memory, pre_max)
    unit = d.v_merge**2
    profiles = {"decoder": decoder_profiles(context, chunk), "vision": vision_profiles(patches, unit)}
    kit_graphs = {}
    for name, entry in entries.items():
        kit_graphs[name] = KitGraph(
            file=entry["file"],
            opset=_graph_opset(graphs[name]),
            profiles=tuple({"name": p["name"], "dims": p["dims"], "shapes": profile_shapes(entry["inputs"], p["dims"])}
                           for p in profiles[name]),
            present=frozenset({"file", "opset", "profiles"}),  # opset null when unknown
        )
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for m in graphs.values() for n in m.graph)
    n_layers = manifest.model.num_layers
    return Kit(
        format=KIT_FORMAT,
        version=KIT_VERSION,
        target=caps.name,
        context_length=context,
        prefill_chunk=chunk,
        max_image_patches=patches,
        graphs=kit_graphs,
        build=KitBuild.from_json(build_settings(caps.name, has_qdq, workspace_bytes(memory))),
        kv_cache={
            "mode": "concat",
            "inputs": [f"past_{k}_{i}" for i in range(n_layers) for k in ("key", "value")],
            "outputs": [f"present_{k}_{i}" for i in range(n_layers) for k in ("key", "value")],
            "layout": "[batch, kv_heads, length, head_dim] float32, contiguous",
            "binding": "two preallocated device buffers of `context_length` positions per tensor; "
                       "present of step t is written into one and bound as past of step t+1 (ping-pong)",
        },
        memory_fit=MemoryFit.from_json({"selected": selected, **fit}),
    ).to_json()


def make_engine_kit(
    artifact_or_checkpoint: Path,
    target: str = "sm61",
    out: Path | None = None,
    *,
    card: str | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    overwrite: bool = False,
    step: Callable[[str], None] | None = None,
) -> KitReport:
    step = step or (lambda m: None)
    caps = _kit_target(target, out, card)
    t0 = time.perf_counter()
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(Path(artifact_or_checkpoint),)) as staging:
        compiled = staging / "compiled"
        compile_artifact(Path(artifact_or_checkpoint), caps.name, compiled, step=step)
        for f in compiled.iterdir():
            shutil.move(str(f), str(staging / f.name))
        compiled.rmdir()
        manifest = mf.read_manifest(staging)

        step("lowering opsets")
        graphs = load_graphs(manifest)
        # The opset converter round-trips through protobuf and drops node metadata (the exporter's module
        # scopes), so the linear layers' layer keys are taken before and stamped back as `qvl.layer` after:
        # the INT8 budget search rolls back whole layers (decoder.layers.3), not single nodes.
        layer_of = {name: {n.name: layer for n, _, layer in linear_sites(model, name)} for name, model in graphs.items()}
        lowering = []
        for name, model in graphs.items():  # the target pipeline's `lowering` stage (toolchain/compile/pipelines.py)
            _, reports = run_pipeline(pipeline_for(caps, name, stages=("lowering",)), model)
            lowering += [{"graph": name, **r.to_dict()} for r in reports]
        for name, model in graphs.items():
            for node in model.graph:
                layer = layer_of[name].get(node.name)
                if layer is not None and "qvl.layer" not in node.metadata_props:
                    node.metadata_props["qvl.layer"] = layer
        _check_standard(graphs, caps, lowering)

        step("writing graphs")
        entries = _save_kit_graphs(graphs, caps, staging, manifest.graph_files())
        step("memory fit and profiles")
        kit = kit_section(graphs, entries, manifest, caps, staging, card=card, prefill_chunk=prefill_chunk)
        seconds = time.perf_counter() - t0
        mf.write_manifest(staging, {
            **manifest.derive(),
            "target": caps.name,
            "graphs": entries,
            "kit": kit,
            "steps": list(manifest.steps or ()) + [
                {"name": "trt_kit", "target": caps.name, "passes": lowering, "seconds": round(seconds, 2)}],
        })
    return KitReport(Path(out), caps.name, seconds, lowering, kit)


def _kit_target(target: str, out: Path | None, card: str | None):
    caps = get_target(target)
    if caps.name not in TRT_TARGETS:
        raise QvlError(f"target {target!r} is not a TensorRT target", hint=f"engine kits are for: {', '.join(TRT_TARGETS)}")
    if out is None:
        raise QvlError("no output directory given for the engine kit", hint="pass --out DIR")
    if card is not None and card not in SM61_CARDS:
        raise QvlError(f"unknown card {card!r}", hint=f"choose one of: {', '.join(SM61_CARDS)}")
    return caps


def _default_card(memory_bytes: int | None) -> str | None:
    """The smallest SM61 card with the target's memory (sm61: 2 GiB -> MX250, the laptop's GPU)."""
    if memory_bytes is None:
        return None
    fitting = [k for k, (_, mem) in SM61_CARDS.items() if mem == memory_bytes]
    return fitting[0] if fitting else None


__all__ = ["make_engine_kit", "KitReport", "kit_section", "build_settings", "KIT_FORMAT", "TRT_TARGETS"]
