"""Vision attention fusion: every vision block's attention -> `com.microsoft.MultiHeadAttention`.

`VisionEncoderAdapter` (toolchain/export/adapters.py) exports every vision block's attention over the
patches of one call as (N patches, H heads, Dh head size, D = H * Dh):

    q, k, v = Squeeze(Slice(Transpose(Reshape(qkv, [-1, 3, H, Dh]), [1, 0, 2, 3])))    each [N, H, Dh]
    q, k    = rotate-half rotary with the host cos/sin tables                            (stays as is)
    scores  = MatMul(Transpose(q, [1, 0, 2]), Transpose(k, [1, 2, 0])) * scale [+ bias]
    out     = Reshape(Transpose(MatMul(Softmax(scores), Transpose(v, [1, 0, 2])), [1, 0, 2]), [-1, D])

Every block's subgraph from the three Transposes to the final Reshape becomes

    out = Reshape(MultiHeadAttention(Reshape(q, [1, -1, D]), Reshape(k, ...), Reshape(v, ...),
                                     num_heads=H, scale=scale), [-1, D])

with the patches as one batch-1 sequence. Current exports are one attention segment per call (an image
or one video frame; the runtime calls the graph once per segment), so there is no bias and the fused
node has no `attention_bias`: ONNX Runtime's CPU kernel then runs `MlasFlashAttention` (tiled, memory
linear in N; it is taken only when there is no attention_bias / key_padding_mask / past / present),
instead of materialising `[1, H, N, N]` scores.

Artifacts exported before that (`export_artifact(..., packed_vision=True)`) carry a `bias`: the
block-diagonal image mask built once in the graph from `segment_ids` (0 inside an image, finfo.min
across images). It becomes `attention_bias=Unsqueeze(bias, [0, 1])` `[1, 1, N, N]` (ORT's contrib spec
allows `(batch or 1, heads or 1, S, total_S)` and adds it to `scale * Q K^T` before the softmax, which is
exactly the exported computation); the Unsqueeze is emitted once per bias value and shared by all blocks.

Rotary stays outside as ordinary ops: ORT's RotaryEmbedding takes a position-id indexed cos/sin cache of
`[max_pos, Dh/2]`, while the graph gets per-patch `[N, Dh]` tables whose two halves are equal only by
construction of the host code, which the graph cannot verify.
onnxscript's ort_fusions MHA rules are not reusable here: they expect `[B, S, D]` -> `[B, H, S, Dh]`
layouts with a leading batch axis, not the packed `[N, H, Dh]` head-major layout of this tower.

Sites that match the structure but not the conditions (bias not `[N, N]`-shaped / not broadcastable
the way MHA allows, non-constant scale, ...) and Softmax nodes whose surroundings do not have the
structure at all are listed in `report.skipped`. TensorRT targets (`ort_contrib_ops=False`) are skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, pattern

from qvl.passes.base import GraphPass, PassReport, Skip, scalar_const, check_shape, initializer_ints

_STRUCTURE = (
    "Transpose(q|k|v) -> MatMul -> Mul(scale) [-> Add(bias)] -> Softmax -> MatMul(v) -> Transpose -> Reshape"
)


@dataclass(frozen=True)
class VisionAttentionFusionConfig:
    graphs: tuple[str, ...] = ("vision",)


def site_name(v: ir.Value | None, fallback: str) -> str:
    """`visual.blocks.<i>.attn` from the qkv projection weight that `v` is sliced from, else `fallback`."""
    value = v
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            break
        if node.op_type in ("Gemm", "MatMul") and len(node.inputs) > 1:
            w = node.inputs[1]
            if w is not None and w.is_initializer() and w.name:
                name = w.name.removesuffix(".weight")
                return name.removesuffix(".qkv")
            break
        value = node.inputs[0] if node.inputs else None
    return fallback


class _PackedVisionAttention(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, has_bias: bool, state: dict):
        super().__init__(name, remove_nodes=True)
        self._has_bias = has_bias
        self._state = state  # shared by the rule variants: {"bias4": {bias value: [1,1,N,N] value}, "sites": [...]}

    def setup(self):
        self._state["bias4"] = {}

    def pattern(self, op, q, k, v, scale, attn_bias, out_shape):
        scores = op.MatMul(op.Transpose(q, perm=[1, 0, 2]), op.Transpose(k, perm=[1, 2, 0]))
        scores = op.Mul(scores, scale)
        if self._has_bias:
            scores = op.Add(scores, attn_bias)
        probs = op.Softmax(scores, _outputs=["probs"])
        ctx = op.Transpose(op.MatMul(probs, op.Transpose(v, perm=[1, 0, 2])), perm=[1, 0, 2])
        return op.Reshape(ctx, out_shape, _outputs=["out"])

    def check(self, context, q, k, v, scale, attn_bias, out_shape, probs, out, **_) -> MatchResult:
        result = MatchResult()
        bindings: dict = {}
        for name, val in (("query", q), ("key", k), ("value", v)):
            if not check_shape(bindings, val, ["N", "H", "Dh"]):
                shape = val.shape if val is not None else None
                return result.fail(f"{name} shape {shape} is not [patches, heads, head_dim] like the query's", val)
        heads, head_dim = bindings["H"], bindings["Dh"]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            return result.fail(f"heads/head_dim are not static ({heads}, {head_dim})", q)
        if q.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return result.fail(f"dtype {q.dtype} is not float32/float16", q)
        if scalar_const(scale) is None:
            return result.fail("attention scale is not a constant scalar", scale)
        softmax = probs.producer()
        opset = context.model.opset_imports.get("", 20)
        axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
        if axis not in (-1, 2):
            return result.fail(f"Softmax axis {axis} is not the key axis (-1)", softmax)
        target = initializer_ints(out_shape)
        allowzero = out.producer().attributes.get_int("allowzero", 0)
        lead_ok = target is not None and len(target) == 2 and (
            target[0] == -1 or (target[0] == 0 and not allowzero) or target[0] == bindings["N"]
        )
        if not lead_ok or target[1] != heads * head_dim:
            return result.fail(f"output Reshape target {target} is not [-1, {heads * head_dim}]", out_shape)
        if self._has_bias:
            return self._check_bias(result, attn_bias, q, bindings)
        return result

    @staticmethod
    def _check_bias(result: MatchResult, bias: ir.Value, q: ir.Value, bindings: dict) -> MatchResult:
        if bias.dtype != q.dtype:
            return result.fail(f"attention bias dtype {bias.dtype} differs from the query's {q.dtype}", bias)
        if bias.shape is None:
            return result.fail("attention bias shape is unknown", bias)
        # MultiHeadAttention's attention_bias is (1 or batch, 1 or heads, S, total_S): the two trailing
        # axes must be the full [N, N] (no broadcasting over query or key positions).
        expected = {2: ["N", "N"], 3: ["H_or_1", "N", "N"], 4: ["1", "H_or_1", "N", "N"]}.get(bias.shape.rank())
        shape_ok = expected is not None and check_shape(dict(bindings), bias, expected)
        if shape_ok and bias.shape.rank() >= 3:
            lead = list(bias.shape)[: bias.shape.rank() - 2]
            shape_ok = lead[-1] in (1, bindings["H"]) and (len(lead) == 1 or lead[0] == 1)
        if not shape_ok:
            return result.fail(
                f"attention bias shape {bias.shape} is not [patches, patches] (or [1|heads, patches, patches], "
                "[1, 1|heads, patches, patches]) over the query's patches",
                bias,
            )
        return result

    def _bias4(self, op, bias: ir.Value) -> ir.Value:
        rank = bias.shape.rank()
        if rank == 4:
            return bias
        cache = self._state["bias4"]
        if bias not in cache:
            axes = [0, 1] if rank == 2 else [0]
            cache[bias] = op.Unsqueeze(bias, op.Constant(value_ints=axes))
            cache[bias].dtype = bias.dtype
            cache[bias].shape = ir.Shape([1] * (4 - rank) + list(bias.shape))
        return cache[bias]

    def rewrite(self, op, q, k, v, scale, attn_bias, **_):
        n, heads, head_dim = q.shape[0], q.shape[1], q.shape[2]
        hidden = heads * head_dim
        to_bsd = op.Constant(value_ints=[1, -1, hidden])
        packed = []
        for x in (q, k, v):
            y = op.Reshape(x, to_bsd)
            y.dtype, y.shape = x.dtype, ir.Shape([1, n, hidden])
            packed.append(y)
        # Without a bias the node takes q, k, v only (no trailing empty inputs): ORT's flash-kernel condition.
        extra = (None, None, self._bias4(op, attn_bias)) if self._has_bias else ()
        attn = op.MultiHeadAttention(
            *packed, *extra,
            num_heads=heads, scale=scalar_const(scale), _domain="com.microsoft",
        )
        attn.dtype, attn.shape = q.dtype, ir.Shape([1, n, hidden])
        self._state["sites"].append(site_name(v, fallback=attn.name or "attention"))
        return op.Reshape(attn, op.Constant(value_ints=[-1, hidden]))


def _rule_set(state: dict) -> pattern.RewriteRuleSet:
    rules = [
        *_PackedVisionAttention.rule("PackedVisionAttention", has_bias=True, state=state).commute(),
        *_PackedVisionAttention.rule("PackedVisionAttentionNoBias", has_bias=False, state=state).commute(),
    ]
    return pattern.RewriteRuleSet(rules)


class _FailureLog(MatchingTracer):
    """Per Softmax anchor: the reason of each structurally complete match whose condition failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[ir.Node, tuple[str, str]] = {}

    def log(self, rule, container, node, match_result, status) -> None:
        if status not in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            return
        softmax = next((n for n in match_result.nodes if n.op_type == "Softmax"), None)
        if softmax is None or softmax in self.failures:
            return
        try:
            v = match_result.bindings.get("v")
        except ValueError:  # still inside an OR-alternative: no top-level bindings
            v = None
        where = site_name(v, fallback=softmax.name or "Softmax")
        self.failures[softmax] = (where, match_result.reason or "condition failed")


