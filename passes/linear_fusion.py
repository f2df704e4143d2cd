"""Sibling linear fusion: linear layers reading the same activation -> one wider linear + `Split` (exact).

In each decoder layer q/k/v (3 siblings: N = 2048, 1024, 1024 on the 2B model) and the MLP's gate/up (2
siblings, N = 6144 each) read the same normalized hidden state. At batch 1 each is a separate GEMV: a kernel
launch of 7-16 us on a GPU whatever its size, a thread-pool dispatch on the CPU. Concatenating the weights
along N and splitting the output on its last axis computes the very same dot products (each output column
still reduces over the same K values of the same activation), with 3 fewer GEMVs per layer:

* `MatMul(x, W_i)`, W_i a constant float32 `[K, N_i]` initializer -> `MatMul(x, concat(W_i, axis=1))`;
* `com.microsoft.MatMulNBits(x, B_i, scales_i[, zero_points_i][, bias_i])` with equal K, bits, block_size,
  accuracy_level (every attribute but N) and the same optional inputs -> B `[N, n_blocks, blob]`, scales,
  zero points (one packed row per output column) and bias concatenated along their N axis. `g_idx`
  (act-order) is refused: its permutation is per weight.

Siblings share the exact same input value (never fused across inputs) and all their weights are constant.
A linear consumer of a shared input that cannot join is listed in `report.skipped` with its reason (`check`:
non-constant weight, g_idx, its output a graph output, the tied lm_head; `mismatch`: an attribute, dtype, K
or optional input that differs from the group's first member). The tied lm_head / embedding matrix is never
fused (the runtime reads its rows as the embedding table, `runtime/quantized_embedding.py`).

Metadata: the fused node's `qvl.layer` is its members' layer keys (`linear_sites.layer_key`), deduplicated and
joined with "+": `decoder.layers.3` for q/k/v of one layer (so the accuracy budget, `inspect_precision` and
the manifest keep seeing real layer keys), `decoder.a+decoder.b` only when members belong to different layers.
`qvl.fused` names every member by module path, common prefix once: `lm.layers.3.self_attn.q_proj+k_proj+v_proj`;
the new initializers are named after it. The Split outputs keep the members' output names. The accuracy
budget's rollback runs before this pass (stage "packing", after "weights"), so it sees unfused layers.

Not an onnxscript rewrite rule: a pattern has a fixed arity, while a site here is "every linear consumer of
one value", 2 or 3 (or more) of them, partitioned by compatibility; a direct walk over each value's uses is
simpler than one rule per arity and reports the refused members of a site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qvl.passes.base import GraphPass, PassReport, Skip
from qvl.passes.linear_sites import EMBEDDING_NAME, LM_HEAD_LAYER, add_initializer, layer_key, module_path

MS_DOMAIN = "com.microsoft"
SEPARATOR = "+"
FUSED_KEY = "qvl.fused"  # metadata: the members' module paths (or node names), joined with SEPARATOR
_NBITS_OPTIONAL = ("zero_points", "g_idx", "bias")  # MatMulNBits inputs 3, 4, 5


@dataclass(frozen=True)
class SiblingLinearFusionConfig:
    graphs: tuple[str, ...] = ("decoder", "vision")
    min_siblings: int = 2  # fewest compatible siblings worth fusing

    def __post_init__(self):
        if self.min_siblings < 2:
            raise ValueError(f"min_siblings must be >= 2, not {self.min_siblings}")


def form(node: ir.Node) -> str | None:
    """"matmul" / "matmulnbits" for the two linear forms this pass fuses, None for anything else."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return "matmul"
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        return "matmulnbits"
    return None


