"""Float16 activations for ORT CUDA (SM 7.5+): a fused ORT graph computes in float16, its contract stays float32.

Runs on the output of the CPU-style fusions (GroupQueryAttention with past/present KV, RotaryEmbedding,
(Skip)SimplifiedLayerNormalization, MultiHeadAttention, ...) and, optionally, the precision pass's
MatMulNBits, for targets whose `activation_dtype` is "float16" (`cuda`: tensor cores; GroupQueryAttention's
CUDA kernel has no float32 variant). Every node with float tensors computes in float16 except the float32
regions below, and the graph's contract changes only where it must:

* float32 initializers and Constant / ConstantOfShape values become float16 (MatMulNBits `scales` and `bias`
  too; its uint8 packed weights and zero points, and every integer / bool tensor, are untouched). Values
  beyond float16's range saturate to +-65504 instead of becoming inf (the exporter's `finfo(float32).min`
  attention mask is the one such constant in Qwen3-VL); `details["saturated"]` / `["flushed_to_zero"]`
  count them per initializer. The float16 bytes are made lazily (`ir.LazyTensor`), when the graph is saved.
* `Cast(to=FLOAT)` inside the float16 part becomes `Cast(to=FLOAT16)`; other type-carrying attributes
  (ConstantOfShape's value, EyeLike / Random* `dtype`) follow; annotated value types FLOAT -> FLOAT16
  (unannotated values stay unannotated: ORT infers them; a Cast(to=FLOAT) that already ends at a float32 graph
  output is kept as that boundary). Outputs whose type is fixed to float32 by the op
  (the norms' mean / inv_std_var: U = float) and inputs fixed to float32 (GroupQueryAttention's k/v scales)
  are left float32.
* the I/O contract: inputs/outputs matching `float16_io` (the KV cache: `past_key_*`, `past_value_*`,
  `present_*`) become float16 -- the cache buffers are bound as float16 and take half the bytes. Every other
  float input/output (decoder `inputs_embeds`, `deepstack_embeds`, `logits`; every vision input/output)
  stays float32 with one Cast at the boundary, so the runtime feeds and reads float32 except the cache.

Numerically sensitive spots (measured on the tiny checkpoint, tests/test_float16_activations.py):

* rotary tables stay float32 (`fp32_position_tables`): the decoder computes `cos/sin(position * inv_freq)`
  from integer positions in the graph. float16 holds integers exactly only up to 2048 (spacing 1.0 between
  1024 and 2048, i.e. a whole radian of angle error for inv_freq = 1), overflows to inf at 65520 (the
  published model's context is 262144: cos(inf) = NaN), and inv_freq's smallest entries (5e-7) are float16
  subnormals with 3 significant bits. So each `Cast(integer -> FLOAT)` from which a Sin/Cos is reachable seeds a
  float32 region (nodes whose float inputs are all region values or constants) and the tables are cast to
  float16 only where the fused RotaryEmbedding reads them: they lie in [-1, 1]. A region value that reaches a
  float16 node without being a Sin/Cos table is reported in `skipped` (its cast could overflow).
* the lm_head stays float32 (`fp32_lm_head`, default True): the final RMSNorm output is cast to float32 and the
  tied `embed_tokens.weight` Gemm (or a quantized lm_head's MatMulNBits, scales float32) accumulates and
  stores the logits in float32, so `logits` needs no output cast. float16 would not overflow there (tiny
  model: |logit| <= 27), and it costs little accuracy (max |dlogit| vs float32 over a 7-token prefill and 6
  cached steps: 0.047 with the float32 head, 0.050 with a float16 one); the reason is the contract: the tied
  matrix is also the runtime's embedding table, which the manifest records as float32
  (`artifacts/writer.embedding_location`). `fp32_lm_head=False` makes it float16 (0.62 GB less on the 2B model,
  whose dense float16 decode step then reads 18% fewer weight bytes: 3.44 instead of 4.06 GB) and says so in
  `details["embedding"]`; the writer must then record the table's dtype.
* RMSNorm inputs / the residual stream stay float16: the fused norms accumulate in float32 internally
  (stash_type=1 / U=float), and the tiny model's largest activation is the residual stream at ~31 (vision:
  ~9), far from 65504, so no float32 residual is needed there. The published 2B model's activation ranges
  are not measured here.

The graph is stably sorted first (the vision fusions leave a few nodes out of topological order, which ORT
tolerates and onnx's checker does not; `details["sorted"]`); inserted Casts are named `qvl_fp16_cast_*` and
marked `qvl.float16=boundary` in their metadata, which is how a second run recognises them.

Report counts: `initializers_converted`, `constants_converted`, `attributes_rewritten`, `casts_rewritten`,
`casts_inserted`, `values_retyped`, `io_float16`, `nodes_converted`: all changes of this run, so a second
run reports zeros, `modified=False` and `details["already_float16"] = True`. Skipped: each float32 region
with its reason (rotary tables, lm_head) and any site that could not be converted.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from qvl.passes.base import GraphPass, PassReport, Skip, TargetCapabilities
from qvl.passes.linear_sites import EMBEDDING_NAME, LM_HEAD_LAYER

FP32, FP16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FLOATS = (FP32, FP16)
_DTYPE_NAMES = {FP32: "float32", FP16: "float16"}
FP16_MAX = 65504.0  # largest finite float16
FP16_FLUSH = 2.0 ** -25  # magnitudes below this round to 0 in float16 (half the smallest subnormal)
MARK = "qvl.float16"  # metadata key on the Cast nodes this pass inserts ("boundary")
MS_DOMAIN = "com.microsoft"
_CHUNK = 1 << 22  # elements per conversion chunk (bounded temporaries for the 2B model's embedding)

_INTEGERS = frozenset({ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
                       ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64})
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read no element values: any input dtype will do
_BOOL_OUT = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                       "IsNaN", "IsInf"})
_INT64_OUT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
_TRIG = frozenset({"Sin", "Cos"})
# ops that move or select elements without arithmetic: a Sin/Cos table stays within [-1, 1] through them
_DATA_MOVEMENT = frozenset({"Gather", "GatherElements", "GatherND", "Slice", "Reshape", "Transpose", "Unsqueeze",
                            "Squeeze", "Concat", "ScatterND", "ScatterElements", "Expand", "Identity", "Flatten",
                            "Tile", "Split"})
# outputs typed float32 whatever the compute type (ORT schemas: U = tensor(float); ONNX LayerNormalization's
# Mean / InvStdDev follow stash_type = 1)
_FLOAT32_OUTPUTS = {
    ("", "LayerNormalization"): (1, 2),
    ("", "SimplifiedLayerNormalization"): (1,),
    (MS_DOMAIN, "SkipLayerNormalization"): (1, 2),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (1, 2),
}
# inputs typed float32 whatever the compute type (GroupQueryAttention k_scale / v_scale: T_KV_SCALE = float)
_FLOAT32_INPUTS = {(MS_DOMAIN, "GroupQueryAttention"): (12, 13)}
_DTYPE_ATTR_OPS = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                             "Bernoulli"})

REASON_POSITIONS = ("rotary table computed from integer positions stays float32: float16 holds integers exactly "
                    "only to 2048 and overflows at 65520 (cos(inf) = NaN); the Sin/Cos tables are cast to float16 "
                    "where RotaryEmbedding reads them")
REASON_LM_HEAD = ("lm_head stays float32 (fp32_lm_head): logits accumulate and are stored in float32, and the tied "
                  "embed_tokens.weight stays the runtime's float32 embedding table")


@dataclass(frozen=True)
class Float16Config:
    graphs: tuple[str, ...] = ("decoder", "vision")
    # graph inputs/outputs (fnmatch patterns) that become float16: the KV cache. Every other float input/output
    # stays float32 behind one boundary Cast.
    float16_io: tuple[str, ...] = ("past_key_*", "past_value_*", "present_*")
    fp32_position_tables: bool = True  # rotary cos/sin from integer positions in float32 (see the module doc)
    fp32_lm_head: bool = True  # the final logits projection in float32 (see the module doc)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["graphs"] = list(self.graphs)
        d["float16_io"] = list(self.float16_io)
        return d


# -- numpy: float32 -> float16 with saturation ---------------------------------------------------------------


def to_float16(array: np.ndarray) -> np.ndarray:
    """float16 copy of `array`, values beyond +-65504 (inf included) saturated to +-65504 (NaN stays NaN)."""
    flat = np.asarray(array).reshape(-1)
    out = np.empty(flat.size, np.float16)
    for s in range(0, flat.size, _CHUNK):
        out[s:s + _CHUNK] = np.clip(np.asarray(flat[s:s + _CHUNK], np.float32), -FP16_MAX, FP16_MAX)
    return out.reshape(np.shape(array))


def float16_losses(array: np.ndarray) -> tuple[int, int]:
    """(saturated, flushed to zero) element counts of converting `array` to float16."""
    flat = np.asarray(array).reshape(-1)
    saturated = flushed = 0
    for s in range(0, flat.size, _CHUNK):
        mag = np.abs(np.asarray(flat[s:s + _CHUNK], np.float32))
        saturated += int(np.count_nonzero(mag > FP16_MAX))
        flushed += int(np.count_nonzero((mag > 0) & (mag < FP16_FLUSH)))
    return saturated, flushed


def _lazy_float16(tensor, name: str | None) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(to_float16(tensor.numpy()), name=name), dtype=FP16,
                         shape=ir.Shape(tensor.shape), name=name)


# -- dtypes of every value -------------------------------------------------------------------------------------


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _constant_dtype(node: ir.Node) -> ir.DataType | None:
    for name, a in node.attributes.items():
        if name in ("value", "sparse_value"):
            return a.value.dtype
        if name in ("value_float", "value_floats"):
            return FP32
        if name in ("value_int", "value_ints"):
            return ir.DataType.INT64
        if name in ("value_string", "value_strings"):
            return ir.DataType.STRING
    return None


def _output_dtype(node: ir.Node, index: int, ins: list) -> ir.DataType | None:
    """The dtype of an unannotated output, from the op's type rule (most ops: their first data input's)."""
    op, key = node.op_type, (_domain(node), node.op_type)
    if index in _FLOAT32_OUTPUTS.get(key, ()):
        return FP32
    if op == "Cast":
        return ir.DataType(_attr(node, "to"))
    if op == "CastLike":
        return ins[1]
    if op in _INT64_OUT or (op == "TopK" and index == 1):
        return ir.DataType.INT64
    if op in _BOOL_OUT:
        return ir.DataType.BOOL
    if op == "Constant":
        return _constant_dtype(node)
    if op == "ConstantOfShape":
        value = _attr(node, "value")
        return FP32 if value is None else value.dtype
    if op in _DTYPE_ATTR_OPS:
        dtype = _attr(node, "dtype")
        if dtype is not None:
            return ir.DataType(dtype)
        return FP32 if op in ("RandomNormal", "RandomUniform") else ins[0]
    if op == "Where":
        return ins[1] or ins[2]
    if op == "DequantizeLinear":
        return ins[1]
    if key == ("", "SimplifiedLayerNormalization") and index == 0:
        return ins[1]  # Y: V, the scale's type
    if key == (MS_DOMAIN, "GroupQueryAttention") and index in (1, 2):
        return ins[3] or ins[0]  # present: T_CACHE, the past's type
    return next((d for d in ins if d is not None), None)


def infer_dtypes(graph: ir.Graph) -> dict:
    """{value: DataType or None} for every value of a topologically sorted `graph`: annotations first, else the
    op's type rule."""
    dt: dict = {v: v.dtype for v in graph.inputs}
    for v in graph.initializers.values():
        dt[v] = v.const_value.dtype if v.const_value is not None else v.dtype
    for node in graph:
        ins = [None if v is None else dt.get(v, v.dtype) for v in node.inputs]
        for i, out in enumerate(node.outputs):
            dt[out] = out.dtype if out.dtype is not None else _output_dtype(node, i, ins)
    return dt