def _softmax_site(softmax: ir.Node) -> str:
    """Best-effort block name for an unfused Softmax: follow probs -> MatMul(probs, Transpose(v))."""
    for consumer, index in softmax.outputs[0].uses():
        if consumer.op_type == "MatMul" and index == 0 and consumer.inputs[1] is not None:
            vt = consumer.inputs[1].producer()
            if vt is not None and vt.op_type == "Transpose":
                return site_name(vt.inputs[0], fallback=softmax.name or "Softmax")
    return softmax.name or "Softmax"


class VisionAttentionFusionPass(GraphPass):
    """Fuse every vision block's attention (unmasked, or a packed export's masked one) into ORT MultiHeadAttention."""

    name = "vision_attention_fusion"
    config_type = VisionAttentionFusionConfig
    scope = "vision attention fusion"
    contrib_ops_note = " (MultiHeadAttention); graph left as standard ONNX"
    count_keys = ("multi_head_attention",)

    def run(self, model, report: PassReport) -> None:
        state: dict = {"bias4": {}, "sites": []}
        rules = _rule_set(state)
        count = rules.apply_to_model(model)
        report.counts["multi_head_attention"] = count
        report.details["per_block"] = dict(Counter(state["sites"]))

        # Explain every attention (Softmax anchor) left unfused.
        log = _FailureLog()
        rules.apply_to_model(model, tracer=log)
        for node in model.graph:
            if node.op_type != "Softmax":
                continue
            if node in log.failures:
                where, reason = log.failures[node]
                report.skipped.append(Skip(where, reason))
            else:
                reason = f"attention does not have the exported form {_STRUCTURE}"
                report.skipped.append(Skip(_softmax_site(node), reason))
        if count:
            model.opset_imports.setdefault("com.microsoft", 1)
            RemoveUnusedNodesPass()(model)  # the per-block scale constants
