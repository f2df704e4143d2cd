"""Cut a compiled artifact's decoder into layer-range parts that share its weights (`qvl-compile partition`).

Why: a 2 GB card holds only a prefix of the 2B decoder, and a RAM budget below the model's size can keep only some
layers loaded; the runtime (`runtime/backends/partitioned.py`) runs each part where the placement plan says and
passes the hidden state between them. Every node of the compiled decoder is kept exactly as it is (fusions
included), so a partitioned artifact computes what the whole graph computes, bit for bit on the same device.

How the graph is cut (the dataflow, not the node names, decides what crosses):

* The *stream* is every node that depends on `inputs_embeds`. Each stream node gets a layer index: its own name
  scope's `layers.N` (the exporter's `pkg.torch.onnx.name_scopes` metadata), else the largest index of the stream
  nodes it reads (fused nodes lose their scope: a GroupQueryAttention belongs to the layer that feeds it); the final
  norm (`norm` scope outside the layers) and everything after it is the head (index L).
* A part owns the stream nodes of its layer range. The values a part's stream nodes produce and a later part's read
  are its outputs and that part's inputs -- at a fused residual add + norm (`SkipSimplifiedLayerNormalization`) that
  is two tensors (the residual and the block output), at the DeepStack layers the residual only.
* Nodes that do not depend on `inputs_embeds` (rotary tables from `position_ids`, the mask's lengths, DeepStack
  slices) go to the first part that needs them, and their results cross to the later parts with the hidden state
  (a few KB per position): computed once per step, not once per part.

The output is a new artifact: the source's files (weight files hard-linked where the file system allows), one ONNX
file per part whose initializers reference the same weight files, and the manifest's `partition` section
(`artifacts/schema.Partition`). The whole decoder graph stays, so the artifact also runs unpartitioned.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qvl.artifacts import manifest as mf
from qvl.artifacts.writer import graph_entry, link_weight_files, step_record, write_artifact
from qvl.errors import QvlError
from qvl.toolchain.fsutil import atomic_output_dir, fault_point

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"\blayers\.(\d+)\b")
_HEAD = re.compile(r"'(?:[\w.]*\.)?norm'")  # the text model's final RMSNorm scope ("lm.norm"), not a layer's norm
HIDDEN_INPUT = "inputs_embeds"
PARTITION_VERSION = 1


@dataclass
class PartitionReport:
    parts: list[dict] = field(default_factory=list)
    position_nodes: int = 0  # position-only nodes (computed once, in the first part that needs them)
    seconds: float = 0.0

    def summary(self) -> str:
        spans = ", ".join(p["name"] for p in self.parts)
        return (f"{len(self.parts)} parts ({spans}); {self.position_nodes} position-only nodes computed once; "
                f"{self.seconds:.1f} s")


def parse_cuts(num_layers: int, every: int | None, at: str | None) -> list[int]:
    """Layer indices where a new part starts (0 and L excluded), from `--every N` or `--at 7,14,21`."""
    if (every is None) == (at is None):
        raise QvlError("give exactly one of --every N and --at I,J,...", hint="e.g. --every 1 (one part per layer)")
    if every is not None:
        if every < 1:
            raise QvlError(f"--every must be at least 1 (got {every})", hint="--every 1 cuts after every layer")
        return list(range(every, num_layers, every))
    try:
        cuts = sorted({int(x) for x in at.split(",") if x.strip()})
    except ValueError:
        raise QvlError(f"--at {at!r} is not a comma-separated list of layer indices", hint="e.g. --at 7,14,21") from None
    bad = [c for c in cuts if not 0 < c < num_layers]
    if bad or not cuts:
        raise QvlError(f"--at {at!r}: cut points must lie in 1..{num_layers - 1} (this decoder has {num_layers} layers)",
                       hint="a cut at I starts a new part with layer I")
    return cuts


def _scope(node) -> str:
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            return p.value
    return ""


def _layer_of_scope(scope: str, num_layers: int) -> int | None:
    found = _LAYER.findall(scope)
    if found:
        return int(found[-1])
    if _HEAD.search(scope):
        return num_layers
    return None


def assign_layers(graph, num_layers: int) -> tuple[dict[int, int], dict[str, int]]:
    """(stream node index -> layer index, stream value name -> producing node index)."""
    if HIDDEN_INPUT not in {i.name for i in graph.input}:
        raise QvlError(f"the decoder graph has no {HIDDEN_INPUT!r} input: not a qvl decoder")
    for node in graph.node:
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS: outer-scope reads are not tracked
            raise QvlError(f"cannot partition: node {node.name!r} ({node.op_type}) has a subgraph",
                           hint="partition artifacts compiled by this qvl-compile version")
    stream_values = {HIDDEN_INPUT}
    producer: dict[str, int] = {}
    layer: dict[int, int] = {}
    for k, node in enumerate(graph.node):  # ONNX graphs are topologically sorted
        reads = [x for x in node.input if x in stream_values]
        if not reads:
            continue
        own = _layer_of_scope(_scope(node), num_layers)
        inherited = max((layer[producer[x]] for x in reads if x in producer), default=0)
        layer[k] = max(own if own is not None else 0, inherited)
        for out in node.output:
            if out:
                stream_values.add(out)
                producer[out] = k
    if num_layers not in layer.values():
        raise QvlError("cannot find the decoder's final norm (no node has the text model's `norm` scope)",
                       hint="partition needs the name scopes the qvl exporter writes; re-compile the artifact")
    return layer, producer


def _part_of(layer_index: int, starts: list[int], num_layers: int) -> int:
    if layer_index >= num_layers:
        return len(starts)  # the head
    return max(i for i, s in enumerate(starts) if s <= layer_index)


def split_graph(model, num_layers: int, cuts: list[int]):
    """The part ModelProtos (in order, the head last), their layer spans, and how many position-only nodes they
    hold (computed once, in the first part that needs them)."""
    import onnx

    graph = model.graph
    layer, producer = assign_layers(graph, num_layers)
    starts = [0, *cuts]
    spans = [(s, e) for s, e in zip(starts, [*cuts, num_layers])] + [(num_layers, num_layers)]
    n_parts = len(spans)
    part = {k: _part_of(l, starts, num_layers) for k, l in layer.items()}
    for k, p in part.items():  # a value read by an earlier part than its producer's would be a cycle between parts
        for x in graph.node[k].input:
            if x in producer and part[producer[x]] > p:
                raise QvlError(f"cannot partition: {graph.node[k].name!r} (layer {layer[k]}) reads {x!r} from a later layer")
    graph_inputs = {i.name: i for i in graph.input}
    graph_outputs = {o.name: o for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    value_info = {v.name: v for v in graph.value_info}
    # Crossing values need their element types (an index computed from the hidden state's shape crosses as int64):
    # ONNX's own inference fills in what the exporter did not record (contrib ops' outputs stay unknown: those are
    # hidden-state tensors, typed like `inputs_embeds` by `_value_info`).
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    for v in inferred:
        value_info.setdefault(v.name, v)
    value_info.update(graph_outputs)
    made_by = {out: k for k, node in enumerate(graph.node) for out in node.output if out}
    # Position-only nodes (rotary tables, the mask's lengths, DeepStack slices) go to the earliest part that needs
    # them and their results cross to the later parts like the hidden state: recomputing them in every part cost
    # ~1 ms of kernel launches per part per decode step at 2B (29 parts: decode 14 -> 23 tok/s when shared).
    home = dict(part)
    for p in range(n_parts):
        stack = [x for k in sorted(k for k, q in part.items() if q == p) for x in graph.node[k].input]
        while stack:
            k = made_by.get(stack.pop())
            if k is None or k in home:
                continue
            home[k] = p
            stack.extend(graph.node[k].input)
    crossing: list[dict[str, None]] = [dict() for _ in range(n_parts)]  # part -> values it receives
    sent: list[dict[str, None]] = [dict() for _ in range(n_parts)]  # part -> values it sends
    for k, p in home.items():
        for x in graph.node[k].input:
            if x in made_by and home[made_by[x]] != p:
                crossing[p][x] = None
                sent[home[made_by[x]]][x] = None
    models = []
    for p in range(n_parts):
        nodes = [graph.node[k] for k in sorted(k for k, q in home.items() if q == p)]
        read = {x for n in nodes for x in n.input if x}
        inputs = [graph_inputs[x] for x in graph_inputs if x in read]
        for x in crossing[p]:
            inputs.append(_value_info(x, value_info, graph_inputs[HIDDEN_INPUT]))
        outs = [graph_outputs[o] for o in graph_outputs if home.get(made_by.get(o)) == p]
        for x in sent[p]:
            outs.append(_value_info(x, value_info, graph_inputs[HIDDEN_INPUT]))
        g = onnx.helper.make_graph(nodes, f"decoder_part{p}", inputs, outs,
                                   initializer=[initializers[x] for x in initializers if x in read],
                                   value_info=[value_info[x] for x in value_info
                                               if x in read and x not in graph_inputs and x not in crossing[p]
                                               and x not in initializers and x not in graph_outputs])
        _own_cache_shapes(g)
        m = onnx.helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        m.producer_name = "qvl-compile partition"
        models.append(m)
    missing = [o for o in graph_outputs if not any(o in {x.name for x in m.graph.output} for m in models)]
    if missing:
        raise QvlError(f"cannot partition: outputs {missing} are not computed by any part")
    return models, spans, sum(1 for k in home if k not in part)


_PAST = re.compile(r"past_(key|value)_(\d+)")
_PRESENT = re.compile(r"present_(key|value)_(\d+)")


def _own_cache_shapes(g) -> None:
    """The exported prologue reads the cache's length from `past_key_0`'s shape; a part that does not hold layer 0
    reads it from its own first layer's cache instead (every layer's cache has the same shape at every step, in
    every KV layout), so a part needs no other part's cache."""
    owned = sorted(int(m.group(2)) for o in g.output if (m := _PRESENT.fullmatch(o.name)) and m.group(1) == "key")
    if not owned:
        return
    rename = {}
    for i in list(g.input):
        m = _PAST.fullmatch(i.name)
        if m and int(m.group(2)) not in owned:
            rename[i.name] = f"past_{m.group(1)}_{owned[0]}"
    if not rename:
        return
    for node in g.node:
        for j, x in enumerate(node.input):
            if x in rename:
                node.input[j] = rename[x]
    keep = [i for i in g.input if i.name not in rename]
    del g.input[:]
    g.input.extend(keep)


