"""One ONNX Runtime session for a run of consecutive decoder parts that share a placement (`part_groups`), by
joining their graphs in memory (`merge_part_graphs`).

Why: every session run has a fixed cost beyond its kernels (binding, launch, the provider's end-of-run sync). On the
lent H200 a 2B decoder cut after every layer decoded at 106 tok/s with all 29 parts on CUDA against 281 tok/s for the
whole graph (about 0.2 ms per part step, benchmarks/gpu_plans_2b_cuda_sm61_int4_h200.json). Parts cut at the
finest grain let the planner place any prefix anywhere; joining the ones a plan puts together gives that back.

The joined graph is the parts' nodes in execution order, unchanged: a value one member produces and a later member
reads becomes internal; the graph's outputs are the members' outputs that something outside the group reads (a
later part, the caller: logits, next-token ids, every present KV tensor). Initializers keep their external-data
references into the artifact's weight files (the session reads them from the artifact directory, config entry
`session.model_external_initializers_file_folder_path`), so nothing is copied or written. Only the graph protos are
parsed here (`onnx.load(load_external_data=False)`: kilobytes per part).
"""

from __future__ import annotations

import os
from pathlib import Path

# Residencies a group may have: a streamed part is loaded for its own use only, so it always runs alone.
_KEPT = ("ram", "vram")
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def joining_enabled() -> bool:
    """QVL_PART_JOIN=0 runs every part in its own session (a before/after switch for benchmarks/gpu_plans.py)."""
    return os.environ.get("QVL_PART_JOIN", "1") != "0"


def part_groups(placements: list) -> list[list[int]]:
    """Indices of runs of consecutive parts one session can run: the same decode device, the same kept residency,
    and no prefill elsewhere (a part that prefills on another device makes a session there per step, and the plan
    holds room for one part's session there, not a group's). The planner and the runner both group with this."""
    groups: list[list[int]] = []
    join = joining_enabled()
    for i, pl in enumerate(placements):
        if groups and join and _joinable(placements[groups[-1][-1]], pl):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _joinable(a, b) -> bool:
    alone = lambda p: p.residency not in _KEPT or (p.prefill_device not in (None, p.device))  # noqa: E731
    return not alone(a) and not alone(b) and (a.device, a.residency) == (b.device, b.residency)


def group_outputs(members: list, others: list) -> list[str]:
    """The members' outputs that leave the group: read by a part outside it, or by nobody (the decoder's own
    outputs), and every present KV tensor (the runner keeps them)."""
    read_outside = {n for spec in others for n in spec.inputs}
    read_anywhere = read_outside | {n for spec in members for n in spec.inputs}
    out: list[str] = []
    for spec in members:
        for name in spec.outputs:
            if name not in out and (name.startswith("present_") or name in read_outside or name not in read_anywhere):
                out.append(name)
    return out


def group_inputs(members: list) -> list[str]:
    """The members' inputs no earlier member produces, in first-use order."""
    made: set[str] = set()
    out: list[str] = []
    for spec in members:
        out.extend(n for n in spec.inputs if n not in made and n not in out)
        made.update(spec.outputs)
    return out


def merge_part_graphs(paths: list[Path], inputs: list[str], outputs: list[str], name: str) -> bytes:
    """The serialized model of the member graphs at `paths` (execution order) with graph inputs `inputs` and
    outputs `outputs`; external-data references are kept as they are."""
    import onnx

    models = [onnx.load(str(p), load_external_data=False) for p in paths]
    graph = onnx.GraphProto(name=name)
    seen_init, seen_info, declared = set(), set(), {}
    for m in models:
        g = m.graph
        graph.node.extend(g.node)
        for t in g.initializer:  # a small constant several parts share is in each of them: once is enough
            if t.name not in seen_init:
                seen_init.add(t.name)
                graph.initializer.append(t)
        for v in g.value_info:
            if v.name not in seen_info:
                seen_info.add(v.name)
                graph.value_info.append(v)
        for v in (*g.input, *g.output):
            declared.setdefault(v.name, v)
    missing = [n for n in (*inputs, *outputs) if n not in declared]
    if missing:
        raise ValueError(f"part graphs of {name} do not declare {missing}")
    graph.input.extend(declared[n] for n in inputs if n not in seen_init)
    graph.output.extend(declared[n] for n in outputs)
    first = models[0]
    model = onnx.ModelProto(ir_version=first.ir_version, producer_name=first.producer_name,
                            producer_version=first.producer_version, graph=graph)
    opsets: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    functions = {}
    for m in models:
        for f in m.functions:
            functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
    model.functions.extend(functions.values())
    return model.SerializeToString()