def _is_const(value) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def check(node: ir.Node, graph_name: str) -> str | None:
    """Why this linear node cannot be a member of any fused group (None: it can)."""
    if node.outputs[0].is_graph_output():
        return f"output {node.outputs[0].name} is a graph output"
    names = [v.name or "" for v in node.inputs[1:] if v is not None]
    if layer_key(node, graph_name, names[0] if names else None) == LM_HEAD_LAYER or any(
            n == EMBEDDING_NAME or n.startswith(EMBEDDING_NAME + ".") for n in names):
        return "tied lm_head / embedding matrix (the runtime reads its rows)"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if form(node) == "matmul":
        if not _is_const(w):
            return f"weight {getattr(w, 'name', None)} is not a constant initializer"
        if w.dtype != ir.DataType.FLOAT or len(w.const_value.shape) != 2:
            return f"weight {w.name} is not a float32 [K, N] matrix"
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None:
        return "g_idx (act-order) present: its row permutation is per weight"
    for label, v in zip(("B", "scales", "zero_points", "bias"), (inputs[1], inputs[2], inputs[3], inputs[5])):
        if (v is not None or label in ("B", "scales")) and not _is_const(v):
            return f"{label} {getattr(v, 'name', None)} is not a constant initializer"
    n = node.attributes.get("N")
    if n is None or inputs[1].const_value.shape[0] != n.value or any(
            v is not None and v.const_value.size % n.value for v in inputs[2:]):
        return "B / scales / zero_points / bias are not laid out with N leading"
    return None


def _desc(value) -> str:
    if value is None:
        return "absent"
    return f"{value.dtype.name if value.dtype is not None else '?'} rank {len(value.const_value.shape)}"


def signature(node: ir.Node) -> dict:
    """What siblings must agree on to be concatenated along N."""
    x = node.inputs[0].dtype
    if form(node) == "matmul":
        w = node.inputs[1]
        return {"op": "MatMul", "K": w.const_value.shape[0], "weight": _desc(w), "input dtype": getattr(x, "name", x)}
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    sig = {"op": "MatMulNBits", "input dtype": getattr(x, "name", x)}
    sig.update({k: a.value for k, a in sorted(node.attributes.items()) if k != "N"})
    sig["B blocks"] = f"{_desc(inputs[1])} {tuple(inputs[1].const_value.shape[1:])}"
    sig["scales"] = _desc(inputs[2])
    sig.update({label: _desc(v) for label, v in zip(_NBITS_OPTIONAL, inputs[3:6])})
    return sig


def mismatch(ref: ir.Node, node: ir.Node) -> str | None:
    """The first field in which `node` differs from the group's first member `ref` (None: compatible)."""
    a, b = signature(ref), signature(node)
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            return f"{key} {b.get(key)} differs from {a.get(key)} of sibling {ref.name}"
    return None


def joined(names: list[str]) -> str:
    """`a.b.q_proj`, `a.b.k_proj` -> `a.b.q_proj+k_proj`: the common dotted prefix once, then the rest."""
    parts = [n.split(".") for n in names]
    i = 0
    while all(len(p) > i + 1 for p in parts) and len({p[i] for p in parts}) == 1:
        i += 1
    return ".".join(parts[0][:i] + [SEPARATOR.join(".".join(p[i:]) for p in parts)])


