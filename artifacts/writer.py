"""Writing artifacts: graphs, the shared weight store, the embedding entry, side files and the manifest.

Every producer goes through here -- `export` (a new artifact), `compile` (passes on an export), the derived
artifacts of the approximate steps (precision, sparsity), TensorRT engine kits, and calibration's tapped run
directories -- so the on-disk format (`artifacts/schema.py`) has one owner:

* `save_graphs(graphs, dir)`: each onnx-ir model as `<name>.onnx` at `IR_VERSION` with its initializers in one
  new deduplicated weight store; returns the manifest's graph entries (file, sha256, I/O signature).
* `save_graphs_in_place(graphs, dir, files)`: re-save graphs whose initializers keep their existing
  weight-store references (kits after lowering, tapped calibration graphs).
* `embedding_entry(decoder)`: the manifest's `embedding` (dense fp32 matrix, or its MatMulNBits parts): the tied
  lm_head's weight, or an untied decoder's host embedding (`passes/linear_sites.host_embedding`: used by no node,
  carried in the decoder graph's in-memory `meta`; `load_graphs` restores it from the manifest, `save_graphs`
  stores it). Every tensor the entry references goes into the weight store whatever its size (the runtime
  memory-maps them there; a small config's lm_head scales are below the inline-tensor threshold).
* `write_artifact(dir, fields, side_files_from=...)`: side files + `weights` entry + `manifest.json`.
* `write_derived_artifact(...)` / `publish_candidate(...)`: one approximate step's output artifact, and the
  budget search's chosen candidate moved to `--out`.

Writers need onnx_ir (graphs); nothing here imports torch or transformers, and the runtime never imports it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.artifacts.integrity import OBJECTS_LAYOUT
from qvl.artifacts.schema import WEIGHTS, Manifest
from qvl.artifacts.weight_store import WeightStoreWriter, externalize_initializers, externalize_value
from qvl.passes.linear_sites import host_embedding, host_value, set_host_embedding
from qvl.passes.precision import LM_HEAD_LAYER  # `qvl.layer` of the lm_head
from qvl.toolchain.fsutil import atomic_output_dir, fault_point

IR_VERSION = 10  # ONNX 1.16 / opset 21 era: every ONNX Runtime >= 1.17 loads it
EMBEDDING_NAME = "embed_tokens.weight"  # the export's [vocab, hidden] embedding table (tied: the lm_head's too)
TENSOR_PARTS = ("table", "packed", "scales", "zero_points")  # the tensors of `embedding_parts`


# -- graphs --------------------------------------------------------------------------------------------------


def io_signature(graph_model) -> dict:
    """`inputs` / `outputs` of a manifest graph entry: name, dtype and shape (ints and symbolic names)."""
    def sig(values):
        return [
            {
                "name": v.name,
                "dtype": v.dtype.name.lower() if v.dtype is not None else None,
                "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
            }
            for v in values
        ]

    return {"inputs": sig(graph_model.graph.inputs), "outputs": sig(graph_model.graph.outputs)}


def graph_entry(model, path: Path, **more) -> dict:
    return {"file": path.name, "sha256": mf.sha256_file(path), **more, **io_signature(model)}


def save_graphs(graphs: dict, out_dir: Path) -> tuple[dict, WeightStoreWriter]:
    """Write each onnx-ir model with its initializers in the one shared weight store."""
    import onnx_ir as ir

    out_dir = Path(out_dir)
    entries = {}
    with WeightStoreWriter(out_dir / WEIGHTS) as store:
        for name, model in graphs.items():
            parts = embedding_parts(model) if name == "decoder" else {}
            # the runtime maps the embedding's tensors from the store, so none of them may stay inline
            tensors = [parts[k] for k in TENSOR_PARTS if parts.get(k) is not None]
            externalize_initializers(model, store, WEIGHTS, always={v.name for v in tensors})
            for value in tensors:
                if model.graph.initializers.get(value.name) is not value:  # a host embedding: in no graph
                    externalize_value(value, store, WEIGHTS)
            model.ir_version = IR_VERSION
            path = out_dir / f"{name}.onnx"
            ir.save(model, path)
            entries[name] = graph_entry(model, path)
            fault_point("weights:write")  # the weight store is part-written here
    return entries, store


def save_graphs_in_place(graphs: dict, out_dir: Path, files: dict, ir_version_cap: int | None = None,
                         base: dict | None = None) -> dict:
    """Save each graph as `out_dir / files[name]`, its initializers keeping their weight-store references (the
    store is not rewritten); manifest graph entries. `ir_version_cap`: the oldest parser's IR version (a
    target's policy); `base`: the previous entries, whose other keys are kept."""
    import onnx_ir as ir

    entries = {}
    for name, model in graphs.items():
        if ir_version_cap is not None:
            model.ir_version = min(model.ir_version, ir_version_cap)
        path = Path(out_dir) / files[name]
        ir.save(model, str(path))
        entries[name] = graph_entry(model, path, **{k: v for k, v in ((base or {}).get(name) or {}).items()
                                                     if k not in ("file", "sha256", "inputs", "outputs")})
    return entries


