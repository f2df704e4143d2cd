"""INT8 kits (`make_int8_engine_kit`, `compile --target sm61 --weights int8`): the fp32 kit above, then
activation calibration on it (`toolchain/quant/calibration.py`, ONNX Runtime CPU, per-input-channel max|x| of
every linear site), then `QdqInt8Pass` (`passes/qdq_int8.py`: SmoothQuant smoothing, per-tensor int8
activations, per-channel int8 weights, explicit QuantizeLinear/DequantizeLinear at opset 17, FP32
compute elsewhere, never FP16), with the per-layer accuracy-budget search of `toolchain/quant/accuracy_budget.py`
against the fp32 kit: layers over budget stay fp32. The manifest's `precision` section records the pass
report, the calibration summary, the budget, every measurement and the decisions; the build settings turn
INT8 on because the graphs contain Q/DQ, and the memory fit counts quantized weights as int8
(`deployed_bytes`). The tied lm_head is quantized too (per vocabulary row, never smoothed): its Q/DQ reads
the fp32 table itself, which stays the runtime's host-side embedding table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.errors import QvlError
from qvl.passes.qdq_int8 import QdqInt8Config
from qvl.toolchain.compile.pipelines import PipelineOptions, run_stage
from qvl.toolchain.compile.targets import get_target
from qvl.toolchain.fsutil import atomic_output_dir, check_output_target, output_lock
from qvl.artifacts.writer import embedding_entry, load_graphs, publish_candidate, save_graphs, step_record, write_artifact
from qvl.toolchain.quant.accuracy_budget import budget_search, calibration_cases, layer_totals
from qvl.toolchain.quant.calibration import calibrate_artifact
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.tensorrt.kit import (
    KitReport,
    _check_standard,
    _kit_target,
    _save_kit_graphs,
    kit_section,
    make_engine_kit,
)
from qvl.toolchain.tensorrt.memory_fit import PREFILL_CHUNK


# -- INT8 kits: explicit Q/DQ, calibrated, accuracy-budgeted ------------------------------------------


def qdq_weight_format(target: str) -> str:
    """sm61 (TensorRT 8.6): fp32 weights + Q/DQ, quantized by TensorRT at build time (8.x requires Q/DQ
    weights in FP32); sm75+ (TensorRT >= 10): pre-quantized int8 weights behind a DequantizeLinear."""
    return "float_qdq" if get_target(target).name == "sm61" else "int8"


def qdq_record(config, reports: dict, calibration: dict | None) -> dict:
    """manifest["precision"] of an INT8 kit: per-layer decisions, bytes, skips, counts, calibration."""
    layers, before, after, skipped = layer_totals(reports, lambda d: {
        "decision": d["decision"], "nodes": len(d["nodes"]), "bytes_before": d["bytes_before"],
        "bytes_after": d["bytes_after"]})
    counts: dict[str, int] = {}
    for r in reports.values():
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    return {
        "kind": "int8 explicit Q/DQ (TensorRT)",
        "pass": "qdq_int8",
        "config": config.to_dict(),
        "weights": "symmetric per output channel, int8, zero point 0",
        "activations": "symmetric per tensor, int8, zero point 0, max calibration after SmoothQuant smoothing",
        "compute": "fp32 everywhere else; never fp16",
        "calibration": calibration,
        "layers": layers,
        "counts": counts,
        "linear_weight_bytes_before": before,
        "linear_weight_bytes_after": after,
        "converted": counts.get("quantized", 0),
        "skipped": skipped,
    }


def write_qdq_kit(fp32_kit: Path, out: Path, config, *, calibration: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Write `out`: the fp32 engine kit `fp32_kit` with `QdqInt8Pass(config)` on its graphs, a new weight
    store, and a recomputed kit section (int8 build flag, int8 memory fit). Returns the precision record."""
    t0 = time.perf_counter()
    fp32_kit = Path(fp32_kit)
    manifest = mf.read_manifest(fp32_kit)
    kit = manifest.kit
    if kit is None or not kit.is_trt_kit:
        raise QvlError(f"{fp32_kit} is not a TensorRT engine kit")
    caps = get_target(kit.target)
    graphs = load_graphs(manifest)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for m in graphs.values() for n in m.graph):
        raise QvlError(f"{fp32_kit} already has Q/DQ: start from the fp32 kit")
    reports = run_stage(caps, graphs, "weights", PipelineOptions(qdq=config))
    _check_standard(graphs, caps, [])
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(fp32_kit,)) as staging:
        _, store = save_graphs(graphs, staging)  # new weight store: smoothed weights, scales, folded norm constants
        entries = _save_kit_graphs(graphs, caps, staging, manifest.graph_files())
        # Side files first: the kit section sizes the vision profiles from the preprocessor's max_pixels.
        mf.copy_side_files(fp32_kit, staging)
        selected = kit.memory_fit.selected.get("card")
        section = kit_section(graphs, entries, manifest, caps, staging, card=selected, prefill_chunk=kit.prefill_chunk)
        record = qdq_record(config, reports, calibration)
        new = manifest.derive()
        new.update(
            graphs=entries,
            embedding=embedding_entry(graphs["decoder"]),
            kit=section,
            precision=record,
            steps=list(manifest.steps or ()) + [step_record("qdq_int8", t0, store, reports, target=caps.name)],
        )
        write_artifact(staging, new)
    return record


