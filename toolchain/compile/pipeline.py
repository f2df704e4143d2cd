"""`qvl-compile compile`: export (if needed) -> the target's pass pipeline -> a new artifact.

The per-target pass lists live in `toolchain/compile/pipelines.py`; this runs their `fusion` stage (the
approximate stages by option, see `compile_with_precision`). Every pass report lands in the artifact manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.artifacts.writer import embedding_entry, load_graphs, save_graphs, write_artifact
from qvl.errors import QvlError
from qvl.passes.precision import PrecisionConfig
from qvl.passes.precision import refusal as precision_refusal
from qvl.passes.sparsity import SparsityConfig
from qvl.toolchain.compile.pipelines import PipelineOptions, has_stage, pass_names, pipeline_for, run_pipeline
from qvl.toolchain.quant.accuracy_budget import apply_with_budget, derive_artifact, quantize_artifact
from qvl.toolchain.quant.sparsity_budget import apply_sparsity_with_budget, sparsify_artifact
from qvl.toolchain.fsutil import atomic_output_dir, check_output_target, check_space, fault_point, output_lock
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.compile.targets import get_target
from qvl.toolchain.compile.ort_optimize import ort_optimized_section


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
    lora=None,
) -> CompileReport:
    """`lora` (a `toolchain/export/lora.LoraAdapter`): merged into a checkpoint source's weights before its export."""
    import onnx_ir as ir

    from qvl.toolchain.export.exporter import export_artifact

    step = step or (lambda m: None)
    target = get_target(target_name)
    t0 = time.perf_counter()
    source = Path(source)
    is_artifact = (source / mf.MANIFEST).is_file()
    if not is_artifact and not (source / "config.json").is_file():
        raise QvlError(f"{source} is neither a checkpoint (config.json) nor an artifact (manifest.json)")
    if lora is not None and is_artifact:
        raise QvlError(f"--lora merges an adapter into a checkpoint's weights before export; {source} is an artifact",
                       hint="compile the checkpoint it came from with --lora")
    names = pass_names(target, stages=("fusion",))
    known = set(names)
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
            export_artifact(source, exported, lora=lora)
        manifest = mf.read_manifest(exported)
        graphs = load_graphs(manifest)
        fault_point("passes:start")
        # One PassManager run per graph and part (the part up to --dump-after, then the rest); reports in pass order.
        cut = names.index(dump_after) + 1 if dump_after else len(names)
        per_graph: dict[str, list] = {name: [] for name in graphs}
        for part in ((0, cut), (cut, len(names))):
            for name, model in graphs.items():
                passes = pipeline_for(target, name, stages=("fusion",))[part[0]:part[1]]
                if passes:
                    step(f"{', '.join(p.name for p in passes)} on {name}")
                per_graph[name] += run_pipeline(passes, model)[1]
            if dump_after and part[0] == 0:
                dump = staging / "dump"
                dump.mkdir()
                for name, model in graphs.items():
                    ir.save(model, str(dump / f"{name}.after-{dump_after}.onnx"), external_data=f"{name}.after-{dump_after}.data")
        reports: list[dict] = [{"graph": name, **per_graph[name][i].to_dict()} for i in range(len(names)) for name in graphs]
        step("writing artifact")
        entries, store = save_graphs(graphs, staging)
        decoder_ops = {n.op_type for n in graphs["decoder"].graph}

        step("saving ONNX Runtime's optimized graphs")
        optimized = ort_optimized_section(staging, entries, target) if ort_optimize else {}

        write_artifact(
            staging,
            {
                "target": target.name,
                "source": manifest.source.to_json(),
                "model": manifest.model.to_json(),
                "graphs": entries,
                "embedding": embedding_entry(graphs["decoder"]),
                "decoder": {"kv_mode": kv_mode_of(decoder_ops)},
                **({"adapter": manifest.adapter.to_json()} if manifest.adapter is not None else {}),
                **optimized,
                "tool_versions": mf.tool_versions(),
                "steps": list(manifest.steps or ()) + [
                    {"name": "compile", "target": target.name, "passes": reports,
                     "seconds": round(time.perf_counter() - t0, 2),
                     "weight_bytes_written": store.bytes_written,
                     "weight_bytes_deduplicated": store.bytes_deduplicated}
                ],
            },
            side_files_from=exported,
        )
    return CompileReport(Path(out), target.name, time.perf_counter() - t0, reports)


