"""Fusions of the CPU decoder's per-layer glue into qvl's kernel library, applied to the graph proto after
`kernels.rewrite` (so the linears are already `MatMulNBitsAvx2`).

Why: after qvl's int4 kernel, the decode step's linears take ~72 % of its time and the rest is ~20 small nodes per
layer, each a session-run dispatch plus a pass over a few KB (Reshapes alone 6.8 %: 174 per step). Three rewrites,
each exact up to float rounding order:

* `swiglu`: gate = MatMulNBitsAvx2(A), up = MatMulNBitsAvx2(A) with the same A and quantization,
  act = QuickGelu(gate, alpha=1) or gate * Sigmoid(gate), out = act * up  ->  MatMulNBitsSwiGluAvx2(A, Bg, Sg, Bu, Su)
* `norm_rotary`: Reshape to [B, S, H, D] -> SimplifiedLayerNormalization over D -> Reshape back ->
  com.microsoft RotaryEmbedding (not interleaved, whole head, scale 1)  ->  HeadRmsNormRotary
* `identity_reshapes`: Reshape -> Reshape whose output has the first one's input shape (value_info, dim for dim)
  ->  the consumers read the first input directly.
* `attention`: com.microsoft GroupQueryAttention (separate q/k/v, no rotary, softcap, local window or smooth
  softmax inside)  ->  RowwiseGroupQueryAttention, the same inputs and outputs computed one query row at a time
  (attention_op.cpp). Not for speed: ORT's kernel rounds a position differently depending on how many positions
  the call holds, and the int8 activation quantization of the next linears can turn that into different tokens;
  row by row, a decode step, a prefill, a prefix-cache follow-up and a speculative verify step give the same bits.

A site that does not match exactly is left as it is and recorded with the reason (`FusionReport.skipped`).
`QVL_KERNEL_FUSION=0` turns the fusions off (A/B in benchmarks) and keeps the plain op swap;
`QVL_ROWWISE_ATTENTION=0` keeps ORT's attention only (faster on long prompts, see ROWWISE_ENV).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from onnx import ModelProto, NodeProto, helper

from qvl.runtime.kernels import DOMAIN, import_domain
from qvl.runtime.kernels import OP as MATMUL

SWIGLU = "MatMulNBitsSwiGluAvx2"
NORM_ROTARY = "HeadRmsNormRotary"
ATTENTION = "RowwiseGroupQueryAttention"
ENV = "QVL_KERNEL_FUSION"
# QVL_ROWWISE_ATTENTION=0 keeps ORT's GroupQueryAttention: its GEMMs are faster on long prompts (one layer's
# attention at a 2048-position prompt: ~120 vs ~175 ms, 2 threads; decode steps on par), at the price of a
# position's bits depending on the call's shape (benchmarks/attention_layer_micro.py)
ROWWISE_ENV = "QVL_ROWWISE_ATTENTION"


@dataclass
class FusionReport:
    swiglu: int = 0
    norm_rotary: int = 0
    identity_reshapes: int = 0
    attention: int = 0  # swapped, not fused: no node fewer
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (fusion, node name, reason)
    seconds: float = 0.0

    @property
    def nodes_removed(self) -> int:
        return 3 * self.swiglu + 4 * self.norm_rotary + 2 * self.identity_reshapes

    def summary(self) -> str:
        return (f"{self.swiglu} SwiGLU, {self.norm_rotary} norm+rotary, {self.identity_reshapes} reshape pairs fused"
                f" ({self.nodes_removed} nodes fewer), {self.attention} attention row by row")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def rowwise_attention() -> bool:
    return os.environ.get(ROWWISE_ENV, "1").strip() != "0"


class _Graph:
    """Producer / consumer maps of one graph (top level only: the decoder has no subgraphs on these paths)."""

    def __init__(self, model: ModelProto):
        g = model.graph
        self.graph = g
        self.producer: dict[str, NodeProto] = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}
        self.initializers = {t.name: t for t in g.initializer}
        self.shapes = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim)

    def only_feeds(self, name: str, node: NodeProto) -> bool:
        """`name` is read by `node` alone and is not a graph output: it can disappear with the fusion."""
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) >= 1 and all(u is node for u in users)

    def known_shape(self, name: str, depth: int = 0) -> tuple | None:
        """`name`'s shape with every dim an int or a symbol: from value_info, else (ORT's saved graph has none for
        the tensors its own fusions created) inferred through a Reshape from its input's shape and its target."""
        shape = self.shapes.get(name)
        if shape is not None and all(d is not None for d in shape):
            return shape
        node = self.producer.get(name)
        if depth < 4 and node is not None and node.op_type == "Reshape" and node.domain == "":
            return self._reshaped(node, depth)
        return None

    def _reshaped(self, node: NodeProto, depth: int) -> tuple | None:
        target = self.shape_value(node.input[1])
        if target is None or _attrs(node).get("allowzero", 0):
            return None
        if all(isinstance(d, str) or d > 0 for d in target):
            return tuple(target)
        shape_in = self.known_shape(node.input[0], depth + 1)
        if shape_in is None:
            return None
        out = [shape_in[i] if d == 0 and i < len(shape_in) else d for i, d in enumerate(target)]
        if out.count(-1) > 1:
            return None
        if -1 in out:
            # the elements of the input over those of the known output dims, symbols cancelling pairwise
            num, den = list(shape_in), [d for d in out if d != -1]
            for d in [d for d in den if isinstance(d, str)]:
                if d not in num:
                    return None
                num.remove(d)
                den.remove(d)
            if any(isinstance(d, str) for d in num):
                return None
            n, m = _product(num), _product(den)
            if m == 0 or n % m:
                return None
            out[out.index(-1)] = n // m
        return tuple(out)

    def shape_value(self, name: str) -> list | None:
        """The value of a 1-D int64 shape tensor: an initializer, or Shape(x)[start:end] of a known shape."""
        init = self.initializers.get(name)
        if init is not None:
            from onnx import numpy_helper

            value = numpy_helper.to_array(init)
            return [int(v) for v in value.reshape(-1)] if value.ndim == 1 else None
        node = self.producer.get(name)
        if node is not None and node.op_type == "Shape" and node.domain == "":
            shape = self.known_shape(node.input[0], 3)
            if shape is None:
                return None
            a = _attrs(node)
            return list(shape[a.get("start", 0):a.get("end", len(shape))])
        return None