def _value_info(name: str, known: dict, like):
    """A graph I/O declaration for a crossing value: its inferred type if the graph has it, else the hidden
    state's element type with the shape left to ONNX Runtime (every crossing value is a stream tensor)."""
    import onnx

    if name in known and known[name].type.tensor_type.elem_type:
        return known[name]
    return onnx.helper.make_tensor_value_info(name, like.type.tensor_type.elem_type, None)


def _external(t) -> tuple[str, int, int] | None:
    if t.data_location != 1:  # onnx.TensorProto.EXTERNAL
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def weight_runs(model) -> tuple[int, list[list]]:
    """(distinct external bytes, [file, offset, length] runs in initializer order, adjacent ones merged)."""
    seen, runs, total = set(), [], 0
    for t in model.graph.initializer:
        ref = _external(t)
        if ref is None or ref in seen:
            continue
        seen.add(ref)
        total += ref[2]
        loc, off, n = ref
        if runs and runs[-1][0] == loc and runs[-1][1] + runs[-1][2] <= off <= runs[-1][1] + runs[-1][2] + 4096:
            runs[-1][2] = off + n - runs[-1][1]  # page-alignment padding between adjacent tensors included
        else:
            runs.append([loc, off, n])
    return total, runs


def _graph_weight_bytes(path: Path) -> int:
    import onnx

    return weight_runs(onnx.load(str(path), load_external_data=False))[0]


