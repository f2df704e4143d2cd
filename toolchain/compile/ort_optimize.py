"""ONNX Runtime's own optimized graphs, saved in the artifact so the runtime does not re-optimize at start-up.

ORT optimizes every graph it loads (constant folding, its CPU fusions: QuickGelu, the rotate-half Split,
transpose cancelling, ...). For the 2B decoder that is a second or more of each start. Here the toolchain
runs that optimization once, at `ORT_ENABLE_EXTENDED` (the fusions that are not specific to one CPU's
instruction set; `ENABLE_ALL` adds layout transforms ORT warns are tied to the machine that ran them),
and stores the result as `<graph>.ort.onnx` next to the plain graph.

ORT writes the optimized model's large initializers to an external file of its own; a second copy of
the weights would double the artifact. So each external initializer of the optimized model is compared
byte for byte with the plain graph's initializer of the same name in `weights.bin`, and where equal its
reference is pointed at that `weights.bin` range. New small tensors ORT made (folded shapes, split sizes)
are stored inline. A large new tensor (ORT re-laid out a weight) cannot be shared: then no optimized
graph is written for that graph and the manifest says why (the runtime optimizes it at load as before).

The manifest section `ort_optimized` records the ORT version that wrote the graphs; the runtime uses them
only with that same version on the CPU provider, and otherwise loads the plain graphs.
"""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import onnx

from qvl.artifacts import manifest as mf
from qvl.artifacts.schema import WEIGHTS, OptimizedGraph, OrtOptimized
from qvl.toolchain.staging import scratch_dir

LEVEL = "extended"
SUFFIX = ".ort.onnx"
INLINE_LIMIT = 1 << 16  # new tensors up to 64 KiB are stored inline in the optimized graph


def _external(tensor: onnx.TensorProto) -> dict | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return {"location": info["location"], "offset": int(info.get("offset", 0)), "length": int(info["length"])}


def _optimize_one(graph_file: Path, work: Path, threads: int) -> Path:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    out = work / graph_file.name
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    # everything but scalars goes to ORT's side file, so that it can be matched against the weight store
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "256")
    ort.InferenceSession(str(graph_file), so, providers=["CPUExecutionProvider"])
    return out


def _rebind(optimized: Path, plain: Path, artifact: Path) -> tuple[onnx.ModelProto | None, dict]:
    """Point the optimized model's weights back into the artifact's weight store; (model, stats) or (None, why)."""
    opt = onnx.load(str(optimized), load_external_data=False)
    original = {t.name: _external(t) for t in onnx.load(str(plain), load_external_data=False).graph.initializer}
    shared = inlined = 0
    with (optimized.parent / (optimized.name + ".data")).open("rb") as side_f, \
            (artifact / WEIGHTS).open("rb") as store_f:
        side = mmap.mmap(side_f.fileno(), 0, access=mmap.ACCESS_READ) if side_f.seek(0, 2) else None
        store = mmap.mmap(store_f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for t in opt.graph.initializer:
                ext = _external(t)
                if ext is None:
                    continue
                data = side[ext["offset"]: ext["offset"] + ext["length"]]
                ref = original.get(t.name)
                if ref and ref["location"] == WEIGHTS and ref["length"] == ext["length"] \
                        and store[ref["offset"]: ref["offset"] + ref["length"]] == data:
                    del t.external_data[:]
                    for k, v in (("location", WEIGHTS), ("offset", str(ref["offset"])), ("length", str(ref["length"]))):
                        t.external_data.add(key=k, value=v)
                    shared += 1
                elif len(data) <= INLINE_LIMIT:
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = bytes(data)
                    inlined += 1
                else:
                    return None, {"reason": f"ORT re-laid out initializer {t.name!r} ({len(data)} bytes); "
                                            "it cannot share the weight store"}
        finally:
            store.close()
            if side is not None:
                side.close()
    return opt, {"shared_initializers": shared, "inlined_initializers": inlined}


def add_ort_optimized(artifact: Path, graphs: dict, threads: int = 1) -> dict:
    """Write `<graph>.ort.onnx` for each graph of the (staging) artifact; return the manifest section."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    artifact = Path(artifact)
    optimized, not_optimized = {}, {}
    with scratch_dir("qvl-ortopt-") as work:
        for name, entry in graphs.items():
            plain = artifact / entry["file"]
            model, info = _rebind(_optimize_one(plain, Path(work), threads), plain, artifact)
            if model is None:
                not_optimized[name] = info["reason"]
                continue
            path = artifact / (Path(entry["file"]).stem + SUFFIX)
            onnx.save(model, str(path))
            optimized[name] = OptimizedGraph(file=path.name, sha256=mf.sha256_file(path), nodes=len(model.graph.node),
                                             extra=info)
    return OrtOptimized(onnxruntime=ort.__version__, level=LEVEL, provider="CPUExecutionProvider", graphs=optimized,
                        not_optimized=not_optimized, seconds=round(time.perf_counter() - t0, 2)).to_json()


def ort_optimized_section(artifact: Path, graphs: dict, target) -> dict:
    """`{"ort_optimized": ...}` for targets that run on ONNX Runtime's CPU provider with its contrib ops
    (cpu-avx2 / cpu-avx512); `{}` for the others (the export artifact, TensorRT kits, CUDA targets: ORT's saved
    optimized graphs are provider-specific and the CPU one would pin CPU kernels)."""
    if not target.ort_contrib_ops or target.provider != "cpu":
        return {}
    return {"ort_optimized": add_ort_optimized(artifact, graphs)}


def ort_optimizer(target):
    """`write_derived_artifact`'s `optimize` hook for `target`: `ort_optimized_section` on the new graphs."""
    return lambda artifact, graphs: ort_optimized_section(artifact, graphs, target)