class SiblingLinearFusionPass(GraphPass):
    """Fuse constant-weight MatMul / MatMulNBits siblings of one input into one wider node + Split."""

    name = "sibling_linear_fusion"
    config_type = SiblingLinearFusionConfig
    scope = "sibling linear fusion"
    count_keys = ("fused_groups", "linears_removed", "matmul_groups", "matmulnbits_groups")

    def start(self, model, report: PassReport) -> None:
        super().start(model, report)
        report.details["groups"] = []

    def run(self, model, report: PassReport) -> None:
        graph = model.graph
        order = {id(n): i for i, n in enumerate(graph)}
        inputs, seen = [], set()
        for node in graph:
            if form(node) is not None and node.inputs and node.inputs[0] is not None and id(node.inputs[0]) not in seen:
                seen.add(id(node.inputs[0]))
                inputs.append(node.inputs[0])
        for x in inputs:
            users = sorted({id(u.node): u.node for u in x.uses() if u.idx == 0 and form(u.node)}.values(),
                           key=lambda n: order[id(n)])
            if len(users) < 2:
                continue
            eligible = []
            for node in users:
                reason = check(node, self.graph)
                if reason is None:
                    eligible.append(node)
                else:
                    report.skipped.append(Skip(node.name, f"{x.name}: {reason}"))
            parts: list[list[ir.Node]] = []
            for node in eligible:
                part = next((p for p in parts if mismatch(p[0], node) is None), None)
                if part is None:
                    parts.append([node])
                else:
                    part.append(node)
            parts.sort(key=len, reverse=True)  # stable: the largest group first, graph order within
            few = self.config.min_siblings
            for node in (n for p in parts if len(p) < few for n in p):  # reasons first: fusing clears the nodes
                ref = parts[0][0]
                why = mismatch(ref, node) if node is not ref else None
                why = why or f"{len(parts[0])} compatible sibling(s), fewer than min_siblings={few}"
                report.skipped.append(Skip(node.name, f"{x.name}: {why}"))
            for part in parts:
                if len(part) >= self.config.min_siblings:
                    self._fuse(model, part, report)

    def _fuse(self, model: ir.Model, members: list[ir.Node], report: PassReport) -> None:
        graph = model.graph
        kind = form(members[0])
        paths = [module_path(m, m.inputs[1].name) or m.name for m in members]
        base = joined(paths)
        layers = list(dict.fromkeys(layer_key(m, self.graph, m.inputs[1].name) for m in members))
        widths = [int(m.inputs[1].const_value.shape[1] if kind == "matmul" else m.attributes["N"].value) for m in members]
        first = members[0]

        def concat(index: int, axis: int, suffix: str) -> ir.Value | None:
            if index >= len(first.inputs) or first.inputs[index] is None:
                return None
            arr = np.concatenate([m.inputs[index].const_value.numpy() for m in members], axis=axis)
            return add_initializer(graph, base + suffix, arr)

        if kind == "matmul":
            new_inputs = [first.inputs[0], concat(1, 1, ".weight")]
            attributes = []
        else:
            new_inputs = [first.inputs[0], concat(1, 0, ".weight.q"), concat(2, 0, ".weight.scales")]
            optional = [concat(3, 0, ".weight.zp"), None, concat(5, 0, ".bias")]
            while optional and optional[-1] is None:
                optional.pop()
            new_inputs += optional
            attributes = [ir.AttrInt64("N", sum(widths)) if k == "N" else a for k, a in first.attributes.items()]
        common = {k: v for k, v in first.metadata_props.items()
                  if all(m.metadata_props.get(k) == v for m in members[1:])}
        fused = ir.Node(first.domain, first.op_type, new_inputs, attributes=attributes,
                        name=SEPARATOR.join(m.name for m in members),
                        metadata_props={**common, "qvl.layer": SEPARATOR.join(layers), FUSED_KEY: base})
        old_outs = [m.outputs[0] for m in members]
        out = fused.outputs[0]
        out.name = SEPARATOR.join(o.name for o in old_outs)
        out.type = old_outs[0].type
        shapes = [o.shape for o in old_outs]
        if all(s is not None and s.rank() == shapes[0].rank() for s in shapes):
            out.shape = ir.Shape(list(shapes[0].dims[:-1]) + [sum(widths)])
        if graph.opset_imports.get("", 13) >= 13:
            sizes = add_initializer(graph, base + ".split", np.array(widths, dtype=np.int64))
            split = ir.Node("", "Split", [out, sizes], attributes=[ir.AttrInt64("axis", -1)],
                            num_outputs=len(members), name=fused.name + "/split")
        else:
            split = ir.Node("", "Split", [out], attributes=[ir.AttrInt64("axis", -1), ir.AttrInt64s("split", widths)],
                            num_outputs=len(members), name=fused.name + "/split")
        graph.insert_before(first, [fused, split])
        ir.convenience.replace_all_uses_with(old_outs, list(split.outputs))
        old_weights = [v for m in members for v in m.inputs[1:] if v is not None]
        graph.remove(members, safe=True)
        for old, new in zip(old_outs, split.outputs):
            name, old.name = old.name, None
            new.name, new.type, new.shape = name, old.type, old.shape
        for v in old_weights:
            if not v.uses() and v.name in graph.initializers and not v.is_graph_input():
                graph.initializers.pop(v.name)
                release = getattr(v.const_value, "release", None)
                if release is not None:
                    release()
        report.counts["fused_groups"] += 1
        report.counts["linears_removed"] += len(members) - 1
        report.counts[f"{kind}_groups"] += 1
        report.details["groups"].append({"node": fused.name, "op": first.op_type, "members": [m.name for m in members],
                                         "fused": base, "layer": fused.metadata_props["qvl.layer"], "N": widths})
