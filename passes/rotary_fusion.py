"""Decoder rotary fusion: `x*cos + rotate_half(x)*sin` -> ORT `com.microsoft.RotaryEmbedding`.

Qwen3-VL's text rotary is interleaved MRoPE: every token's cos/sin row is built from three position ids
(temporal / height / width), so no precomputed position -> angle table exists, and GroupQueryAttention's
built-in rotary (position = cache length + i) cannot express it. What the exported graph computes per
q/k head is still plain rotate-half RoPE with a per-token row:

    x   = Transpose(y, perm=[0, 2, 1, 3])                    # y: [batch, seq, heads, head_dim]
    cos = Unsqueeze(Concat(c, c, axis=-1), axes=[1])          # c: [batch, seq, head_dim/2], per token
    out = x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin

so it maps exactly onto ORT's RotaryEmbedding with a "cache" that has one row per token and position
ids that just count the tokens:

    cos_cache = Reshape(c, [-1, D/2])   position_ids = Reshape(Range(0, batch*seq), [batch, seq])
    out = Transpose(Reshape(RotaryEmbedding(Reshape(y, [0, 0, -1]), position_ids, cos_cache, sin_cache,
                                            num_heads=heads, interleaved=0), [0, 0, heads, D]), [0, 2, 1, 3])

The trailing Transpose is the inverse of the one the attention fusion puts in front of
GroupQueryAttention, and ORT's transpose optimizer cancels the pair, so a layer's q/k path becomes
Reshape -> RMSNorm -> RotaryEmbedding -> GroupQueryAttention. The cache/position subgraph depends only on
`c`, so the copies made per site are merged by common-subexpression elimination (one per graph).

Why: after the int4/int8 matmuls, the seven elementwise nodes of each rotate-half (x2 per layer) were
the largest remaining item in the ORT profile of a decode step (per-node dispatch on 1-token tensors).

The duplicated-halves condition (`Concat(c, c)`) is what makes the half-width cache exact; it is checked,
not assumed (a site whose cos/sin are not of that form is skipped with the reason). TensorRT targets
(`ort_contrib_ops=False`) are skipped: RotaryEmbedding is an ORT extension.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
from onnxscript.rewriter import MatchResult, pattern

from qvl.passes.base import GraphPass, PassReport, initializer_ints
from qvl.passes.norm_fusion import explain_failures

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class RotaryFusionConfig:
    graphs: tuple[str, ...] = ("decoder",)


def _half_table(value: ir.Value) -> tuple[ir.Value | None, str]:
    """`Unsqueeze(Concat(c, c, axis=-1), [1])` -> c, or (None, why not)."""
    unsq = value.producer()
    if unsq is None or unsq.op_type != "Unsqueeze" or unsq.domain not in ("", "ai.onnx"):
        return None, "is not Unsqueeze(Concat(c, c)) of a per-token table"
    axes = initializer_ints(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    if axes not in ([1], [-3]):
        return None, f"is unsqueezed on axes {axes}, not the head axis 1"
    cat = unsq.inputs[0].producer()
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2:
        return None, "is not built by Concat of two halves"
    if cat.inputs[0] is not cat.inputs[1]:
        return None, "halves differ (Concat(c1, c2) with c1 != c2): a half-width cache would not be exact"
    if cat.attributes.get_int("axis", 0) not in (-1, 2):
        return None, "halves are not concatenated on the last axis"
    half = cat.inputs[0]
    if half.shape is None or half.shape.rank() != 3:
        return None, "per-token table is not [batch, seq, head_dim/2]"
    return half, ""


class _RotateHalfRope(pattern.RewriteRuleClassBase):
    def __init__(self, with_steps: bool):
        super().__init__("RotateHalfRope" + ("" if with_steps else "NoSteps"), remove_nodes=True)
        self._with_steps = with_steps  # the exporter writes Slice(x, starts, ends, axes, steps); others omit steps

    def pattern(self, op, y, cos, sin, start1, end1, axes1, steps1, start2, end2, axes2, steps2):
        x = op.Transpose(y, _outputs=["x"])
        if self._with_steps:
            x1 = op.Slice(x, start1, end1, axes1, steps1)
            x2 = op.Slice(x, start2, end2, axes2, steps2)
        else:
            x1 = op.Slice(x, start1, end1, axes1)
            x2 = op.Slice(x, start2, end2, axes2)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, y, x, cos, sin, start1, end1, axes1, start2, end2, axes2, steps1=None, steps2=None,
              **_) -> MatchResult:
        result = MatchResult()
        if self._with_steps and (initializer_ints(steps1) != [1] or initializer_ints(steps2) != [1]):
            return result.fail("rotate_half slices have steps other than 1", steps1)
        if list(x.producer().attributes.get_ints("perm", None) or ()) != [0, 2, 1, 3]:
            return result.fail("rotated tensor is not Transpose(perm=[0, 2, 1, 3]) of [batch, seq, heads, head_dim]", x)
        if y.shape is None or y.shape.rank() != 4 or not isinstance(y.shape[2], int) or not isinstance(y.shape[3], int):
            return result.fail("heads / head_dim are not static", y)
        d = y.shape[3]
        if d % 2:
            return result.fail(f"head_dim {d} is odd", y)
        for axes in (axes1, axes2):
            if initializer_ints(axes) not in ([3], [-1]):
                return result.fail("rotate_half slices are not on the last axis", axes)
        if initializer_ints(start1) != [0] or initializer_ints(end1) != [d // 2] or initializer_ints(start2) != [d // 2]:
            return result.fail(f"rotate_half does not split head_dim {d} into two halves at {d // 2}", start2)
        e2 = initializer_ints(end2)
        if e2 is None or len(e2) != 1 or e2[0] < d:
            return result.fail("second half does not run to the end of head_dim", end2)
        for name, table in (("cos", cos), ("sin", sin)):
            half, why = _half_table(table)
            if half is None:
                return result.fail(f"{name} {why}", table)
            if half.shape[-1] != d // 2:
                return result.fail(f"{name} table width {half.shape[-1]} != head_dim/2 = {d // 2}", table)
        return result

    def rewrite(self, op, y, cos, sin, **_):
        heads, d = y.shape[2], y.shape[3]
        cos_half, _ = _half_table(cos)
        sin_half, _ = _half_table(sin)
        half_shape = op.Constant(value=ir.tensor(np.array([-1, d // 2], dtype=np.int64)))
        cos_cache = op.Reshape(cos_half, half_shape)
        sin_cache = op.Reshape(sin_half, half_shape)
        # positions 0..batch*seq-1 index the per-token rows of the caches above
        batch_seq = op.Shape(cos_half, start=0, end=2)
        count = op.ReduceProd(batch_seq, keepdims=0)
        zero = op.Constant(value=ir.tensor(np.array(0, dtype=np.int64)))
        one = op.Constant(value=ir.tensor(np.array(1, dtype=np.int64)))
        positions = op.Reshape(op.Range(zero, count, one), batch_seq)
        flat = op.Reshape(y, op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64))))
        rotated = op.RotaryEmbedding(flat, positions, cos_cache, sin_cache, num_heads=heads, interleaved=0,
                                     _domain=MS_DOMAIN)
        for v in (flat, rotated):  # recorded so that later rules (and ORT) see [batch, seq, heads*head_dim]
            v.shape, v.dtype = ir.Shape([y.shape[0], y.shape[1], heads * d]), y.dtype
        bshd = op.Reshape(rotated, op.Constant(value=ir.tensor(np.array([0, 0, heads, d], dtype=np.int64))))
        return op.Transpose(bshd, perm=[0, 2, 1, 3])


class _HeadSplitRoundTrip(pattern.RewriteRuleClassBase):
    """`Reshape(Transpose(Transpose(Reshape(x, [0, 0, N, D]), p), p), [0, 0, -1 | N*D])` with p = [0, 2, 1, 3]
    is `x`: a `[batch, seq, N*D]` tensor split into heads, moved to BNSH and back, and merged again. Left in
    front of GroupQueryAttention by the attention fusion (v) and by the rotary rewrite above (q, k); ORT
    cancels the transposes but keeps both Reshapes (two dispatches per tensor per layer per token)."""

    def __init__(self):
        super().__init__("HeadSplitRoundTrip", remove_nodes=False)

    def pattern(self, op, x, split, merge):
        heads = op.Reshape(x, split, _outputs=["heads"])
        return op.Reshape(op.Transpose(op.Transpose(heads, _outputs=["t1"]), _outputs=["t2"]), merge, _outputs=["merged"])

    def check(self, context, x, split, merge, heads, t1, t2, merged, **_) -> MatchResult:
        result = MatchResult()
        for t in (t1, t2):
            if list(t.producer().attributes.get_ints("perm", None) or ()) != [0, 2, 1, 3]:
                return result.fail("transposes are not the [0, 2, 1, 3] head swap and back", t)
        for r in (heads, merged):
            if r.producer().attributes.get_int("allowzero", 0):
                return result.fail("Reshape with allowzero=1 (0 is not 'copy this dimension')", r)
        shape = x.shape
        rope = x.producer()
        if shape is None and rope is not None and (rope.domain, rope.op_type) == (MS_DOMAIN, "RotaryEmbedding"):
            shape = rope.inputs[0].shape  # RotaryEmbedding keeps its input's shape (graphs saved without it)
        if shape is None or shape.rank() != 3 or not isinstance(shape[2], int):
            return result.fail("input is not [batch, seq, hidden] with a static hidden size", x)
        hidden = shape[2]
        s1, s2 = _const_ints(split), _const_ints(merge)
        if s1 is None or len(s1) != 4 or s1[:2] != [0, 0] or s1[2] * s1[3] != hidden:
            return result.fail(f"head split {s1} is not [0, 0, N, D] with N*D = {hidden}", split)
        if s2 is None or len(s2) != 3 or s2[:2] != [0, 0] or s2[2] not in (-1, hidden):
            return result.fail(f"head merge {s2} is not [0, 0, -1 | {hidden}]", merge)
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)  # ORT drops Identity at load


def _const_ints(value: ir.Value | None) -> list[int] | None:
    """Integers of an initializer or `Constant` output (what the exporter and the fusions emit)."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([*_RotateHalfRope.rule(with_steps=True).commute(),
                                   *_RotateHalfRope.rule(with_steps=False).commute()])