def _copy_artifact_files(m, dst: Path) -> None:
    """Everything of the source artifact into `dst`: weight files linked (else copied), the rest copied."""
    link_weight_files(m, dst)
    weight_paths = {Path(rel).parts[0] for rel in m.weights.files}
    for f in m.artifact_dir.iterdir():
        if f.name in weight_paths or f.name == mf.MANIFEST or not f.is_file():
            continue
        shutil.copy2(f, dst / f.name)


def partition_artifact(artifact: Path, out: Path, every: int | None = None, at: str | None = None,
                       overwrite: bool = False, step=None) -> PartitionReport:
    import onnx
    import onnx_ir as ir

    t0 = time.perf_counter()
    say = step or (lambda _msg: None)
    m = mf.read_manifest(Path(artifact))
    if m.kit is not None:
        raise QvlError(f"{artifact} is a TensorRT engine kit: partitioned engines are not built yet",
                       hint="partition an ONNX Runtime artifact (compile --target cpu / cuda / cuda-sm61)")
    if m.partition is not None:
        raise QvlError(f"{artifact} is already partitioned ({len(m.partition.parts)} parts)",
                       hint="partition the artifact it was made from")
    L = m.model.num_layers
    cuts = parse_cuts(L, every, at)
    say(f"cutting the decoder of {artifact} into {len(cuts) + 1} layer parts + head")
    src = onnx.load(str(m.graph_path("decoder")), load_external_data=False)
    models, spans, position_nodes = split_graph(src, L, cuts)
    report = PartitionReport(position_nodes=position_nodes)
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(Path(artifact),)) as tmp:
        _copy_artifact_files(m, tmp)
        fault_point("partition-copied")
        fields = m.derive()
        graphs = dict(fields["graphs"])
        parts = []
        for i, (model, (start, stop)) in enumerate(zip(models, spans)):
            head = i == len(models) - 1
            name = "head" if head else (f"layer.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}")
            gname = "decoder.head" if head else f"decoder.part{i}"
            file = f"{gname}.onnx"
            onnx.save(model, str(tmp / file))
            graphs[gname] = graph_entry(ir.from_proto(model), tmp / file)  # the entry every graph gets
            nbytes, runs = weight_runs(model)
            sig = graphs[gname]
            parts.append({"name": name, "graph": gname, "kind": "head" if head else "layers", "layers": [start, stop],
                          "weight_bytes": nbytes, "inputs": [v["name"] for v in sig["inputs"]],
                          "outputs": [v["name"] for v in sig["outputs"]], "ranges": runs})
        hidden = m.model.hidden_size
        crossing = max(sum(1 for n in p["inputs"] if n not in {v["name"] for v in fields["graphs"]["decoder"]["inputs"]})
                       for p in parts)
        emb = m.embedding
        fields["graphs"] = graphs
        fields["partition"] = {
            "version": PARTITION_VERSION, "parts": parts,
            "vision_weight_bytes": _graph_weight_bytes(m.graph_path("vision")),
            "embedding_bytes": int(_embedding_bytes(emb)),
            "boundary_bytes_per_position": crossing * hidden * 4,
        }
        report.parts = [{k: p[k] for k in ("name", "layers", "weight_bytes")} for p in parts]
        report.seconds = round(time.perf_counter() - t0, 2)
        fields["steps"] = list(fields.get("steps", [])) + [step_record(
            "partition", t0, cuts=cuts, parts=len(parts), position_nodes=position_nodes)]
        write_artifact(tmp, fields)
    return report


def _embedding_bytes(emb) -> int:
    import numpy as np

    rows, cols = emb.shape
    if emb.format is None:
        return rows * cols * np.dtype(emb.dtype or "float32").itemsize
    blocks = -(-cols // emb.block_size)
    return rows * blocks * (emb.block_size * emb.bits // 8 + 4)  # packed codes + one fp32 scale per block