def load_graphs(manifest: Manifest) -> dict:
    """The artifact's graphs as onnx-ir models (external weights stay references into the store; a format-2
    artifact's cached payloads are memory-mapped, see `_map_weight_objects`)."""
    import onnx_ir as ir

    # A partitioned artifact's part graphs are cuts of its decoder: a derived artifact (compile, passes) starts from
    # the whole decoder again and is partitioned afresh if wanted.
    parts = {p.graph for p in manifest.partition.parts} if manifest.partition is not None else set()
    graphs = {name: ir.load(str(manifest.graph_path(name))) for name in manifest.graphs if name not in parts}
    # a format-1 store hard-linked into a partitioned copy (`qvl-compile partition`) has more than one link too
    if manifest.weights.is_objects or any(os.stat(manifest.path(rel)).st_nlink > 1 for rel in manifest.weights.files):
        for model in graphs.values():
            _map_weight_objects(model, manifest)
    if "decoder" in graphs:
        set_host_embedding(graphs["decoder"].graph, _stored_host_embedding(manifest, graphs["decoder"]))
    return graphs


def _stored_host_embedding(manifest: Manifest, decoder) -> dict | None:
    """The host embedding of an untied artifact's decoder, memory-mapped from the store: the manifest's embedding
    names tensors that are not initializers of the decoder graph. None for a tied decoder (and for manifests
    written before embedding entries named their initializer: all tied)."""
    import numpy as np

    emb = manifest.embedding
    if emb.initializer is None or emb.initializer in decoder.graph.initializers:
        return None

    def value(ref, name: str):
        path = manifest.path(ref.file or emb.file or manifest.weights.file)
        arr = np.memmap(path, dtype=np.dtype(ref.dtype), mode="r", offset=int(ref.offset),
                        shape=tuple(int(d) for d in ref.shape))
        return host_value(name, arr)

    if not emb.quantized:
        return {"table": value(emb.dense, emb.initializer)}
    return {"packed": value(emb.packed, emb.packed.initializer or emb.initializer),
            "scales": value(emb.scales, emb.scales.initializer or f"{emb.initializer}.scales"),
            "zero_points": None if emb.zero_points is None else
            value(emb.zero_points, emb.zero_points.initializer or f"{emb.initializer}.zp"),
            "bits": int(emb.bits), "block_size": int(emb.block_size)}


def _map_weight_objects(model, manifest: Manifest) -> None:
    """Replace each initializer that references a weight file (a format-2 object, or a hard-linked format-1 store) by
    a read-only memory map of it.

    onnx-ir >= 1.1 (like onnx >= 1.19) refuses external-data files with more than one hard link (a guard against
    a hard-linked secret passing its path checks), and a cached payload is such a link by design (the weight
    cache and every artifact using it), as is the store of an artifact that was partitioned. `read_manifest` has checked each object's bytes against the blake3 its
    name and the manifest record -- content the writer chose, so nothing unknown is read -- and numpy maps them
    without the guard. The models are re-saved through `save_graphs` (a new store); no copy is made here."""
    import numpy as np
    import onnx_ir as ir

    files = manifest.weights.files
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if not isinstance(t, ir.ExternalTensor) or t.location not in files:
            continue
        if t.dtype.bitwidth % 8:
            raise RuntimeError(f"{name}: {t.dtype} payloads are not byte-aligned; cannot map them")
        arr = np.memmap(manifest.path(t.location), dtype=t.dtype.numpy(), mode="r", offset=int(t.offset or 0),
                        shape=tuple(int(d) for d in t.shape))
        value.const_value = ir.Tensor(arr, dtype=t.dtype, name=name)


# -- the embedding entry ---------------------------------------------------------------------------------------


def embedding_parts(decoder_model) -> dict:
    """The decoder's embedding table as the manifest records it: `{"table": Value}` (dense) or the MatMulNBits
    parts `{"packed", "scales", "zero_points"}` (Values; zero_points may be None) plus `bits`, `block_size`. In
    order: an untied decoder's host embedding, the tied fp32 `embed_tokens.weight`, the tied lm_head's MatMulNBits
    buffers. `{}` when the decoder has none of them."""
    graph = decoder_model.graph
    host = host_embedding(graph)
    if host is not None:
        return dict(host)
    if EMBEDDING_NAME in graph.initializers:
        return {"table": graph.initializers[EMBEDDING_NAME]}
    head = next((n for n in graph if n.domain == "com.microsoft" and n.op_type == "MatMulNBits"
                 and n.metadata_props.get("qvl.layer") == LM_HEAD_LAYER), None)
    if head is None:
        return {}
    attrs = {k: a.value for k, a in head.attributes.items()}
    inputs = list(head.inputs) + [None] * 2
    return {"packed": inputs[1], "scales": inputs[2], "zero_points": inputs[3],
            "bits": int(attrs.get("bits", 4)), "block_size": int(attrs["block_size"])}


