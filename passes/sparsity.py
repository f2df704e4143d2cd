"""Structured MLP channel sparsity: remove the least important intermediate channels of SwiGLU MLPs.

Every decoder layer's MLP `down(silu(gate(x)) * up(x))` is exported as

    g = MatMul(x, Wg[K, F]);  s = Sigmoid(g);  a = Mul(g, s)          (silu)
    u = MatMul(x, Wu[K, F]);  h = Mul(a, u);   y = MatMul(h, Wd[F, K])

Intermediate channel f only ever meets channel f of the other branch (Sigmoid and Mul are element-wise),
so removing it is exact slicing: `Wg[:, keep]`, `Wu[:, keep]`, `Wd[keep, :]`. The op list is unchanged and
the three MatMuls really get smaller (F -> F_keep): fewer bytes streamed per decoded token and fewer
FLOPs on any target, standard ONNX only (TensorRT included, no contrib op).

Importance score of channel f (data-free, from the weights alone):

    score[f] = ||Wd[f, :]||_2 * ||Wg[:, f]||_2 * ||Wu[:, f]||_2

For an input x the channel contributes `silu(x.Wg[:, f]) * (x.Wu[:, f]) * Wd[f, :]` to the output; with
silu(g) ~ g for large |g| that is bilinear in the two column projections, so the product of the three
norms bounds the channel's contribution up to |x|^2 (Cauchy-Schwarz). A product (not a sum) makes a
channel with any one all-zero weight vector score exactly 0: removing it changes nothing.

The `ratio` fraction of channels with the smallest scores is removed (ties: lower index first). The
number kept is `F - round(ratio * F)` rounded *up* to a multiple of `align` (default 32, capped at F), so
that a later precision pass (`passes/precision.py`, MatMulNBits block 32) still quantizes the down
projection, whose K becomes F_keep. Kept channels stay in their original order.

Scope and skips (each with its reason in the report): only graphs in `config.graphs` (the decoder);
layers (`linear_sites.layer_key`: `decoder.layers.3`) not in `config.layers` or listed in `config.keep`;
an MLP-scoped layer without the SwiGLU pattern (pattern mismatch: other activation, bias Adds,
intermediates used elsewhere, shared weights); MatMulNBits weights (already quantized: sparsity runs
*before* precision; this pass needs fp32 `[K, F]` initializers).

Idempotence: the three pruned nodes carry `metadata_props["qvl.sparsity"]` (JSON: channels before /
after, ratio). A second application skips such a layer with reason "already pruned" and never prunes it
again: `ratio` is always a fraction of the *original* width. `ratio=0` (or a rounding that keeps all F)
changes nothing and marks nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qvl.passes.base import GraphPass, PassReport, Skip
from qvl.passes.linear_sites import layer_key, name_scopes

METADATA_KEY = "qvl.sparsity"


@dataclass(frozen=True)
class SparsityConfig:
    ratio: float = 0.25  # fraction of each MLP's intermediate channels removed
    layers: frozenset | None = None  # layer keys ("decoder.layers.3") to prune; None: every layer
    keep: frozenset = frozenset()  # layer keys left dense (the accuracy budget's roll-backs)
    align: int = 32  # kept channel count rounded up to a multiple of this (MatMulNBits block size)
    graphs: tuple[str, ...] = ("decoder",)

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), not {self.ratio}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, not {self.align}")
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(self.layers))
        object.__setattr__(self, "keep", frozenset(self.keep))

    def kept_channels(self, f: int) -> int:
        """How many of `f` intermediate channels stay."""
        n = f - int(round(self.ratio * f))
        n = -(-n // self.align) * self.align
        return max(1, min(f, n))

    def to_dict(self) -> dict:
        return {
            "ratio": self.ratio,
            "layers": None if self.layers is None else sorted(self.layers),
            "keep": sorted(self.keep),
            "align": self.align,
            "graphs": list(self.graphs),
        }


def channel_scores(w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """score[f] = ||Wd[f,:]|| * ||Wg[:,f]|| * ||Wu[:,f]|| (float64) for `[K,F]`, `[K,F]`, `[F,K]` weights."""
    g = np.linalg.norm(np.asarray(w_gate, np.float64), axis=0)
    u = np.linalg.norm(np.asarray(w_up, np.float64), axis=0)
    d = np.linalg.norm(np.asarray(w_down, np.float64), axis=1)
    return d * g * u


def kept_indices(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the `n_keep` highest scores, in ascending channel order (ties: lower index removed first)."""
    order = np.lexsort((np.arange(len(scores)), scores))  # ascending score, then index
    return np.sort(order[len(scores) - n_keep:])