def make_int8_engine_kit(
    artifact_or_checkpoint: Path,
    target: str = "sm61",
    out: Path | None = None,
    *,
    budget=None,
    alpha: float | None = 0.5,
    card: str | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    overwrite: bool = False,
    threads: int | None = 1,
    cases: list | None = None,
    step: Callable[[str], None] | None = None,
) -> KitReport:
    """fp32 kit -> calibration -> explicit INT8 Q/DQ on every eligible layer -> with a `budget`
    (`accuracy_budget.AccuracyBudget`), the per-layer roll-back search against the fp32 kit, so layers
    over budget stay fp32. Budget, calibration summary and decisions land in the manifest's `precision`."""
    say = step or (lambda m: None)
    caps = _kit_target(target, out, card)
    out = Path(out)
    t0 = time.perf_counter()
    # lock and check --out before the (long) fp32 kit + calibration + search, which write it only at the end
    with output_lock(out), scratch_dir("qvl-int8-kit-") as tmp:
        check_output_target(out, overwrite, sources=(Path(artifact_or_checkpoint),))
        tmp = Path(tmp)
        fp32 = tmp / "fp32-kit"
        base = make_engine_kit(artifact_or_checkpoint, caps.name, fp32, card=card, prefill_chunk=prefill_chunk, step=step)
        cases = cases if cases is not None else calibration_cases(tmp / "images")
        say("calibrating activations")
        stats = calibrate_artifact(fp32, cases=cases, threads=threads or 1, progress=say)
        calibration = {**stats.summary(), "alpha": alpha}
        # The lm_head in INT8 too (its fp32 table stays the host embedding table): on a 2 GB card it is the
        # largest single weight (1.16 GiB fp32 for the 2B model, 0.29 GiB int8 in the engine).
        config = QdqInt8Config(stats.channel_max, alpha=alpha, weight_format=qdq_weight_format(caps.name),
                               include_lm_head=True)
        if budget is None:
            say("inserting INT8 Q/DQ")
            write_qdq_kit(fp32, out, config, calibration=calibration, overwrite=overwrite)
        else:
            work = tmp / "search"
            work.mkdir()
            result, best = budget_search(
                fp32,
                lambda path, restored: write_qdq_kit(fp32, path, replace(config, keep_fp32=config.keep_fp32 | restored),
                                                     calibration=calibration),
                lambda rec: [k for k, v in rec["layers"].items() if v["decision"] == "int8"],
                budget, ("all int8", "fp32"), work, cases, threads, say)
            result.seconds = time.perf_counter() - t0
            updates = {"budget_search": result.to_manifest(budget), "decisions": result.decisions,
                       "reference": "the fp32 engine kit (same graphs without Q/DQ), parity-checked against eager"}
            publish_candidate(best, out, "precision", updates, overwrite)
    manifest = mf.read_manifest(out)
    return KitReport(out, caps.name, time.perf_counter() - t0, base.lowering, manifest.kit.to_json(), dict(manifest.precision))


__all__ = ["make_int8_engine_kit", "write_qdq_kit", "qdq_weight_format", "qdq_record"]