def kv_mode_of(decoder_ops: set[str]) -> str:
    """The runtime's KV layout for a decoder graph's op set (see runtime/backends/ort.py)."""
    if "GroupQueryAttention" in decoder_ops:
        return "shared"
    return "scatter" if "TensorScatter" in decoder_ops else "concat"


def source_weight_bytes(source: Path) -> int:
    """fp32 bytes of the source's weights: what an export or compile of it writes (space estimates)."""
    source = Path(source)
    if (source / mf.MANIFEST).is_file():
        try:
            return mf.read_manifest(source, verify_graphs=False).weights.bytes
        except QvlError:
            return 0  # the full read reports a broken artifact properly later
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint

    return 4 * validate_checkpoint(source).num_parameters


def default_block_size(bits: int, config: dict, int8_block: int = 32) -> int:
    """Quantization block along K when the user gives none: 128 for int4 where every linear's K allows it,
    else 32. Why 128 for int4: ORT's prepacked int4 layout with block 32 made the 2B runtime peak at
    2.08 GB RSS (block 128: 1.48 GB, under the 2 GB laptop budget) at equal decode speed, and the sentinel's
    int4 task accuracy was 0.996 with block 128 vs 0.994 with 32. int8 takes the target's `int8_block_size`
    where every K allows it, else 32: 32 where ORT's kernel runs (MLAS's AVX2 int8 was faster with 32: 0.38 vs
    0.52 ms for a 2048x6144 layer), 128 on the CPU targets, whose decoder runs qvl's kernel (2B decode 26-28 vs
    20-21 tok/s with 32, prefill 101 vs 62 tok/s; sentinel 0.998 either way)."""
    want = 128 if bits == 4 else int8_block if bits == 8 else 32
    if want != 32:
        t, v = config["text_config"], config["vision_config"]
        ks = (t["hidden_size"], t["intermediate_size"], v["hidden_size"], v["intermediate_size"],
              v["hidden_size"] * v["spatial_merge_size"] ** 2)
        if all(k % want == 0 for k in ks):
            return want
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
    symmetric: bool = True,
    lora=None,
) -> dict:
    """compile -> optional MLP channel sparsity -> optional weight-only int8/int4 (`symmetric=False`: per-block zero
    points). Both approximate steps are
    opt-in and, with a `budget`, measured against the fp32 compiled artifact (itself parity-checked against
    eager) and rolled back per layer when over it. Returns {"sparsity": record, "precision": record}."""
    target = get_target(target_name)
    final_out = Path(out)
    # Exact stages after the weight steps (`packing`: sibling linears merged; `activations`: fp16 compute): when the
    # target has any, everything below writes an intermediate and the last of them writes --out.
    post = post_stages(target)
    bits = {"fp32": None, "int8": 8, "int4": 4}
    if weights not in bits:
        raise QvlError(f"unknown --weights {weights!r}", hint="fp32 | int8 | int4")
    nbits = bits[weights]
    if nbits is not None and (nbits not in target.int_weight_bits or not target.ort_contrib_ops):
        raise QvlError(f"target {target.name} has no weight-only int{nbits} kernels in this backend",
                       hint="use --weights fp32, or the TensorRT kit's INT8 path for sm61")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise QvlError(f"--sparsity must be a fraction in (0, 1), got {sparsity}")
    # accuracy_level 4 (int8 activations in the GEMM) is a CPU kernel choice: ORT's CUDA MatMulNBits ignores
    # it and computes in the activation dtype, and the CPU provider running a CUDA artifact (tests, the
    # budget search) should compute what the GPU computes -- exactly, as level 0 does.
    level = 4 if target.provider == "cpu" else 0
    if nbits is not None:
        refused = precision_refusal(PrecisionConfig(weight_bits=nbits, accuracy_level=level, symmetric=symmetric),
                                    target)
        if refused is not None:  # before any export or quantization work
            raise QvlError(refused, hint="drop --asymmetric (symmetric int4 is the default), or compile for "
                                         "--target cpu-avx512 on an AVX-512 host")
    if nbits is None and sparsity is None and not post:
        compile_artifact(source, target_name, out, overwrite=overwrite, step=step, lora=lora)
        return {}
    records: dict = {}
    # Up front, and the lock held throughout: the budgeted paths write --out only at their very end.
    with output_lock(Path(out)), scratch_dir("qvl-fp32-") as tmp:
        check_output_target(Path(out), overwrite, sources=(source,))
        if post:
            out = Path(tmp) / "before-post"  # the weight steps write here; the post stages write --out
        w = source_weight_bytes(Path(source))
        ckpt = not (Path(source) / mf.MANIFEST).is_file()
        # TMPDIR: the fp32 intermediate, (a checkpoint) its export, (sparsity and weights) the sparse intermediate,
        # (a budget) the search's candidates, (post stages) one artifact each. --out: a budget may keep any layer
        # fp32, so up to w; without one every eligible linear is int8/int4 (a quarter or less of its fp32 bytes),
        # so w / 2 bounds it with the fp32 leftovers (norms, convolutions) -- w would refuse a 4B int4 compile
        # needing 71 GB for a 3 GB artifact.
        budgeted = budget is not None
        out_need = w if (budgeted or nbits is None) else w // 2
        tmp_need = (1 + ckpt + (sparsity is not None and nbits is not None) + 2 * budgeted) * w + len(post) * out_need
        check_space([(Path(out), out_need + (64 << 20)), (tmp, tmp_need + (256 << 20))])
        current = Path(tmp) / "fp32"
        # intermediate only: the approximate steps below rewrite the graphs and save ORT's optimized form then
        compile_artifact(source, target_name, current, step=step, ort_optimize=False, lora=lora)
        if nbits is None and sparsity is None:
            out = current
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
                block_size = default_block_size(nbits, mf.read_manifest(current).source.config,
                                                int8_block=target.int8_block_size)
            config = PrecisionConfig(weight_bits=nbits, block_size=block_size, accuracy_level=level,
                                     symmetric=symmetric, dynamic_int8_graphs=target.dynamic_int8_graphs,
                                     dynamic_int8_weight_max=target.dynamic_int8_weight_max)
            if budget is None:
                (step or (lambda m: None))(f"quantizing weights to int{nbits}")
                records["precision"] = quantize_artifact(current, out, config, target, overwrite=overwrite)
            else:
                res = apply_with_budget(current, out, config, budget, target, threads=threads, overwrite=overwrite, progress=step)
                records["precision"] = res.to_manifest(budget)
        for i, stage in enumerate(post):
            dest = final_out if i == len(post) - 1 else Path(tmp) / f"after-{stage}"
            (step or (lambda m: None))(POST_STAGE_STEPS[stage])
            records[stage] = POST_STAGE_FNS[stage](out, dest, target, overwrite=overwrite)
            out = dest
    return records