class RotaryFusionPass(GraphPass):
    """Per-token (MRoPE) rotate-half rotary -> com.microsoft.RotaryEmbedding over a per-token cache."""

    name = "rotary_fusion"
    config_type = RotaryFusionConfig
    scope = "rotary fusion"
    contrib_ops_note = " (RotaryEmbedding is an ORT extension); rotary left as standard ONNX"
    count_keys = ("rotary_embedding", "head_split_round_trip")

    def run(self, model, report: PassReport) -> None:
        rules = _rules()
        report.counts["rotary_embedding"] = rules.apply_to_model(model)
        report.skipped.extend(explain_failures(model, [("rotary_embedding", rules)]))
        round_trips = pattern.RewriteRuleSet([_HeadSplitRoundTrip.rule()])
        report.counts["head_split_round_trip"] = round_trips.apply_to_model(model)
        report.skipped.extend(explain_failures(model, [("head_split_round_trip", round_trips)]))
        if any(report.counts.values()):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            CommonSubexpressionEliminationPass()(model)  # one cache/position subgraph, not one per site
            RemoveUnusedNodesPass()(model)
        ops = Counter((n.domain, n.op_type) for n in model.graph)
        report.details["rotary_ops"] = ops[(MS_DOMAIN, "RotaryEmbedding")]
