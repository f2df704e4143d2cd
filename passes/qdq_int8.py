"""Explicit INT8 quantize/dequantize for TensorRT: calibrated activations, per-channel weights, SmoothQuant.

Every linear site -- `MatMul(x, W)` or `Gemm(x, W[, bias])` with a constant float32 `W` (the sites and
their layer attribution come from `passes/linear_sites.py`: `as_linear`, `layer_key`, `matches_keep`) -- becomes

    x -> [Mul(1/s)] -> QuantizeLinear(a_scale, int8 0) -> DequantizeLinear ---------------> MatMul / Gemm
                        W' = diag(s) W -> QuantizeLinear(w_scale[N], int8 0, axis) -> DequantizeLinear --^

* `s` (SmoothQuant, Xiao et al. 2023): per input channel j, `s_j = max|x_j|^alpha / max|W'_j.|^(1-alpha)`
  from the calibrated per-channel activation maxima (`toolchain/quant/calibration.py`) and the weight rows. It
  moves activation outliers into the weights, where per-channel scales absorb them; `x/s @ diag(s) W` is
  `x @ W` exactly in real arithmetic. Sites reading the same activation share one `s` (the weight maxima
  are taken over all of them: q/k/v share the input RMSNorm, gate/up the post-attention one).
* 1/s is folded into the activation's producer when that is a constant-scale op read only by the sites
  of the group -- the RMSNorm weight `Mul(gamma, x_hat)` of the decoder, `LayerNormalization(scale, bias)`
  of the vision tower -- by giving that node new constants (`gamma / s`): the weight store deduplicates
  identical tensors, so one norm constant can serve many layers and is never modified in place. Otherwise
  (o_proj / down_proj / merger inputs) an explicit `Mul(x, 1/s)` is inserted.
* Activations: one per-tensor scale `max_j(max|x_j| / s_j) / 127` (symmetric, zero point int8 0: the only
  form TensorRT accepts), one Q/DQ pair per activation tensor, shared by the sites that read it.
* Weights: symmetric per output channel (N), `scale_n = max_k |W'_kn| / 127`, zero points int8 0,
  `axis` = the N axis (1 for `[K, N]`, 0 for a `Gemm(transB=1)` `[N, K]` weight). `weight_format`:
  `"float_qdq"` keeps W' float32 and quantizes it with a QuantizeLinear on the constant (TensorRT 8.x
  requires Q/DQ weights in FP32 and quantizes them itself with the IQuantizeLayer's scale: the sm61
  form); `"int8"` stores the int8 codes and only a DequantizeLinear (pre-quantized weights, TensorRT >= 10,
  a quarter of the bytes on disk). Both compute the same codes: round-half-even of W'/scale in float32.

Only QuantizeLinear / DequantizeLinear / Mul at opset >= 13 (per-axis Q/DQ) are emitted, in float32 and
int8: never float16. Bias, Gemm attributes, norms, softmax, rotary and residuals stay as they are.

The tied lm_head (`decoder.lm_head`, `Gemm(h, E, transB=1)`): `E` is also the runtime's host-side fp32
embedding table, so its site is never smoothed and its weight Q/DQ reads `E` itself (float_qdq form):
TensorRT stores the int8 codes per vocabulary row (a quarter of the 1.2 GB an fp32 lm_head takes on a 2 GB
card) while the lookup keeps reading the same fp32 rows. With `weight_format="int8"` it stays fp32.

Skips, each with a reason: graphs not configured, opset < 13, no int8 on the target, the lm_head in the
pre-quantized int8 form or with `include_lm_head=False` (the default; the sm61 kit sets it), `keep_fp32`, no calibration statistics for the activation (or of the
wrong length), linear layers `as_linear` cannot convert. Idempotent: a converted site's weight input is
a DequantizeLinear output, not an initializer, so a second run finds nothing (`already_quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_ir as ir

from qvl.passes.base import GraphPass, PassReport, Skip, TargetCapabilities
from qvl.passes.linear_sites import EMBEDDING_NAME, LM_HEAD_LAYER, Linear, add_initializer, linear_sites, matches_keep, module_path, skip_site

QDQ_MIN_OPSET = 13  # QuantizeLinear / DequantizeLinear with `axis` (per-channel)
QMAX = 127  # symmetric int8: [-127, 127], zero point 0
WEIGHT_FORMATS = ("float_qdq", "int8")
_S_RANGE = (1e-4, 1e4)  # clamp on smoothing factors: keep x/s and W*s far from fp32 under/overflow


@dataclass(frozen=True)
class QdqInt8Config:
    # "graph/activation value name" -> per-input-channel max|x| over the calibration set (float32 [K])
    activation_stats: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, hash=False)
    alpha: float | None = 0.5  # SmoothQuant migration strength in [0, 1]; None: no smoothing (s = 1)
    # left in fp32: layer keys ("decoder.layers.3"), node names (optionally "graph/node"), module scopes,
    # weight initializer names -- the same matching as PrecisionConfig.keep_fp32
    keep_fp32: frozenset = frozenset()
    graphs: tuple[str, ...] = ("vision", "decoder")
    weight_format: str = "float_qdq"  # "float_qdq" (TensorRT 8.x) | "int8" (pre-quantized, TensorRT >= 10)
    fold_smoothing: bool = True  # fold 1/s into a preceding norm's constants where only the group reads it
    # the tied lm_head: per-vocab-row int8 over the unchanged fp32 table (float_qdq form only, never smoothed);
    # off by default here, the sm61 kit turns it on (toolchain/tensorrt/int8_kit.py)
    include_lm_head: bool = False

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, not {self.alpha}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, not {self.weight_format!r}")
        object.__setattr__(self, "keep_fp32", frozenset(self.keep_fp32))
        object.__setattr__(self, "graphs", tuple(self.graphs))

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "keep_fp32": sorted(self.keep_fp32), "graphs": list(self.graphs),
                "weight_format": self.weight_format, "fold_smoothing": self.fold_smoothing,
                "include_lm_head": self.include_lm_head,
                "activation_sites_with_stats": len(self.activation_stats)}


def stats_key(graph_name: str, value: ir.Value) -> str:
    return f"{graph_name}/{value.name}"


def smoothing_factors(act_max: np.ndarray, w_row_max: np.ndarray, alpha: float | None) -> np.ndarray:
    """SmoothQuant s_j = max|x_j|^alpha / max|W_j|^(1-alpha); 1 where either side is 0 (nothing to migrate)."""
    a = np.asarray(act_max, np.float64)
    w = np.asarray(w_row_max, np.float64)
    if alpha is None:
        return np.ones(a.shape, np.float32)
    ok = (a > 0) & (w > 0)
    s = np.ones(a.shape, np.float64)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, *_S_RANGE).astype(np.float32)


def weight_scales(w_kn: np.ndarray) -> np.ndarray:
    """Per output channel (axis 1 of [K, N]) symmetric scale max|W| / 127 (1.0 for an all-zero column)."""
    amax = np.abs(w_kn).max(axis=0).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(QMAX), np.float32(1.0)).astype(np.float32)


def quantize_weight(w_kn: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes of [K, N] float32 weights with per-N scales: what QuantizeLinear computes (float32 divide,
    round half to even, saturate)."""
    q = np.rint(np.asarray(w_kn, np.float32) / scales[None, :].astype(np.float32))
    return np.clip(q, -128, 127).astype(np.int8)