# -- the pass ------------------------------------------------------------------------------------------------


class Float16ActivationsPass(GraphPass):
    """Compute a fused ORT graph's activations in float16 (KV cache float16; other I/O float32)."""

    name = "float16_activations"
    config_type = Float16Config
    scope = "float16 activations"
    count_keys = ("initializers_converted", "constants_converted", "attributes_rewritten", "casts_rewritten",
                  "casts_inserted", "values_retyped", "io_float16", "nodes_converted")

    def applies_to(self, target: TargetCapabilities, graph: str) -> str | None:
        reason = super().applies_to(target, graph)
        if reason is None and target.activation_dtype != "float16":
            reason = (f"target {target.name} computes activations in {target.activation_dtype} "
                      f"(activation_dtype={target.activation_dtype!r}); float16 activations are for targets "
                      "with activation_dtype='float16' (ORT CUDA, SM 7.5+)")
        return reason

    def start(self, model, report: PassReport) -> None:
        super().start(model, report)
        report.details.update(config=self.config.to_dict(), activation_dtype="float16", already_float16=False,
                              sorted=False, float16_nodes=0, float32_nodes={}, boundary_casts=[], io={}, saturated={},
                              flushed_to_zero={}, bytes_before=0, bytes_after=0, embedding=None)

    # The run is one walk in topological order over a fixed plan: which nodes stay float32 (regions), which
    # constants convert, then per node: inputs brought to the dtype the node computes in (a cached Cast per
    # value), attributes and output annotations retyped; graph outputs get their contract dtype last.
    def run(self, model, report: PassReport) -> None:
        cfg: Float16Config = self.config
        graph = model.graph
        counts, details = report.counts, report.details
        # fused graphs are not always stored in topological order (ORT sorts at load; onnx's checker refuses
        # them): a stable sort, a no-op on a sorted graph, then every walk below sees producers first
        before = [id(n) for n in graph]
        graph.sort()
        details["sorted"] = [id(n) for n in graph] != before
        order = list(graph)
        dt = infer_dtypes(graph)
        was_float32 = {v for v, d in dt.items() if d == FP32}  # before this run: a node computed in float32
        self._order = order
        self._graph, self._dt, self._report, self._casts, self._retyped = graph, dt, report, {}, set()
        self._names = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers)
        self._node_names = {n.name for n in graph}

        region, reasons = self._float32_regions(graph, dt, cfg, report)
        self._region = region
        for reason, nodes in reasons.items():
            details["float32_nodes"][reason] = [n.name for n in nodes]

        # graph inputs: the KV cache becomes float16; the others stay float32 (their consumers get one Cast)
        fp16_io = lambda v: any(fnmatch.fnmatchcase(v.name or "", p) for p in cfg.float16_io)  # noqa: E731
        for v in graph.inputs:
            if dt.get(v) == FP32 and fp16_io(v):
                self._retype(v, FP16)
                counts["io_float16"] += 1
            if dt.get(v) in FLOATS:
                details["io"][v.name] = _DTYPE_NAMES[self._dt[v]]

        self._convert_constants(graph, region, report)

        for node in order:
            if node.metadata_props.get(MARK) or node.op_type in _SHAPE_ONLY:
                continue
            if node in region:  # float32: float16 inputs (the lm_head's hidden state) get a Cast
                for i, v in enumerate(node.inputs):
                    if v is not None and self._dt.get(v) == FP16:
                        node.replace_input_with(i, self._as(v, FP32))
                continue
            if node.op_type == "Cast":
                out = node.outputs[0]
                if out.is_graph_output() and not out.uses() and not fp16_io(out):
                    continue  # already the float32 boundary of a float32 output
                if _attr(node, "to") == FP32:
                    node.attributes["to"] = ir.AttrInt64("to", FP16)
                    self._retype(out, FP16)
                    counts["casts_rewritten"] += 1
                    counts["nodes_converted"] += 1
                if self._dt.get(out) == FP16:
                    details["float16_nodes"] += 1
                continue
            floats = [v for v in (*node.inputs, *node.outputs) if v is not None and self._dt.get(v) in FLOATS]
            if not floats or self._source_stays_float32(node):
                continue
            fixed_in = _FLOAT32_INPUTS.get((_domain(node), node.op_type), ())
            fixed_out = _FLOAT32_OUTPUTS.get((_domain(node), node.op_type), ())
            converted = (any(v in was_float32 for i, v in enumerate(node.inputs) if i not in fixed_in)
                         or any(v in was_float32 for j, v in enumerate(node.outputs) if j not in fixed_out))
            for i, v in enumerate(node.inputs):
                if v is not None and self._dt.get(v) == FP32 and i not in fixed_in:
                    node.replace_input_with(i, self._as(v, FP16))
            converted |= self._rewrite_attributes(node, report)
            for j, out in enumerate(node.outputs):
                if self._dt.get(out) == FP32 and j not in fixed_out:
                    self._retype(out, FP16)
            details["float16_nodes"] += 1
            counts["nodes_converted"] += converted

        self._graph_outputs(graph, fp16_io, report)
        if not any(counts.values()) and any(self._dt.get(v) == FP16 for v in self._dt):
            details["already_float16"] = True
            report.skipped.append(Skip(self.graph, "already computes in float16 (an earlier run): nothing changed"))

    # -- the plan ------------------------------------------------------------------------------------------------

    def _float32_regions(self, graph, dt, cfg: Float16Config, report: PassReport):
        """Nodes that stay float32: forward closures (float inputs all region values or constants) of the seeds."""
        def is_const(v):
            return v.const_value is not None or (v.producer() is not None and v.producer().op_type == "Constant")

        def closure(seeds):
            nodes, values = [], set()
            for node in self._order:
                if node.metadata_props.get(MARK) or node.op_type in _SHAPE_ONLY:
                    continue
                floats = [v for v in node.inputs if v is not None and dt.get(v) in FLOATS]
                joins = node in seeds or (floats and any(v in values for v in floats)
                                          and all(v in values or is_const(v) for v in floats))
                if joins:
                    nodes.append(node)
                    values.update(o for o in node.outputs if dt.get(o) in FLOATS)
            return nodes, values

        reasons: dict[str, list] = {}
        if cfg.fp32_position_tables:
            candidates = [n for n in self._order if n.op_type == "Cast" and not n.metadata_props.get(MARK)
                          and _attr(n, "to") == FP32 and dt.get(n.inputs[0]) in _INTEGERS]
            seeds = [s for s in candidates if any(n.op_type in _TRIG for n in closure({s})[0])]
            if seeds:
                nodes, values = closure(set(seeds))
                reasons[REASON_POSITIONS] = nodes
                report.skipped.append(Skip(", ".join(s.name for s in seeds),
                                           f"{REASON_POSITIONS} ({len(nodes)} nodes)"))
                self._check_bounded(nodes, values, dt, report)
        if cfg.fp32_lm_head and self.graph == "decoder":
            heads = [n for n in graph if n.op_type in ("MatMul", "Gemm", "MatMulNBits") and (
                n.metadata_props.get("qvl.layer") == LM_HEAD_LAYER
                or any(v is not None and v.name == EMBEDDING_NAME for v in n.inputs[1:]))]
            if heads:
                nodes, _ = closure(set(heads))
                reasons[REASON_LM_HEAD] = nodes
                report.skipped.append(Skip(", ".join(h.name for h in heads), f"{REASON_LM_HEAD} ({len(nodes)} nodes)"))
        # control flow (If / Loop / Scan): their subgraphs are not rewritten, so the node stays float32
        pinned = [n for n in self._order if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                for a in n.attributes.values())]
        for n in pinned:
            report.skipped.append(Skip(n.name, f"{n.op_type} has subgraphs (not rewritten): left float32"))
        if pinned:
            reasons["control flow with subgraphs"] = pinned
        return {n for nodes in reasons.values() for n in nodes}, reasons

    @staticmethod
    def _check_bounded(nodes, values, dt, report: PassReport) -> None:
        """Report position-region values read by float16 nodes that are not Sin/Cos tables (|x| <= 1)."""
        region = set(nodes)
        bounded = set()
        for node in nodes:
            floats = [v for v in node.inputs if v is not None and dt.get(v) in FLOATS]
            if node.op_type in _TRIG or (node.op_type in _DATA_MOVEMENT and all(v in bounded for v in floats)):
                bounded.update(o for o in node.outputs if o in values)
        for v in values:
            readers = [u.node for u in v.uses() if u.node not in region and u.node.op_type not in _SHAPE_ONLY
                       and not u.node.metadata_props.get(MARK)]
            if readers and v not in bounded:
                report.skipped.append(Skip(v.name, f"float32 position value read by float16 node {readers[0].name} "
                                                   "is not a Sin/Cos table: its float16 cast can overflow"))

    def _requirement(self, node: ir.Node, index: int) -> ir.DataType | None:
        """The float dtype `node` needs at input `index` (None: any)."""
        if node.metadata_props.get(MARK) or node.op_type in _SHAPE_ONLY or node.op_type == "Cast":
            return None
        if node.op_type == "CastLike" and index == 0:
            return None
        if node in self._region or index in _FLOAT32_INPUTS.get((_domain(node), node.op_type), ()):
            return FP32
        return FP16

    def _source_stays_float32(self, node: ir.Node) -> bool:
        """A Constant / ConstantOfShape / Random* node (no float inputs) keeps float32 unless only float16 reads it."""
        if node.op_type not in ("Constant", "ConstantOfShape", *_DTYPE_ATTR_OPS):
            return False
        if any(v is not None and self._dt.get(v) in FLOATS for v in node.inputs):
            return False
        needs = {self._requirement(u.node, u.idx) for o in node.outputs for u in o.uses()}
        outputs = set(self._graph.outputs)
        return FP16 not in needs or FP32 in needs or any(o in outputs for o in node.outputs)

    def _convert_constants(self, graph, region, report: PassReport) -> None:
        """float32 initializers read only as float16 become float16 in place (mixed readers: a Cast)."""
        counts, details = report.counts, report.details
        outputs = set(graph.outputs)
        for v in list(graph.initializers.values()):
            t = v.const_value
            if t is None or t.dtype != FP32 or v in outputs or v.is_graph_input():
                continue
            needs = {self._requirement(u.node, u.idx) for u in v.uses()}
            if FP16 not in needs or FP32 in needs:
                continue  # float32 readers (rotary inv_freq): stays float32; mixed readers get a Cast
            array = t.numpy()
            saturated, flushed = float16_losses(array)
            if saturated:
                details["saturated"][v.name] = saturated
            if flushed:
                details["flushed_to_zero"][v.name] = flushed
            details["bytes_before"] += t.nbytes
            v.const_value = _lazy_float16(t, v.name)
            details["bytes_after"] += v.const_value.nbytes
            self._retype(v, FP16, count=False)
            counts["initializers_converted"] += 1
            if v.name == EMBEDDING_NAME:
                details["embedding"] = {"initializer": EMBEDDING_NAME, "dtype": "float16",
                                        "note": "the tied embedding table is now float16: the manifest's embedding "
                                                "entry must record dtype float16"}

    def _rewrite_attributes(self, node: ir.Node, report: PassReport) -> bool:
        """Type-carrying attributes of a float16 node (Constant / ConstantOfShape value, EyeLike / Random* dtype)."""
        if node.op_type == "Constant" and _constant_dtype(node) == FP32:
            (name, a), = node.attributes.items()
            array = np.asarray(a.value.numpy() if name == "value" else a.value, np.float32)
            node.attributes.pop(name)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_float16(array)))
            report.counts["constants_converted"] += 1
            return True
        if node.op_type == "ConstantOfShape":
            value = _attr(node, "value")
            if value is None or value.dtype == FP32:
                array = np.zeros(1, np.float32) if value is None else value.numpy()
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_float16(array)))
                report.counts["attributes_rewritten"] += 1
                return True
        elif node.op_type in _DTYPE_ATTR_OPS and self._dt.get(node.outputs[0]) == FP32:
            if "dtype" in node.attributes or node.op_type in ("RandomNormal", "RandomUniform"):
                node.attributes["dtype"] = ir.AttrInt64("dtype", FP16)
                report.counts["attributes_rewritten"] += 1
                return True
        return False

    def _graph_outputs(self, graph, fp16_io, report: PassReport) -> None:
        """Each float output in its contract dtype: float16 for `float16_io` (the cache), else float32 (a Cast)."""
        for i, out in enumerate(list(graph.outputs)):
            have = self._dt.get(out)
            if have not in FLOATS:
                continue
            want = FP16 if fp16_io(out) else FP32
            if have != want:
                if out.is_graph_input():
                    report.skipped.append(Skip(out.name, "graph input passed through as an output: left as is"))
                    continue
                name = out.name
                out.name = self._fresh(f"{name}.{'fp16' if have == FP16 else 'fp32'}", self._names)
                cast = self._cast_node(out, want, name)
                graph.append(cast)
                graph.outputs[i] = cast.outputs[0]
                self._dt[cast.outputs[0]] = want
                out = cast.outputs[0]
            if want == FP16 and out in self._retyped:
                report.counts["io_float16"] += 1
            report.details["io"][out.name] = _DTYPE_NAMES[want]

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _retype(self, v: ir.Value, dtype: ir.DataType, count: bool = True) -> None:
        self._dt[v] = dtype
        self._retyped.add(v)
        if v.type is not None:
            v.type = ir.TensorType(dtype)
            if count:
                self._report.counts["values_retyped"] += 1

    @staticmethod
    def _fresh(name: str, taken: set) -> str:
        candidate, k = name, 1
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        return candidate

    def _cast_node(self, v: ir.Value, to: ir.DataType, out_name: str) -> ir.Node:
        suffix = "fp16" if to == FP16 else "fp32"
        node = ir.Node("", "Cast", [v], attributes=[ir.AttrInt64("to", to)],
                       name=self._fresh(f"qvl_fp16_cast_{suffix}/{v.name}", self._node_names),
                       metadata_props={MARK: "boundary"})
        node.outputs[0].name = out_name
        node.outputs[0].type = ir.TensorType(to)
        node.outputs[0].shape = v.shape.copy() if v.shape is not None else None
        self._report.counts["casts_inserted"] += 1
        self._report.details["boundary_casts"].append(node.name)
        return node

    def _as(self, v: ir.Value, to: ir.DataType) -> ir.Value:
        """`v` as `to`: one Cast per (value, dtype), placed after its producer (graph inputs and constants: first)."""
        key = (id(v), to)
        if key not in self._casts:
            node = self._cast_node(v, to, self._fresh(f"{v.name}.{'fp16' if to == FP16 else 'fp32'}", self._names))
            producer = v.producer()
            if producer is not None:
                self._graph.insert_after(producer, node)
            elif len(self._graph):
                self._graph.insert_before(self._graph.node(0), node)
            else:
                self._graph.append(node)
            self._dt[node.outputs[0]] = to
            self._casts[key] = node.outputs[0]
        return self._casts[key]