def embedding_entry(decoder_model, weights_file: str = WEIGHTS) -> dict:
    """`embedding` for a saved decoder (`embedding_parts`): the dense table, or its MatMulNBits buffers
    (`format: "matmulnbits"`, read by `runtime/quantized_embedding.py`)."""
    import onnx_ir as ir

    parts = embedding_parts(decoder_model)
    if not parts:
        raise RuntimeError(f"decoder has neither {EMBEDDING_NAME} nor a quantized lm_head to embed tokens from")

    def part(value) -> dict | None:
        if value is None:
            return None
        t = value.const_value
        if not isinstance(t, ir.ExternalTensor):
            raise RuntimeError(f"{value.name} is not in the weight store (save the graphs first)")
        return {"offset": int(t.offset), "shape": [int(d) for d in t.shape], "dtype": t.dtype.numpy().name,
                "initializer": value.name}

    if "table" in parts:
        return {"file": weights_file, **part(parts["table"])}
    packed = part(parts["packed"])
    vocab, n_blocks, _ = packed["shape"]
    return {
        "format": "matmulnbits",
        "file": weights_file,
        "shape": [int(vocab), int(n_blocks) * parts["block_size"]],
        "dtype": "float32",
        "bits": parts["bits"],
        "block_size": parts["block_size"],
        "initializer": parts["packed"].name,
        "packed": packed,
        "scales": part(parts["scales"]),
        "zero_points": part(parts["zero_points"]),
    }


# -- manifests -------------------------------------------------------------------------------------------------


def write_artifact(out_dir: Path, fields: dict, *, side_files_from: Path | None = None) -> Manifest:
    """Finish the artifact in `out_dir` (graphs and weight store already there): copy the side files of
    `side_files_from`, record the weight store (`fields["weights"]["file"]`, default `weights.bin`) and write
    `manifest.json` from `fields` (digests computed from the files; checked against the schema)."""
    out_dir = Path(out_dir)
    if side_files_from is not None:
        mf.copy_side_files(side_files_from, out_dir)
    w = fields.get("weights") or {}
    if w.get("layout") == OBJECTS_LAYOUT and not (out_dir / WEIGHTS).is_file():
        # format 2 (a copy of a cached artifact whose weight objects were linked in: `link_weight_files`);
        # a writer that saved a new `weights.bin` gets format 1 whatever its source was
        return mf.write_manifest(out_dir, {**fields, "weights": {"layout": OBJECTS_LAYOUT}})
    name = w.get("file") or WEIGHTS
    fields = {**fields, "weights": {"file": name, "bytes": (out_dir / name).stat().st_size}}
    return mf.write_manifest(out_dir, fields)


def link_weight_files(manifest: Manifest, dst_dir: Path) -> None:
    """Hard-link (else copy) every weight file of `manifest` (its `weights.bin`, or each format-2 object) into
    `dst_dir` under the same relative path, for a scratch artifact whose graphs keep the same references."""
    for rel in manifest.weights.files:
        dst = Path(dst_dir) / rel
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(manifest.path(rel), dst)  # ONNX Runtime refuses external data outside the model's folder, and symlinks
        except OSError:
            shutil.copyfile(manifest.path(rel), dst)


def step_record(name: str, t0: float, store: WeightStoreWriter | None = None, reports: dict | None = None, **more) -> dict:
    """One entry of `steps`: name, seconds since `t0`, what it wrote, its pass reports."""
    rec = {"name": name, **more, "seconds": round(time.perf_counter() - t0, 2)}
    if store is not None:
        rec["weight_bytes_written"] = store.bytes_written
    if reports is not None:
        rec["reports"] = {k: r.to_dict() for k, r in reports.items()}
    return rec


def write_derived_artifact(src: Manifest, graphs: dict, out: Path, section: str, record: dict, reports: dict,
                           t0: float, overwrite: bool, updates: dict | None = None,
                           optimize: Callable[[Path, dict], dict] | None = None) -> Manifest:
    """Write `out` (atomically): the artifact `src` with `graphs` as one approximate pass left them -- a new
    weight store, the side files, `optimize(staging, entries)`'s sections (ORT's optimized graphs for the new
    graphs, never the source's), `manifest[section] = record` and one more step (`section`, seconds since
    `t0`, pass reports)."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        entries, store = save_graphs(graphs, tmp)
        mf.copy_side_files(src.artifact_dir, tmp)
        new = src.derive(drop=("ort_optimized",))
        new.update(optimize(tmp, entries) if optimize is not None else {})
        new.update(updates or {})
        new.update(
            graphs=entries,
            embedding=embedding_entry(graphs["decoder"]),
            steps=list(new.get("steps", [])) + [step_record(section, t0, store, reports)],
        )
        new[section] = record
        return write_artifact(tmp, new)


def publish_candidate(best: Path, out: Path, section: str, updates: dict, overwrite: bool) -> None:
    """Record the search in the chosen candidate's manifest section, then move it atomically to `out`."""
    manifest = {k: v for k, v in mf.read_manifest(best, verify_graphs=False).to_json().items()
                if k not in ("format", "format_version")}
    manifest[section].update(updates)
    mf.write_manifest(best, manifest)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        for f in Path(best).iterdir():
            shutil.move(str(f), tmp / f.name)