def activation_scale(act_max: np.ndarray, s: np.ndarray) -> np.float32:
    amax = float(np.max(np.asarray(act_max, np.float32) / s)) if len(act_max) else 0.0
    return np.float32(amax / QMAX if amax > 0 else 1.0)


class QdqInt8Pass(GraphPass):
    """Insert explicit INT8 Q/DQ (SmoothQuant-smoothed, calibrated) around constant-weight linear layers."""

    name = "qdq_int8"
    config_type = QdqInt8Config
    scope = "INT8 Q/DQ"

    def applies_to(self, target: TargetCapabilities, graph: str) -> str | None:
        reason = super().applies_to(target, graph)
        if reason is None and 8 not in target.int_weight_bits:
            reason = f"target {target.name} has no fast int8 kernels"
        return reason

    count_keys = ("quantized", "from_matmul", "from_gemm", "activation_qdq", "smoothing_folded", "smoothing_mul")

    def start(self, model, report: PassReport) -> None:
        super().start(model, report)
        report.details.update(config=self.config.to_dict(), activation_dtype="float32", layers={}, nodes={},
                              already_quantized=0, kept_fp32=0, bytes_before=0, bytes_after=0)
        report.details["already_quantized"] = sum(
            1 for n in model.graph if n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1 and n.inputs[1] is not None
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear")

    def run(self, model, report: PassReport) -> None:
        cfg: QdqInt8Config = self.config
        graph_name = self.graph
        details = report.details
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or opset < QDQ_MIN_OPSET:
            report.skipped.append(Skip(graph_name, f"opset {opset} < {QDQ_MIN_OPSET}: no per-axis QuantizeLinear"))
            return
        if self.target.max_opset is not None and opset > self.target.max_opset:
            report.skipped.append(Skip(graph_name, f"graph is opset {opset} > the target's {self.target.max_opset}: lower it first"))
            return
        layers: dict[str, dict] = details["layers"]

        # 1. eligible sites, grouped by the activation they read
        groups: dict[int, list[tuple[ir.Node, Linear, str]]] = {}
        order: list[int] = []
        for node, lin, layer in linear_sites(model, graph_name):
            entry = layers.setdefault(layer, {"decision": "int8", "nodes": [], "bytes_before": 0, "bytes_after": 0})
            weight_name = node.inputs[1].name
            if isinstance(lin, str):
                skip_site(report, entry, node, layer, lin)
                continue
            fp32_bytes = lin.weight.const_value.nbytes + (lin.bias.const_value.nbytes if lin.bias is not None else 0)
            reason = None
            hit = matches_keep(cfg.keep_fp32, node, graph_name, layer, weight_name, module_path(node, weight_name))
            stats = cfg.activation_stats.get(stats_key(graph_name, lin.activation))
            # Only a tied lm_head's matrix is also the runtime's embedding table; an untied one (its own
            # lm_head.weight) is an ordinary linear layer that may be smoothed and stored as int8 codes.
            tied_head = layer == LM_HEAD_LAYER and weight_name == EMBEDDING_NAME
            if layer == LM_HEAD_LAYER and not cfg.include_lm_head:
                reason = (("tied lm_head: its [vocab, hidden] matrix is also the runtime's fp32 embedding table "
                           "(host lookup); include_lm_head=False keeps it fp32") if tied_head else
                          "lm_head: include_lm_head=False keeps it fp32")
            elif tied_head and cfg.weight_format != "float_qdq":
                reason = ("tied lm_head: its [vocab, hidden] matrix is also the runtime's fp32 embedding table "
                          "(host lookup); pre-quantized int8 weights would drop it, so it stays fp32")
            elif hit is not None:
                reason = f"keep_fp32 ({hit})"
                details["kept_fp32"] += 1
            elif stats is None:
                reason = f"no calibration statistics for activation {lin.activation.name!r}"
            elif np.asarray(stats).shape != (lin.k,):
                reason = f"calibration statistics of shape {np.asarray(stats).shape} for K={lin.k}"
            elif not np.all(np.isfinite(stats)):
                reason = "non-finite calibration statistics"
            if reason is not None:
                skip_site(report, entry, node, layer, reason)
                for k in ("bytes_before", "bytes_after"):
                    entry[k] += fp32_bytes
                    details[k] += fp32_bytes
                continue
            key = id(lin.activation)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append((node, lin, layer))

        # 2. per group: smoothing vector, folding or Mul, one activation Q/DQ, per-site weight Q/DQ
        for key in order:
            sites = groups[key]
            x = sites[0][1].activation
            act_max = np.asarray(cfg.activation_stats[stats_key(graph_name, x)], np.float32)
            w_kn = {id(n): self._w_kn(lin) for n, lin, _ in sites}
            w_row_max = np.max(np.stack([np.abs(w).max(axis=1) for w in w_kn.values()]), axis=0)
            # The tied lm_head's matrix must stay the embedding table bit for bit (the runtime looks tokens up in
            # it on the host), so its group is never smoothed: its weight Q/DQ reads the table itself.
            tied = any(layer == LM_HEAD_LAYER and n.inputs[1].name == EMBEDDING_NAME for n, _, layer in sites)
            s = np.ones_like(act_max) if tied else smoothing_factors(act_max, w_row_max, cfg.alpha)
            first = sites[0][0]
            smoothed, how = x, "none"
            if not np.all(s == 1.0):
                smoothed, how = self._smooth(graph, first, x, s, {id(n) for n, _, _ in sites}, cfg.fold_smoothing, report)
            a_scale = activation_scale(act_max, s)
            base = x.name or first.name
            sc = add_initializer(graph, f"{base}.act_scale", np.array(a_scale, np.float32))
            zp = add_initializer(graph, f"{base}.act_zp", np.array(0, np.int8))
            q = ir.Node("", "QuantizeLinear", [smoothed, sc, zp], name=f"{first.name}/act_q")
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], sc, zp], name=f"{first.name}/act_dq")
            q.outputs[0].name, dq.outputs[0].name = f"{base}.q", f"{base}.dq"
            q.outputs[0].dtype, dq.outputs[0].dtype = ir.DataType.INT8, ir.DataType.FLOAT
            q.outputs[0].shape = dq.outputs[0].shape = x.shape
            graph.insert_before(first, [q, dq])
            report.counts["activation_qdq"] += 1
            for node, lin, layer in sites:
                self._quantize_site(graph, node, lin, layer, w_kn[id(node)] * s[:, None], dq.outputs[0], cfg, details,
                                    report, graph_name, {"act_scale": float(a_scale), "smoothing": how,
                                                         "s_min": float(s.min()), "s_max": float(s.max())})
        for entry in layers.values():
            if entry.get("reasons"):
                entry["decision"] = "mixed" if entry["nodes"] else "fp32"

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _w_kn(lin: Linear) -> np.ndarray:
        w = lin.weight.const_value.numpy().astype(np.float32)
        return w.T if lin.w_nk else w

    def _smooth(self, graph, first: ir.Node, x: ir.Value, s: np.ndarray, site_ids: set, fold: bool, report):
        """x/s: fold into the producer's constants when only these sites read x, else insert Mul(x, 1/s)."""
        prod = x.producer()
        only_sites = (not x.is_graph_output() and len(x.uses()) > 0
                      and all(idx == 0 and id(user) in site_ids for user, idx in x.uses()))
        k = s.shape[0]

        def vec(v):
            return v is not None and v.const_value is not None and v.dtype == ir.DataType.FLOAT and \
                tuple(v.const_value.shape) == (k,)

        if fold and only_sites and prod is not None and prod.domain in ("", "ai.onnx"):
            if prod.op_type == "Mul" and len(prod.inputs) == 2:
                ci = [i for i, v in enumerate(prod.inputs) if vec(v)]
                other = [v for v in prod.inputs if not vec(v)]
                if len(ci) == 1 and len(other) == 1 and other[0].const_value is None:
                    i = ci[0]
                    c = prod.inputs[i]
                    prod.replace_input_with(i, add_initializer(graph, f"{c.name}.smooth", c.const_value.numpy() / s))
                    self._drop_if_unused(graph, c)
                    report.counts["smoothing_folded"] += 1
                    return x, f"folded into {prod.op_type} {prod.name}"
            if prod.op_type == "LayerNormalization" and all(not o.uses() for o in prod.outputs[1:]):
                axis = prod.attributes.get("axis")
                scale = prod.inputs[1] if len(prod.inputs) > 1 else None
                bias = prod.inputs[2] if len(prod.inputs) > 2 else None
                if (axis is None or axis.value == -1) and vec(scale) and (bias is None or vec(bias)):
                    prod.replace_input_with(1, add_initializer(graph, f"{scale.name}.smooth", scale.const_value.numpy() / s))
                    if bias is not None:
                        prod.replace_input_with(2, add_initializer(graph, f"{bias.name}.smooth", bias.const_value.numpy() / s))
                        self._drop_if_unused(graph, bias)
                    self._drop_if_unused(graph, scale)
                    report.counts["smoothing_folded"] += 1
                    return x, f"folded into {prod.op_type} {prod.name}"
        inv = add_initializer(graph, f"{x.name or first.name}.smooth_inv", (np.float32(1.0) / s).astype(np.float32))
        mul = ir.Node("", "Mul", [x, inv], name=f"{first.name}/smooth")
        mul.outputs[0].name = f"{x.name or first.name}.smoothed"
        mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, x.shape
        graph.insert_before(first, [mul])
        report.counts["smoothing_mul"] += 1
        return mul.outputs[0], "Mul"

    def _quantize_site(self, graph, node, lin: Linear, layer: str, w_kn: np.ndarray, x_dq: ir.Value,
                       cfg: QdqInt8Config, details: dict, report: PassReport, graph_name: str, info: dict) -> None:
        w_kn = w_kn.astype(np.float32)
        scales = weight_scales(w_kn)
        axis = 0 if lin.w_nk else 1  # the N (output channel) axis in the stored layout
        wname = lin.weight.name
        stored_shape = (lin.n, lin.k) if lin.w_nk else (lin.k, lin.n)
        sc = add_initializer(graph, f"{wname}.w_scale", scales)
        zp = add_initializer(graph, f"{wname}.w_zp", np.zeros(lin.n, np.int8))
        new_nodes = []
        wf = None
        if cfg.weight_format == "int8":
            codes = quantize_weight(w_kn, scales)
            wq = add_initializer(graph, f"{wname}.int8", codes.T.copy() if lin.w_nk else codes)
        else:
            if layer == LM_HEAD_LAYER:
                wf = lin.weight  # unsmoothed (s = 1): quantize the shared fp32 table itself, not a copy
            else:
                wf = add_initializer(graph, f"{wname}.smoothed", w_kn.T.copy() if lin.w_nk else w_kn)
            qw = ir.Node("", "QuantizeLinear", [wf, sc, zp], attributes=[ir.AttrInt64("axis", axis)], name=f"{node.name}/w_q")
            qw.outputs[0].name, qw.outputs[0].dtype = f"{wname}.q", ir.DataType.INT8
            qw.outputs[0].shape = ir.Shape(stored_shape)
            new_nodes.append(qw)
            wq = qw.outputs[0]
        dqw = ir.Node("", "DequantizeLinear", [wq, sc, zp], attributes=[ir.AttrInt64("axis", axis)], name=f"{node.name}/w_dq")
        dqw.outputs[0].name, dqw.outputs[0].dtype = f"{wname}.dq", ir.DataType.FLOAT
        dqw.outputs[0].shape = ir.Shape(stored_shape)
        new_nodes.append(dqw)
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, x_dq)
        node.replace_input_with(1, dqw.outputs[0])
        node.metadata_props["qvl.layer"] = layer
        if wf is not lin.weight:
            self._drop_if_unused(graph, lin.weight)
        bias_bytes = lin.bias.const_value.nbytes if lin.bias is not None else 0
        before = lin.weight.const_value.nbytes + bias_bytes
        after = lin.k * lin.n + scales.nbytes + bias_bytes  # as deployed: int8 codes + fp32 scales (engine)
        entry = details["layers"][layer]
        entry["nodes"].append(node.name)
        entry["bytes_before"] += before
        entry["bytes_after"] += after
        details["bytes_before"] += before
        details["bytes_after"] += after
        details["nodes"][node.name] = {"layer": layer, "op": node.op_type, "K": lin.k, "N": lin.n, "weight": wname,
                                       "axis": axis, **info}
        report.counts["quantized"] += 1
        report.counts["from_matmul" if node.op_type == "MatMul" else "from_gemm"] += 1

    @staticmethod
    def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
        if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
            graph.initializers.pop(value.name)
