"""Precision assignment: constant-weight linear layers -> ORT `com.microsoft.MatMulNBits` (int8 / int4 weights).

Every `MatMul(x, W)` with `W` a constant `[K, N]` initializer and every `Gemm(x, W[, bias])` with a constant
weight (`transB` either way, `transA=0`, `alpha=1`, `beta=1`, bias `[N]` or none) becomes

    MatMulNBits(A=x, B=packed uint8 [N, K/block, block*bits/8], scales float32 [N*K/block],
                zero_points packed uint8 (asymmetric only), bias)   K, N, bits, block_size, accuracy_level

following the ORT contrib-op spec: weights are quantized per block of `block_size` consecutive K values of
one output column, dequantized as `(code - zero_point) * scale`; codes are packed low bits first along K
(4-bit: element 2j in the low nibble of byte j); packed 4-bit zero points use the same nibble order per
row of N; without a zero-point input the op uses `2^(bits-1)` (the symmetric case). Activations stay
float32 (`accuracy_level=4` lets ORT's CPU kernel quantize A to int8 blocks for the int8 dot-product
path); norms, softmax, rotary, residuals and the vision patch Conv are not touched, and no float16 /
bfloat16 is ever chosen (this pass has no float16 path at all, so a target like sm61 whose fast dtypes are
float32 only is safe by construction).

The tied lm_head `Gemm(h, embed_tokens.weight, transB=1)` is quantized like any other linear layer
(N = vocab, K = hidden: the `[N, blocks, blob]` layout is one row per vocabulary entry), into initializers
named `embed_tokens.weight.q` / `.scales` / `.zp`; the fp32 matrix is then removed from the graph, so the
runtime's host-side embedding lookup must read the quantized rows (`runtime/quantized_embedding.py`,
manifest `embedding.format = "matmulnbits"`). `report.details["embedding"]` names the three initializers.

An untied decoder (its lm_head reads its own `lm_head.weight`) has two matrices: the lm_head is quantized as
above into `lm_head.weight.q` / ..., and the embedding table, which no node reads (the decoder's host embedding,
`linear_sites.host_embedding`), is quantized on its own, in the same MatMulNBits layout and bits / block size,
into `embed_tokens.weight.q` / `.scales` / `.zp` host tensors (layer `decoder.embed_tokens`, which `keep_fp32`
and `include_embedding=False` leave fp32); the runtime's lookup reads those rows exactly as for a tied model.

Each converted node is attributed to a layer (`decoder.layers.3`, `vision.blocks.5`, `vision.merger`,
`vision.deepstack_merger_list.0`, `decoder.lm_head`) from its `pkg.torch.onnx.name_scopes` metadata or
its weight's initializer name, so the accuracy budget (`toolchain/quant/accuracy_budget.py`) can keep whole
layers in fp32 through `keep_fp32`. Skipped sites carry their reason: no ORT contrib ops (TensorRT),
no fast integer kernels of that width on the target, `K` not a multiple of `block_size`, `keep_fp32`,
an unsupported Gemm form.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from qvl.artifacts.nbits_codes import pack_codes, unpack_codes
from qvl.passes.base import GraphPass, PassReport, Skip, TargetCapabilities
from qvl.passes.linear_sites import (
    EMBEDDING_LAYER,
    EMBEDDING_NAME,
    LM_HEAD_LAYER,
    add_initializer,
    as_linear,
    host_embedding,
    host_value,
    layer_key,
    matches_keep,
    module_path,
    set_host_embedding,
    skip_site,
)

MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = ("MatMulNBits", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class PrecisionConfig:
    weight_bits: int = 8  # 8 or 4
    block_size: int = 32  # quantization block along K: 32, 64 or 128 (a power of two >= 16)
    accuracy_level: int = 4  # 4: int8 activations x int weights (AVX2 dot products); 0: fp32 compute
    symmetric: bool = True  # True: no zero points (2^(bits-1) implied); False: per-block packed zero points
    # left in fp32: layer keys ("decoder.layers.3"), node names ("node_linear" or "decoder/node_linear": node
    # names repeat across graphs), module scopes ("lm.layers.0.mlp", prefix match) or weight initializer names
    keep_fp32: frozenset = frozenset()
    include_lm_head: bool = True  # quantize the lm_head (tied: the embedding matrix too)
    include_embedding: bool = True  # quantize an untied decoder's embedding table (host lookup only)
    graphs: tuple[str, ...] = ("vision", "decoder")
    # Graphs whose linears become `DynamicQuantizeMatMul` (int8 weights, one scale per output column, activations
    # quantized per call) instead of MatMulNBits, whatever `weight_bits`: at M >> 1 (the vision tower's patches) MLAS's
    # int8 GEMM outruns MatMulNBits (`toolchain/eval/gemm_rates.py`); the target's capability table picks them.
    # The tied lm_head stays MatMulNBits (its codes also serve the embedding lookup).
    dynamic_int8_graphs: tuple[str, ...] = ()
    dynamic_int8_weight_max: int = 127  # 63 where the int8 GEMM can saturate (TargetCapabilities says why)

    def __post_init__(self):
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, not {self.weight_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, not {self.block_size}")
        if self.accuracy_level not in (0, 1, 4):
            raise ValueError(f"accuracy_level must be 0, 1 (fp32) or 4 (int8 activations), not {self.accuracy_level}")
        if not 1 <= self.dynamic_int8_weight_max <= 127:
            raise ValueError(f"dynamic_int8_weight_max must be in 1..127, not {self.dynamic_int8_weight_max}")
        object.__setattr__(self, "keep_fp32", frozenset(self.keep_fp32))
        object.__setattr__(self, "dynamic_int8_graphs", tuple(self.dynamic_int8_graphs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_fp32"] = sorted(self.keep_fp32)
        d["graphs"] = list(self.graphs)
        d["dynamic_int8_graphs"] = list(self.dynamic_int8_graphs)
        return d


# -- block quantization in the MatMulNBits layout (numpy) -------------------------------------------------


@dataclass
class QuantizedWeight:
    """One `[N, K]` weight in MatMulNBits form."""

    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks * bits / 8)] (packed), None when symmetric
    bits: int
    block_size: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def quantize_blockwise(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Quantize a float `[N, K]` matrix (row = output feature) per block of `block_size` K values.

    Symmetric: scale = (the block's value of largest magnitude) / -2^(bits-1), so that value maps exactly
    to code 0 and the rest round into [0, 2^bits - 1] around the implied zero point 2^(bits-1) (the
    MLAS convention: one more level than amax / (2^(bits-1) - 1)). Asymmetric: the block's [min, max]
    range (widened to include 0) spread over 2^bits levels with a per-block zero point.
    """
    w = np.asarray(w_nk, dtype=np.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block_size={block_size}")
    nb = k // block_size
    blocks = w.reshape(n, nb, block_size)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scales = (extreme / np.float32(-mid)).astype(np.float32)
        zp = np.full((n, nb), mid, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0).astype(np.float32)
        hi = np.maximum(blocks.max(axis=-1), 0.0).astype(np.float32)
        scales = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scales != 0, np.rint(-lo / scales), 0.0)
        zp = np.clip(zp, 0, qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scales != 0, np.float32(1.0) / scales, np.float32(0.0)).astype(np.float32)
    codes = np.clip(np.rint(blocks * inv[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    packed = pack_codes(codes, bits)
    zero_points = None if symmetric else pack_codes(zp.astype(np.uint8), bits).reshape(-1)
    return QuantizedWeight(packed, scales.reshape(-1), zero_points, bits, block_size, n, k)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """Reference dequantization `(code - zero_point) * scale` -> float32 `[N, K]` (what MatMulNBits computes with)."""
    nb = q.k // q.block_size
    codes = unpack_codes(q.packed, q.bits, q.block_size).astype(np.float32)
    if q.zero_points is None:
        zp = np.full((q.n, nb), 1 << (q.bits - 1), dtype=np.float32)
    else:
        zp = unpack_codes(q.zero_points.reshape(q.n, -1), q.bits, nb).astype(np.float32)
    scales = q.scales.reshape(q.n, nb)
    return ((codes - zp[..., None]) * scales[..., None]).reshape(q.n, q.k)


# -- the pass -----------------------------------------------------------------------------------------------


def quantize_columns_int8(w_kn: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes `[K, N]` and one float32 scale per output column `[N]` (DynamicQuantizeMatMul's B and
    b_scale): scale = max|w[:, n]| / qmax (1 for an all-zero column), codes = round(w / scale) in [-qmax, qmax]."""
    amax = np.abs(w_kn).max(axis=0).astype(np.float32)
    scale = np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)
    codes = np.clip(np.rint(w_kn / scale[None, :]), -qmax, qmax).astype(np.int8)
    return codes, scale


def refusal(config: PrecisionConfig, target: TargetCapabilities) -> str | None:
    """Why `config` must not be compiled for `target` (a wrong answer, not a slow one), or None."""
    if (config.weight_bits == 4 and not config.symmetric and config.accuracy_level == 4
            and not target.asymmetric_int4_int8_compute):
        return (f"asymmetric int4 with accuracy_level 4 is refused for target {target.name}: ONNX Runtime's AVX2 int4 "
                "decode kernel with zero points is reported wrong on AVX2-only CPUs (onnxruntime issue #29853)")
    return None


class PrecisionPass(GraphPass):
    """Replace constant-weight MatMul/Gemm linear layers by MatMulNBits int8/int4 block-quantized weights."""

    name = "precision"
    config_type = PrecisionConfig
    scope = "precision assignment"
    contrib_ops_note = " (MatMulNBits); TensorRT quantization needs Q/DQ calibration instead"
    count_keys = ("matmulnbits", "dynamic_int8", "from_matmul", "from_gemm", "lm_head", "embedding_table")

    def applies_to(self, target: TargetCapabilities, graph: str) -> str | None:
        reason = super().applies_to(target, graph)
        refused = refusal(self.config, target)
        if refused is not None:  # not a skip: leaving the layers fp32 would silently ignore what was asked
            raise ValueError(refused)
        if reason is None and self.config.weight_bits not in target.int_weight_bits:
            reason = (f"target {target.name} has no fast int{self.config.weight_bits} weight kernels "
                      f"(int_weight_bits={list(target.int_weight_bits)})")
        return reason

    def start(self, model, report: PassReport) -> None:
        super().start(model, report)
        report.details.update(
            config=self.config.to_dict(), activation_dtype="float32", layers={}, nodes={}, already_quantized=0,
            kept_fp32=0, bytes_before=0, bytes_after=0, embedding=None,
        )

    def run(self, model, report: PassReport) -> None:
        cfg: PrecisionConfig = self.config
        graph_name = self.graph
        details = report.details
        graph = model.graph
        details["already_quantized"] = sum(1 for n in graph if n.domain == MS_DOMAIN and n.op_type in QUANTIZED_OPS)
        done: dict[int, tuple[QuantizedWeight, ir.Value, ir.Value, ir.Value | None]] = {}  # per weight Value id
        dyn_done: dict[int, tuple[ir.Value, ir.Value, int]] = {}  # dynamic int8: per weight Value id
        layers: dict[str, dict] = details["layers"]

        for node in list(graph):
            lin = as_linear(node)
            if lin is None:
                continue
            weight_name = node.inputs[1].name
            layer = layer_key(node, graph_name, weight_name)
            entry = layers.setdefault(layer, {"decision": "quantized", "nodes": [], "bytes_before": 0, "bytes_after": 0})
            if isinstance(lin, str):
                skip_site(report, entry, node, layer, lin)
                continue
            fp32_bytes = lin.weight.const_value.nbytes + (lin.bias.const_value.nbytes if lin.bias is not None else 0)
            hit = matches_keep(cfg.keep_fp32, node, graph_name, layer, weight_name, module_path(node, weight_name))
            reason = None
            if hit is not None:
                reason = f"keep_fp32 ({hit})"
                details["kept_fp32"] += 1
            elif layer == LM_HEAD_LAYER and not cfg.include_lm_head:
                reason = "include_lm_head=False"
                details["kept_fp32"] += 1
            elif lin.k % cfg.block_size and not (graph_name in cfg.dynamic_int8_graphs and layer != LM_HEAD_LAYER):
                reason = f"K={lin.k} not divisible by block_size={cfg.block_size}"
            if reason is not None:
                skip_site(report, entry, node, layer, reason)
                entry["bytes_before"] += fp32_bytes
                entry["bytes_after"] += fp32_bytes
                details["bytes_before"] += fp32_bytes
                details["bytes_after"] += fp32_bytes
                continue

            if graph_name in cfg.dynamic_int8_graphs and layer != LM_HEAD_LAYER:
                self._to_dynamic_int8(graph, node, lin, layer, weight_name, entry, fp32_bytes, report, dyn_done)
                continue
            key = id(lin.weight)
            first_use = key not in done
            if first_use:
                w = lin.weight.const_value.numpy()
                q = quantize_blockwise(w if lin.w_nk else w.T, cfg.weight_bits, cfg.block_size, cfg.symmetric)
                del w
                # Drop the memory map of the fp32 weight once quantized: otherwise every fp32 page read
                # stays mapped until the pass ends (8.5 GB on the 2B model) on top of the int copies.
                release = getattr(lin.weight.const_value, "release", None)
                if release is not None:
                    release()
                base = self._base_name(node, weight_name, layer)
                done[key] = (q, *self._register(graph, base, q))
            q, b_val, s_val, zp_val = done[key]
            new = ir.Node(
                MS_DOMAIN,
                "MatMulNBits",
                [lin.activation, b_val, s_val, zp_val, None, lin.bias] if lin.bias is not None
                else [lin.activation, b_val, s_val] + ([zp_val] if zp_val is not None else []),
                attributes=[
                    ir.AttrInt64("K", lin.k),
                    ir.AttrInt64("N", lin.n),
                    ir.AttrInt64("bits", cfg.weight_bits),
                    ir.AttrInt64("block_size", cfg.block_size),
                    ir.AttrInt64("accuracy_level", cfg.accuracy_level),
                ],
                name=node.name,
                metadata_props={**node.metadata_props, "qvl.layer": layer},
            )
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
            if not lin.weight.uses() and lin.weight.name in graph.initializers:
                graph.initializers.pop(lin.weight.name)
            after = (q.nbytes if first_use else 0) + (lin.bias.const_value.nbytes if lin.bias is not None else 0)
            entry["nodes"].append(node.name)
            entry["bytes_before"] += fp32_bytes if first_use else 0
            entry["bytes_after"] += after
            details["bytes_before"] += fp32_bytes if first_use else 0
            details["bytes_after"] += after
            details["nodes"][node.name] = {"layer": layer, "op": node.op_type, "K": lin.k, "N": lin.n,
                                           "weight": weight_name, "B": b_val.name}
            report.counts["matmulnbits"] += 1
            report.counts["from_matmul" if node.op_type == "MatMul" else "from_gemm"] += 1
            if layer == LM_HEAD_LAYER:
                report.counts["lm_head"] += 1
            if layer == LM_HEAD_LAYER and weight_name == EMBEDDING_NAME:  # tied: the lm_head is the embedding table
                details["embedding"] = {
                    "source": weight_name,
                    "B": b_val.name,
                    "scales": s_val.name,
                    "zero_points": None if zp_val is None else zp_val.name,
                    "bits": cfg.weight_bits,
                    "block_size": cfg.block_size,
                    "shape": [lin.n, lin.k],
                    "fp32_removed": weight_name not in graph.initializers,
                }
                if weight_name in graph.initializers:
                    report.skipped.append(Skip(weight_name, "fp32 embedding still used by other nodes: stored twice"))

        if graph_name == "decoder":
            self._quantize_host_embedding(graph, report)
        for entry in layers.values():
            if entry.get("reasons"):
                entry["decision"] = "mixed" if entry["nodes"] else "fp32"
        for node in graph:  # layers already quantized by an earlier run keep their decision visible
            if node.domain == MS_DOMAIN and node.op_type in QUANTIZED_OPS and node.metadata_props.get("qvl.layer"):
                layers.setdefault(node.metadata_props["qvl.layer"],
                                  {"decision": "quantized", "nodes": [], "bytes_before": 0, "bytes_after": 0})
        if report.counts["matmulnbits"] or report.counts["dynamic_int8"]:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.opset_imports.setdefault(MS_DOMAIN, 1)

    def _to_dynamic_int8(self, graph, node, lin, layer, weight_name, entry, fp32_bytes, report, dyn_done) -> None:
        """One linear -> DynamicQuantizeMatMul(x, int8 [K, N], scales [N], no zero point, bias)."""
        details = report.details
        key = id(lin.weight)
        first_use = key not in dyn_done
        if first_use:
            w = lin.weight.const_value.numpy()
            codes, scale = quantize_columns_int8(w.T if lin.w_nk else w, self.config.dynamic_int8_weight_max)
            del w
            release = getattr(lin.weight.const_value, "release", None)
            if release is not None:
                release()
            base = self._base_name(node, weight_name, layer)
            dyn_done[key] = (add_initializer(graph, f"{base}.qi8", codes), add_initializer(graph, f"{base}.qi8_scale",
                                                                                         scale), codes.nbytes + scale.nbytes)
        b_val, s_val, q_bytes = dyn_done[key]
        inputs = [lin.activation, b_val, s_val] + ([None, lin.bias] if lin.bias is not None else [])
        new = ir.Node(MS_DOMAIN, "DynamicQuantizeMatMul", inputs, name=node.name,
                      metadata_props={**node.metadata_props, "qvl.layer": layer})
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        if not lin.weight.uses() and lin.weight.name in graph.initializers:
            graph.initializers.pop(lin.weight.name)
        after = (q_bytes if first_use else 0) + (lin.bias.const_value.nbytes if lin.bias is not None else 0)
        entry["nodes"].append(node.name)
        entry["kernel"] = "dynamic_int8"
        for d in (entry, details):
            d["bytes_before"] += fp32_bytes if first_use else 0
            d["bytes_after"] += after
        details["nodes"][node.name] = {"layer": layer, "op": node.op_type, "K": lin.k, "N": lin.n,
                                       "weight": weight_name, "B": b_val.name, "kernel": "dynamic_int8"}
        report.counts["dynamic_int8"] += 1
        report.counts["from_matmul" if node.op_type == "MatMul" else "from_gemm"] += 1

    def _quantize_host_embedding(self, graph: ir.Graph, report: PassReport) -> None:
        """An untied decoder's embedding table (used by no node) -> MatMulNBits-layout host tensors."""
        cfg: PrecisionConfig = self.config
        details = report.details
        host = host_embedding(graph)
        if host is None or "table" not in host:  # tied, or quantized by an earlier run
            return
        table = host["table"]
        fp32_bytes = table.const_value.nbytes
        entry = details["layers"].setdefault(EMBEDDING_LAYER, {"decision": "quantized", "nodes": [], "bytes_before": 0,
                                                                "bytes_after": 0})
        hidden = table.const_value.shape[1]
        reason = None
        if EMBEDDING_LAYER in cfg.keep_fp32 or EMBEDDING_NAME in cfg.keep_fp32:
            reason = "keep_fp32"
            details["kept_fp32"] += 1
        elif not cfg.include_embedding:
            reason = "include_embedding=False"
            details["kept_fp32"] += 1
        elif hidden % cfg.block_size:
            reason = f"hidden={hidden} not divisible by block_size={cfg.block_size}"
        after = fp32_bytes
        if reason is not None:
            report.skipped.append(Skip(EMBEDDING_NAME, f"{EMBEDDING_LAYER}: {reason}"))
            entry.setdefault("reasons", []).append(f"{EMBEDDING_NAME}: {reason}")
        else:
            q = quantize_blockwise(table.const_value.numpy(), cfg.weight_bits, cfg.block_size, cfg.symmetric)
            release = getattr(table.const_value, "release", None)
            if release is not None:
                release()
            parts = {"packed": host_value(f"{EMBEDDING_NAME}.q", q.packed),
                     "scales": host_value(f"{EMBEDDING_NAME}.scales", q.scales),
                     "zero_points": None if q.zero_points is None else host_value(f"{EMBEDDING_NAME}.zp", q.zero_points),
                     "bits": cfg.weight_bits, "block_size": cfg.block_size}
            set_host_embedding(graph, parts)
            after = q.nbytes
            entry["nodes"].append(EMBEDDING_NAME)
            report.counts["embedding_table"] += 1
            details["embedding"] = {
                "source": EMBEDDING_NAME, "B": parts["packed"].name, "scales": parts["scales"].name,
                "zero_points": None if parts["zero_points"] is None else parts["zero_points"].name,
                "bits": cfg.weight_bits, "block_size": cfg.block_size, "shape": [q.n, q.k], "fp32_removed": True,
                "untied": "the embedding table only: the lm_head quantizes its own lm_head.weight",
            }
        entry["bytes_before"] += fp32_bytes
        entry["bytes_after"] += after
        details["bytes_before"] += fp32_bytes
        details["bytes_after"] += after

    @staticmethod
    def _base_name(node: ir.Node, weight_name: str, layer: str) -> str:
        if layer == LM_HEAD_LAYER or not re.fullmatch(r"val_\d+", weight_name or ""):
            return weight_name
        path = module_path(node, None)  # exporter-numbered constant: name it after its module
        return f"{path}.weight" if path else weight_name

    @staticmethod
    def _register(graph: ir.Graph, base: str, q: QuantizedWeight):
        b = add_initializer(graph, f"{base}.q", q.packed)
        s = add_initializer(graph, f"{base}.scales", q.scales)
        zp = add_initializer(graph, f"{base}.zp", q.zero_points) if q.zero_points is not None else None
        return b, s, zp
