"""`qvl-compile compile`: export (if needed) -> the target's pass pipeline -> a new artifact.

The pipelines are plain lists, here and only here. Every pass report lands in the artifact manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.errors import QvlError
from qvl.passes.attention_fusion import AttentionFusionPass
from qvl.passes.base import GraphPass
from qvl.passes.norm_fusion import NormFusionPass
from qvl.passes.rotary_fusion import RotaryFusionPass
from qvl.passes.vision_attention_fusion import VisionAttentionFusionPass
from qvl.toolchain.fsutil import atomic_output_dir, check_output_target, check_space, fault_point, output_lock
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.compile.targets import get_target


def pipeline_for(target_name: str) -> list[GraphPass]:
    """The pass list of a target, in order. Passes read the target table and skip what it lacks
    (e.g. ORT contrib-op fusions on TensorRT targets, with the reason in their report)."""
    return [
        AttentionFusionPass(),
        RotaryFusionPass(),
        VisionAttentionFusionPass(),
        NormFusionPass(),
    ]


@dataclass
class CompileReport:
    out: Path
    target: str
    seconds: float
    pass_reports: list[dict]


def compile_artifact(
    source: Path,
    target_name: str,
    out: Path,
    overwrite: bool = False,
    dump_after: str | None = None,
    step: Callable[[str], None] | None = None,
    ort_optimize: bool = True,
) -> CompileReport:
    import onnx_ir as ir

    from qvl.toolchain.export.exporter import export_artifact, save_graphs

    step = step or (lambda m: None)
    target = get_target(target_name)
    t0 = time.perf_counter()
    source = Path(source)
    is_artifact = (source / mf.MANIFEST).is_file()
    if not is_artifact and not (source / "config.json").is_file():
        raise QvlError(f"{source} is neither a checkpoint (config.json) nor an artifact (manifest.json)")
    passes = pipeline_for(target_name)
    known = {p.name for p in passes}
    if dump_after and dump_after not in known:
        raise QvlError(f"--dump-after {dump_after!r} is not a pass of target {target.name}", hint=f"passes: {', '.join(sorted(known))}")
    # The output (lock, staging) comes first so that a second writer or a wrong --out fails before the export;
    # the scratch dir is inside it so that a full TMPDIR is reported before its cleanup frees the space.
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(source,)) as staging, \
            scratch_dir("qvl-compile-") as tmp_root:
        weights = source_weight_bytes(source)
        check_space([(staging, weights + (64 << 20))] + ([] if is_artifact else [(tmp_root, 2 * weights + (256 << 20))]))
        if is_artifact:
            exported = source
        else:
            step("exporting")
            exported = Path(tmp_root) / "export"
            export_artifact(source, exported)
        manifest = mf.read_manifest(exported)
        graphs = {name: ir.load(str(exported / g["file"])) for name, g in manifest["graphs"].items()}
        reports: list[dict] = []
        fault_point("passes:start")
        for p in passes:
            for name, model in graphs.items():
                step(f"{p.name} on {name}")
                result = p(model, target, name)
                reports.append({"graph": name, **result.report.to_dict()})
            if dump_after == p.name:
                dump = staging / "dump"
                dump.mkdir()
                for name, model in graphs.items():
                    ir.save(model, str(dump / f"{name}.after-{p.name}.onnx"), external_data=f"{name}.after-{p.name}.data")
        step("writing artifact")
        entries, store = save_graphs(graphs, staging)
        mf.copy_side_files(exported, staging)
        decoder_ops = {n.op_type for n in graphs["decoder"].graph}
        from qvl.toolchain.quant.accuracy_budget import embedding_entry
        from qvl.toolchain.compile.ort_optimize import ort_optimized_section

        step("saving ONNX Runtime's optimized graphs")
        optimized = ort_optimized_section(staging, entries, target) if ort_optimize else {}

        mf.write_manifest(
            staging,
            {
                "target": target.name,
                "source": manifest["source"],
                "model": manifest["model"],
                "graphs": entries,
                "weights": {"file": mf.WEIGHTS, "bytes": (staging / mf.WEIGHTS).stat().st_size},
                "embedding": embedding_entry(graphs["decoder"]),
                "decoder": {"kv_mode": "shared" if "GroupQueryAttention" in decoder_ops else "concat"},
                **optimized,
                "tool_versions": mf.tool_versions(),
                "steps": manifest.get("steps", []) + [
                    {"name": "compile", "target": target.name, "passes": reports,
                     "seconds": round(time.perf_counter() - t0, 2),
                     "weight_bytes_written": store.bytes_written,
                     "weight_bytes_deduplicated": store.bytes_deduplicated}
                ],
            },
        )
    return CompileReport(Path(out), target.name, time.perf_counter() - t0, reports)


def source_weight_bytes(source: Path) -> int:
    """fp32 bytes of the source's weights: what an export or compile of it writes (space estimates)."""
    source = Path(source)
    if (source / mf.MANIFEST).is_file():
        try:
            return int(json.loads((source / mf.MANIFEST).read_text())["weights"]["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # read_manifest reports a broken artifact properly later
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint
    from qvl.toolchain.export.exporter import _param_count

    return 4 * sum(_param_count(f) for f in validate_checkpoint(source).weight_files)


def default_block_size(bits: int, config: dict) -> int:
    """Quantization block along K when the user gives none: 128 for int4 where every linear's K allows it,
    else 32. Why 128 for int4: ORT's prepacked int4 layout with block 32 made the 2B runtime peak at
    2.08 GB RSS (block 128: 1.48 GB, under the 2 GB laptop budget) at equal decode speed, and the sentinel's
    int4 task accuracy was 0.996 with block 128 vs 0.994 with 32. int8 keeps 32 (its AVX2 kernel was
    faster with 32: 0.38 vs 0.52 ms for a 2048x6144 layer)."""
    if bits == 4:
        t, v = config["text_config"], config["vision_config"]
        ks = (t["hidden_size"], t["intermediate_size"], v["hidden_size"], v["intermediate_size"],
              v["hidden_size"] * v["spatial_merge_size"] ** 2)
        if all(k % 128 == 0 for k in ks):
            return 128
    return 32


def compile_with_precision(
    source: Path,
    target_name: str,
    out: Path,
    weights: str = "fp32",
    block_size: int | None = None,
    budget=None,
    overwrite: bool = False,
    threads: int | None = None,
    step: Callable[[str], None] | None = None,
    sparsity: float | None = None,
) -> dict:
    """compile -> optional MLP channel sparsity -> optional weight-only int8/int4. Both approximate steps are
    opt-in and, with a `budget`, measured against the fp32 compiled artifact (itself parity-checked against
    eager) and rolled back per layer when over it. Returns {"sparsity": record, "precision": record}."""
    from qvl.passes.precision import PrecisionConfig
    from qvl.passes.sparsity import SparsityConfig
    from qvl.toolchain.quant.accuracy_budget import apply_with_budget, quantize_artifact
    from qvl.toolchain.quant.sparsity_budget import apply_sparsity_with_budget, sparsify_artifact

    target = get_target(target_name)
    bits = {"fp32": None, "int8": 8, "int4": 4}
    if weights not in bits:
        raise QvlError(f"unknown --weights {weights!r}", hint="fp32 | int8 | int4")
    nbits = bits[weights]
    if nbits is not None and (nbits not in target.int_weight_bits or not target.ort_contrib_ops):
        raise QvlError(f"target {target.name} has no weight-only int{nbits} kernels in this backend",
                       hint="use --weights fp32, or the TensorRT kit's INT8 path for sm61")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise QvlError(f"--sparsity must be a fraction in (0, 1), got {sparsity}")
    if nbits is None and sparsity is None:
        compile_artifact(source, target_name, out, overwrite=overwrite, step=step)
        return {}
    records: dict = {}
    # Up front, and the lock held throughout: the budgeted paths write --out only at their very end.
    with output_lock(Path(out)), scratch_dir("qvl-fp32-") as tmp:
        check_output_target(Path(out), overwrite, sources=(source,))
        w = source_weight_bytes(Path(source))
        ckpt = not (Path(source) / mf.MANIFEST).is_file()
        # fp32 intermediate + (if a checkpoint) its export + candidates of the budget search, all in TMPDIR
        check_space([(Path(out), w + (64 << 20)), (tmp, (4 if ckpt else 3) * w + (256 << 20))])
        current = Path(tmp) / "fp32"
        # intermediate only: the approximate steps below rewrite the graphs and save ORT's optimized form then
        compile_artifact(source, target_name, current, step=step, ort_optimize=False)
        if sparsity is not None:
            dest = out if nbits is None else Path(tmp) / "sparse"
            config = SparsityConfig(ratio=sparsity)
            if budget is None:
                records["sparsity"] = sparsify_artifact(current, dest, config, target, overwrite=overwrite)
            else:
                res = apply_sparsity_with_budget(current, dest, config, budget, threads=threads, progress=step,
                                                 target=target, overwrite=overwrite)
                records["sparsity"] = res.to_manifest(budget)
            current = dest
        if nbits is not None:
            if block_size is None:
                block_size = default_block_size(nbits, mf.read_manifest(current)["source"]["config"])
            config = PrecisionConfig(weight_bits=nbits, block_size=block_size, accuracy_level=4)
            if budget is None:
                (step or (lambda m: None))(f"quantizing weights to int{nbits}")
                records["precision"] = quantize_artifact(current, out, config, target, overwrite=overwrite)
            else:
                res = apply_with_budget(current, out, config, budget, target, threads=threads, overwrite=overwrite, progress=step)
                records["precision"] = res.to_manifest(budget)
    return records