def _product(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is(node: NodeProto | None, op: str, domains: tuple[str, ...] = ("",)) -> bool:
    return node is not None and node.op_type == op and node.domain in domains


_MS = ("com.microsoft",)


def _swiglu_site(g: _Graph, mul: NodeProto) -> tuple[list[NodeProto], NodeProto, NodeProto] | str:
    """(nodes to drop, gate, up) for `out = act(gate) * up`, or why not. `mul` is the final Mul."""
    for act_in, up_in in (mul.input, reversed(mul.input)):
        act, up = g.producer.get(act_in), g.producer.get(up_in)
        if _is(act, "QuickGelu", _MS):
            if float(_attrs(act).get("alpha", 1.702)) != 1.0:  # the op's default is GELU's 1.702
                return "QuickGelu alpha is not 1 (not SiLU)"
            gate = g.producer.get(act.input[0])
            chain = [act]
        elif _is(act, "Mul") and any(_is(g.producer.get(i), "Sigmoid") for i in act.input):
            sig = next(g.producer[i] for i in act.input if _is(g.producer.get(i), "Sigmoid"))
            other = [i for i in act.input if i != sig.output[0]]
            if len(other) != 1 or other[0] != sig.input[0]:
                continue
            gate = g.producer.get(sig.input[0])
            chain = [sig, act]
        else:
            continue
        if not (_is(gate, MATMUL, (DOMAIN,)) and _is(up, MATMUL, (DOMAIN,))):
            return "gate or up is not a qvl MatMulNBitsAvx2"
        if gate.input[0] != up.input[0]:
            return "gate and up read different activations"
        ga, ua = _attrs(gate), _attrs(up)
        if any(ga.get(k) != ua.get(k) for k in ("K", "N", "bits", "block_size")):
            return "gate and up differ in K, N, bits or block_size"
        gate_users = {id(n) for n in g.consumers.get(gate.output[0], [])}
        if gate.output[0] in g.outputs or gate_users != {id(n) for n in chain}:
            return "the gate output has other readers"
        if not all(g.only_feeds(n.output[0], reader) for n, reader in zip(chain, [*chain[1:], mul])):
            return "an activation output has other readers"
        if not g.only_feeds(up.output[0], mul):
            return "the up output has other readers"
        return [gate, up, *chain, mul], gate, up
    return "not silu(gate) * up"


def _norm_rotary_site(g: _Graph, rot: NodeProto) -> tuple[list[NodeProto], NodeProto, dict] | str:
    a = _attrs(rot)
    if a.get("interleaved", 0) != 0:
        return "interleaved rotary"
    if a.get("is_packed_batching", 0) != 0:
        return "packed batching"
    if float(a.get("scale", 1.0)) != 1.0:
        return "rotary scale is not 1"
    if len(rot.input) != 4:
        return "rotary inputs are not (x, position_ids, cos, sin)"
    back = g.producer.get(rot.input[0])
    norm = g.producer.get(back.input[0]) if _is(back, "Reshape") else None
    split = g.producer.get(norm.input[0]) if _is(norm, "SimplifiedLayerNormalization", ("", *_MS)) else None
    if not _is(split, "Reshape"):
        return "rotary input is not Reshape(SimplifiedLayerNormalization(Reshape(x)))"
    na = _attrs(norm)
    if na.get("axis", -1) not in (-1, 3) or na.get("stash_type", 1) != 1:
        return "the norm is not over the last axis in float"
    if any(norm.output[1:]):
        return "the norm's statistics outputs are read"
    weight = g.initializers.get(norm.input[1]) if len(norm.input) > 1 else None
    if weight is None or len(weight.dims) != 1:
        return "the norm weight is not a 1-D initializer"
    D = int(weight.dims[0])
    x, heads_shape, y = split.input[0], g.known_shape(split.output[0]), g.known_shape(back.output[0])
    x_shape = g.known_shape(x)
    if x_shape is None or heads_shape is None or y is None:
        return "shapes unknown (no value_info)"
    if len(x_shape) != 3 or y != x_shape or len(heads_shape) != 4 or heads_shape[3] != D:
        return f"reshapes are not [B, S, H*D] -> [B, S, H, {D}] -> back"
    if not isinstance(x_shape[2], int) or x_shape[2] % D:
        return "hidden size unknown or not a multiple of the head size"
    heads = x_shape[2] // D
    if a.get("num_heads", 0) not in (0, heads):
        return "rotary num_heads differs from the norm's heads"
    if a.get("rotary_embedding_dim", 0) not in (0, D):
        return "rotary covers part of the head"
    pos = g.known_shape(rot.input[1])
    if pos is None or len(pos) != 2:
        return "position_ids are not [B, S]"
    for name, reader in ((split.output[0], norm), (norm.output[0], back), (back.output[0], rot)):
        if not g.only_feeds(name, reader):
            return "an intermediate has other readers"
    return [split, norm, back, rot], norm, {"num_heads": heads, "epsilon": float(na.get("epsilon", 1e-5))}


# GroupQueryAttention attributes and the values the row-by-row kernel computes (absent = the op's default; ORT's
# saved optimized graph spells every default out). qk_norm_epsilon only matters with q/k norm weight inputs.
_GQA_PLAIN = {"do_rotary": (0,), "rotary_interleaved": (0,), "local_window_size": (-1,), "softcap": (0.0,),
              "smooth_softmax": (0, -1), "causal": (1,), "sliding_window_cache": (0,), "qk_output": (0,),
              "k_quant_type": (b"NONE",), "v_quant_type": (b"NONE",), "qk_norm_epsilon": None}


def _attention_site(node: NodeProto) -> dict | str:
    """The RowwiseGroupQueryAttention attributes for this GroupQueryAttention, or why not."""
    if len(node.input) != 7 or not all(node.input):
        return "not exactly query, key, value, past_key, past_value, seqlens_k, total_sequence_length"
    if len(node.output) != 3 or not all(node.output):
        return "not exactly output, present_key, present_value"
    a = _attrs(node)
    for name, value in a.items():
        if name in ("num_heads", "kv_num_heads", "scale"):
            continue
        if name not in _GQA_PLAIN:
            return f"attribute {name} (not computed row by row)"
        if _GQA_PLAIN[name] is not None and value not in _GQA_PLAIN[name]:
            return f"{name}={value!r}"
    return {"num_heads": int(a["num_heads"]), "kv_num_heads": int(a["kv_num_heads"]),
            "scale": float(a.get("scale", 0.0))}


def _identity_reshape_site(g: _Graph, second: NodeProto) -> NodeProto | str:
    first = g.producer.get(second.input[0])
    if not _is(first, "Reshape"):
        return "not Reshape(Reshape(x))"
    if second.output[0] in g.outputs:
        return "the pair's output is a graph output"
    if not g.only_feeds(first.output[0], second):
        return "the middle tensor has other readers"
    shape_in, shape_out = g.known_shape(first.input[0]), g.known_shape(second.output[0])
    if shape_in is None or shape_out is None:
        return "shapes unknown (no value_info)"
    if shape_in != shape_out:
        return f"not an identity: {list(shape_in)} -> {list(shape_out)}"
    return first


def fuse(model: ModelProto) -> FusionReport:
    """Apply the fusions and the attention swap to `model` (in place) and report what changed and what was skipped, why."""
    t0 = time.perf_counter()
    report = FusionReport()
    drop: set[int] = set()
    replace: dict[int, NodeProto] = {}  # id(node it takes the place of) -> fused node
    renames: dict[str, str] = {}
    g = _Graph(model)
    for node in g.graph.node:
        name = node.name or node.output[0]
        if id(node) in drop:
            continue
        if _is(node, "Mul"):
            site = _swiglu_site(g, node)
            if isinstance(site, str):
                if site != "not silu(gate) * up":
                    report.skipped.append(("swiglu", name, site))
                continue
            nodes, gate, up = site
            fused = helper.make_node(SWIGLU, [gate.input[0], gate.input[1], gate.input[2], up.input[1], up.input[2]],
                                     [node.output[0]], name=f"{gate.name or name}_swiglu", domain=DOMAIN,
                                     **{k: v for k, v in _attrs(gate).items() if k in ("K", "N", "bits", "block_size")})
            drop.update(id(n) for n in nodes)
            replace[id(node)] = fused
            report.swiglu += 1
        elif _is(node, "RotaryEmbedding", _MS):
            site = _norm_rotary_site(g, node)
            if isinstance(site, str):
                report.skipped.append(("norm_rotary", name, site))
                continue
            nodes, norm, attrs = site
            split = nodes[0]
            fused = helper.make_node(NORM_ROTARY, [split.input[0], norm.input[1], *node.input[1:4]],
                                     [node.output[0]], name=f"{name}_norm", domain=DOMAIN, **attrs)
            drop.update(id(n) for n in nodes)
            replace[id(node)] = fused
            report.norm_rotary += 1
        elif _is(node, "GroupQueryAttention", _MS) and rowwise_attention():
            site = _attention_site(node)
            if isinstance(site, str):
                report.skipped.append(("attention", name, site))
                continue
            replace[id(node)] = helper.make_node(ATTENTION, list(node.input), list(node.output), name=f"{name}_rows",
                                                 domain=DOMAIN, **site)
            drop.add(id(node))
            report.attention += 1
        elif _is(node, "Reshape") and _is(g.producer.get(node.input[0]), "Reshape"):
            site = _identity_reshape_site(g, node)
            if isinstance(site, str):
                report.skipped.append(("identity_reshapes", name, site))
                continue
            drop.update((id(site), id(node)))
            renames[node.output[0]] = site.input[0]
            report.identity_reshapes += 1
    if drop:
        kept = [replace.get(id(n), n) for n in g.graph.node if id(n) not in drop or id(n) in replace]
        for n in kept:
            for i, inp in enumerate(n.input):
                if inp in renames:
                    n.input[i] = renames[inp]
        del g.graph.node[:]
        g.graph.node.extend(kept)
        names = set(renames)
        keep_vi = [vi for vi in g.graph.value_info if vi.name not in names]
        del g.graph.value_info[:]
        g.graph.value_info.extend(keep_vi)
        import_domain(model)
    report.seconds = time.perf_counter() - t0
    return report