@dataclass
class _SwiGLU:
    gate: ir.Node
    up: ir.Node
    down: ir.Node
    sigmoid: ir.Node
    silu: ir.Node
    mul: ir.Node

    @property
    def intermediates(self) -> list[ir.Value]:
        return [self.gate.outputs[0], self.up.outputs[0], self.sigmoid.outputs[0], self.silu.outputs[0],
                self.mul.outputs[0]]


def _is(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type == op


def _const_weight(node: ir.Node) -> ir.Value | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or not w.is_initializer():
        return None
    return w


def _only_used_by(value: ir.Value, nodes: list[ir.Node]) -> bool:
    if value.is_graph_output():
        return False
    users = [u.node for u in value.uses()]
    return len(users) == len(nodes) and all(any(u is n for n in nodes) for u in users)


def _match(down: ir.Node) -> _SwiGLU | str:
    """The SwiGLU MLP ending in `down`, or why it is not one."""
    if _is(down, "Gemm"):
        return "Gemm linear layers (bias / transB), not the bias-free MatMul SwiGLU pattern"
    if not _is(down, "MatMul"):
        return f"{down.op_type} is not a MatMul"
    wd = _const_weight(down)
    if wd is None:
        return "down projection has no constant weight"
    mul = down.inputs[0].producer()
    if not _is(mul, "Mul"):
        return f"down projection input comes from {mul.op_type if mul else 'a graph input'}, not Mul(silu(gate), up)"
    p0, p1 = (v.producer() for v in mul.inputs)
    silu, up = (p0, p1) if _is(p0, "Mul") and _is(p1, "MatMul") else (p1, p0)
    if not (_is(silu, "Mul") and _is(up, "MatMul")):
        ops = sorted(p.op_type if p else "input" for p in (p0, p1))
        return f"gating Mul inputs come from {ops}, expected [MatMul (up), Mul (silu)]"
    q0, q1 = (v.producer() for v in silu.inputs)
    sigmoid, gate = (q0, q1) if _is(q0, "Sigmoid") else (q1, q0)
    if not (_is(sigmoid, "Sigmoid") and _is(gate, "MatMul")):
        return "activation is not silu = Mul(g, Sigmoid(g)) over a MatMul (not SwiGLU)"
    if sigmoid.inputs[0] is not gate.outputs[0]:
        return "Sigmoid and Mul of the silu read different values"
    if gate.inputs[0] is not up.inputs[0]:
        return "gate and up projections read different inputs"
    wg, wu = _const_weight(gate), _const_weight(up)
    if wg is None or wu is None:
        return "gate/up projection has no constant weight"
    for w in (wg, wu, wd):
        if w.dtype != ir.DataType.FLOAT:
            return f"weight {w.name} dtype {w.dtype} is not float32"
        if len(w.const_value.shape) != 2:
            return f"weight {w.name} rank {len(w.const_value.shape)} is not 2"
    (k, f), (k2, f2), (f3, k3) = (tuple(w.const_value.shape) for w in (wg, wu, wd))
    if not (k == k2 == k3 and f == f2 == f3):
        return f"weight shapes disagree: gate {[k, f]}, up {[k2, f2]}, down {[f3, k3]}"
    if len({id(wg), id(wu), id(wd)}) < 3 or any(len(w.uses()) != 1 for w in (wg, wu, wd)):
        return "an MLP weight is shared with another node"
    m = _SwiGLU(gate, up, down, sigmoid, silu, mul)
    for value, users in ((gate.outputs[0], [sigmoid, silu]), (sigmoid.outputs[0], [silu]),
                         (silu.outputs[0], [mul]), (up.outputs[0], [mul]), (mul.outputs[0], [down])):
        if not _only_used_by(value, users):
            return f"intermediate {value.name} is used outside the MLP (slicing would change it)"
    return m


def _is_mlp_scoped(node: ir.Node) -> bool:
    scopes = name_scopes(node)
    return any(".mlp" in s or s.endswith("mlp") for s in scopes)


class MlpChannelSparsityPass(GraphPass):
    """Slice away the lowest-scoring intermediate channels of every SwiGLU MLP (gate/up columns, down rows)."""

    name = "sparsity"
    config_type = SparsityConfig
    scope = "MLP channel sparsity"

    count_keys = ("layers_pruned", "channels_removed", "bytes_saved")

    def start(self, model, report: PassReport) -> None:
        super().start(model, report)
        report.details.update(config=self.config.to_dict(), layers={}, bytes_before=0, bytes_after=0, already_pruned=0)

    def run(self, model, report: PassReport) -> None:
        cfg: SparsityConfig = self.config
        graph_name = self.graph
        details = report.details
        graph = model.graph
        layers: dict[str, dict] = details["layers"]
        matched: dict[str, list[_SwiGLU]] = {}
        mismatch: dict[str, str] = {}
        quantized: dict[str, str] = {}
        for node in graph:
            if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
                if _is_mlp_scoped(node):
                    w = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None
                    quantized.setdefault(layer_key(node, graph_name, w), node.name)
                continue
            if not (_is(node, "MatMul") or _is(node, "Gemm")) or _const_weight(node) is None:
                continue
            m = _match(node)
            layer = layer_key(node, graph_name, node.inputs[1].name)
            if isinstance(m, _SwiGLU):
                matched.setdefault(layer, []).append(m)
            elif _is_mlp_scoped(node):
                mismatch[layer] = f"{node.name}: {m}"  # the last MLP MatMul (the down projection) wins

        for layer, node_name in quantized.items():
            if layer not in matched:
                self._skip(report, layers, layer, f"MatMulNBits weights ({node_name}): already quantized; "
                                                  "sparsity needs fp32 weights and runs before precision")
        for layer, reason in mismatch.items():
            if layer not in matched and layer not in quantized:
                self._skip(report, layers, layer, f"pattern mismatch: {reason}")

        for layer, mlps in matched.items():
            if len(mlps) > 1:
                layer_names = [f"{layer}#{i}" for i in range(len(mlps))]
            else:
                layer_names = [layer]
            for key, m in zip(layer_names, mlps):
                self._prune(report, layers, key, layer, m, cfg)

    def _prune(self, report: PassReport, layers: dict, key: str, layer: str, m: _SwiGLU, cfg: SparsityConfig) -> None:
        details = report.details
        wg, wu, wd = (n.inputs[1] for n in (m.gate, m.up, m.down))
        f = int(wg.const_value.shape[1])
        nbytes = sum(w.const_value.nbytes for w in (wg, wu, wd))
        entry = {"decision": "dense", "nodes": [m.gate.name, m.up.name, m.down.name],
                 "channels_before": f, "channels_after": f, "bytes_before": nbytes, "bytes_after": nbytes,
                 "bytes_saved": 0}
        layers[key] = entry
        details["bytes_before"] += nbytes
        details["bytes_after"] += nbytes
        marked = m.down.metadata_props.get(METADATA_KEY)
        reason = None
        if marked:
            info = json.loads(marked)
            entry.update(decision="pruned", channels_before=info["channels_before"], channels_after=f)
            details["already_pruned"] += 1
            reason = f"already pruned ({info['channels_before']} -> {f} channels); ratio applies to the original width"
        elif cfg.layers is not None and layer not in cfg.layers and key not in cfg.layers:
            reason = "not in config.layers"
        elif layer in cfg.keep or key in cfg.keep:
            reason = "kept dense (config.keep)"
        if reason is not None:
            entry["reason"] = reason
            report.skipped.append(Skip(key, reason))
            return
        n_keep = cfg.kept_channels(f)
        if n_keep == f:
            entry["reason"] = f"ratio {cfg.ratio} keeps all {f} channels (align {cfg.align})"
            return
        g, u, d = (w.const_value.numpy() for w in (wg, wu, wd))
        scores = channel_scores(g, u, d)
        keep = kept_indices(scores, n_keep)
        removed = np.setdiff1d(np.arange(f), keep)
        for w, arr in ((wg, g[:, keep]), (wu, u[:, keep]), (wd, d[keep, :])):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            w.const_value = ir.tensor(arr, name=w.name)
            w.shape = ir.Shape(arr.shape)
        for v in m.intermediates:
            if v.shape is not None and v.shape.rank() >= 1 and v.shape[-1] == f:
                v.shape = ir.Shape([*list(v.shape)[:-1], n_keep])
        mark = json.dumps({"channels_before": f, "channels_after": n_keep, "ratio": cfg.ratio})
        for n in (m.gate, m.up, m.down):
            n.metadata_props[METADATA_KEY] = mark
        after = sum(w.const_value.nbytes for w in (wg, wu, wd))
        entry.update(decision="pruned", channels_after=n_keep, bytes_after=after, bytes_saved=nbytes - after,
                     score_removed_max=float(scores[removed].max()), score_kept_min=float(scores[keep].min()))
        details["bytes_after"] += after - nbytes
        report.counts["layers_pruned"] += 1
        report.counts["channels_removed"] += f - n_keep
        report.counts["bytes_saved"] += nbytes - after

    @staticmethod
    def _skip(report: PassReport, layers: dict, layer: str, reason: str) -> None:
        layers[layer] = {"decision": "skipped", "reason": reason}
        report.skipped.append(Skip(layer, reason))