POST_STAGE_STEPS = {"packing": "merging sibling linears", "activations": "float16 activations"}


def post_stages(target) -> list[str]:
    """The target's exact stages that run after the weight steps, in pipeline order."""
    return [s for s in ("packing", "activations") if has_stage(target, s)]


def apply_packing(src: Path, out: Path, target, overwrite: bool = False) -> dict:
    """Write `out`: artifact `src` with the target's `packing` stage (sibling linears -> one wider linear + Split);
    returns the manifest's `packing` record."""

    def record(reports: dict) -> dict:
        return {"graphs": {name: {"counts": r.counts, "skipped": [s.reason for s in r.skipped][:20]}
                           for name, r in reports.items()}}

    return derive_artifact(src, out, target, "packing", PipelineOptions(), "packing", record, overwrite,
                           updates={"target": target.name})


def apply_activations(src: Path, out: Path, target, overwrite: bool = False) -> dict:
    """Write `out`: artifact `src` with the target's `activations` stage (fp16 compute, fp16 KV cache); returns the
    manifest's `activations` record (the pass's per-graph counts and what stayed fp32 and why)."""

    def record(reports: dict) -> dict:
        return {"dtype": target.activation_dtype,
                "graphs": {name: {"counts": r.counts, "float32_nodes": {k: len(v) for k, v in
                                                                        r.details.get("float32_nodes", {}).items()},
                                  "skipped": [s.reason for s in r.skipped][:20]}
                           for name, r in reports.items()}}

    return derive_artifact(src, out, target, "activations", PipelineOptions(), "activations", record, overwrite,
                           updates={"target": target.name})


POST_STAGE_FNS = {"packing": apply_packing, "activations": apply_activations}
