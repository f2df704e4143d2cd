"""Decoder attention fusion: KV-cached GQA attention -> ORT `com.microsoft.GroupQueryAttention`.

Matches, per decoder layer, the exported form of transformers' eager GQA attention:

    present_k = Concat(past_k, k, axis=2)              present_v = Concat(past_v, v, axis=2)
    k_rep = Reshape(Expand(Unsqueeze(present_k, 2)))    v_rep = (same, repeat_kv)
    out = Reshape(Transpose(MatMul(Softmax(MatMul(q, Transpose(k_rep)) * scale + causal_bias), v_rep)))

and replaces it by one `GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_sequence_length)`
whose present outputs can share the past buffers (the runtime binds one preallocated
`[batch, kv_heads, context, head_dim]` buffer per layer as both, so the cache is written in place).
MRoPE and the q/k RMSNorms stay in front of the op: GQA's built-in rotary can express neither the
3-axis interleaved MRoPE nor the per-head norms (Qwen3-VL applies rotary after q_norm/k_norm).
`seqlens_k` / `total_sequence_length` are computed once in the graph from `attention_mask`, so the
graph's inputs do not change. GQA masks causally from `seqlens_k`, which equals the exported causal +
all-ones padding mask for batch-1 generation (the runtime's case); left padding is not supported.

For targets without ORT contrib ops (TensorRT) the pass skips with a reason and the graph stays
standard ONNX, which TensorRT's parser fuses itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import remove_unused_nodes
from onnxscript.rewriter import MatchResult, pattern

from qvl.passes.base import GraphPass, PassReport, Skip, scalar_const


@dataclass(frozen=True)
class AttentionFusionConfig:
    graphs: tuple[str, ...] = ("decoder",)


class _KVCachedGQA(pattern.RewriteRuleClassBase):
    def __init__(self, seqlens_k: ir.Value, total_len: ir.Value):
        super().__init__("KVCachedGQA", remove_nodes=True)
        self._seqlens_k = seqlens_k
        self._total_len = total_len

    def pattern(self, op, q, k, v, past_k, past_v, ax_k, ax_v, exp_k, exp_v, rep_k, rep_v, scale, bias, out_shape):
        present_k = op.Concat(past_k, k, axis=2)
        present_v = op.Concat(past_v, v, axis=2)
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(present_k, ax_k), exp_k), rep_k, _allow_other_attributes=True)
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(present_v, ax_v), exp_v), rep_v, _allow_other_attributes=True)
        scores = op.MatMul(q, op.Transpose(k_rep, perm=[0, 1, 3, 2]))
        scores = op.Add(op.Mul(scores, scale), bias)
        probs = op.Softmax(scores, axis=-1)
        attn = op.Transpose(op.MatMul(probs, v_rep), perm=[0, 2, 1, 3])
        return op.Reshape(attn, out_shape, _allow_other_attributes=True), present_k, present_v

    def check(self, context, q, k, v, past_k, past_v, ax_k, ax_v, scale, bias, **_) -> MatchResult:
        result = MatchResult()
        for name, ax in (("key", ax_k), ("value", ax_v)):
            if ax.const_value is None or ax.const_value.numpy().reshape(-1).tolist() != [2]:
                return result.fail(f"{name} head repeat is not Unsqueeze(axis=2) (not transformers' repeat_kv)", ax)
        if scalar_const(scale) is None:
            return result.fail("attention scale is not a constant scalar", scale)
        if past_k not in context.graph_or_function.inputs or past_v not in context.graph_or_function.inputs:
            return result.fail("past key/value are not graph inputs (not a KV-cached decoder step)", past_k)
        for name, val in (("query", q), ("key", k), ("value", v)):
            if val.shape is None or val.shape.rank() != 4:
                return result.fail(f"{name} rank unknown or not 4 ([batch, heads, seq, head_dim])", val)
        q_heads, kv_heads = q.shape[1], k.shape[1]
        if not isinstance(q_heads, int) or not isinstance(kv_heads, int) or q_heads % kv_heads:
            return result.fail("head counts are not static or not a GQA grouping", q)
        if bias.producer() is None or bias.producer().op_type != "Where":
            return result.fail("attention bias is not the graph's causal/padding mask", bias)
        return result

    def rewrite(self, op, q, k, v, past_k, past_v, scale, **_):
        q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]

        def to_bsh(x, heads):
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, heads * head_dim]))

        out, present_k, present_v = op.GroupQueryAttention(
            to_bsh(q, q_heads), to_bsh(k, kv_heads), to_bsh(v, kv_heads), past_k, past_v,
            self._seqlens_k, self._total_len,
            num_heads=q_heads, kv_num_heads=kv_heads, scale=scalar_const(scale),
            _domain="com.microsoft", _outputs=3,
        )
        return out, present_k, present_v


def _sequence_length_values(graph: ir.Graph) -> tuple[ir.Value, ir.Value] | None:
    """seqlens_k = sum(attention_mask) - 1 (int32 [batch]); total_sequence_length = mask width (int32 scalar)."""
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None:
        return None
    for node in graph:
        if node.op_type == "Cast" and node.name.startswith("qvl_gqa_"):
            seq, total = (n.outputs[0] for n in graph if n.name in ("qvl_gqa_seqlens_k", "qvl_gqa_total_len"))
            return seq, total
    tape = ir.tape.Tape(graph)
    one = tape.initializer(ir.tensor(np.array(1, dtype=np.int64), name="qvl_gqa.one"))
    axis1 = tape.initializer(ir.tensor(np.array([1], dtype=np.int64), name="qvl_gqa.axis1"))
    summed = tape.op("ReduceSum", [mask, axis1], attributes={"keepdims": 0})
    seqlens = tape.op("Cast", [tape.op("Sub", [summed, one])], attributes={"to": ir.DataType.INT32})
    width = tape.op("Gather", [tape.op("Shape", [mask]), tape.initializer(ir.tensor(np.array(1, dtype=np.int64), name="qvl_gqa.idx1"))], attributes={"axis": 0})
    total = tape.op("Cast", [width], attributes={"to": ir.DataType.INT32})
    tape.nodes[-4].name = "qvl_gqa_seqlens_k"  # the Cast producing seqlens
    tape.nodes[-1].name = "qvl_gqa_total_len"
    graph.extend(tape.nodes)
    graph.sort()
    return seqlens, total


class AttentionFusionPass(GraphPass):
    """Fuse every decoder layer's KV-cached attention into GroupQueryAttention (ORT targets)."""

    name = "attention_fusion"
    config_type = AttentionFusionConfig
    scope = "decoder attention fusion"
    contrib_ops_note = "; TensorRT fuses standard attention itself"
    count_keys = ("group_query_attention",)

    def run(self, model, report: PassReport) -> None:
        graph_name = self.graph
        graph = model.graph
        existing = sum(1 for n in graph if n.op_type == "GroupQueryAttention")
        softmaxes = [n for n in graph if n.op_type == "Softmax"]
        if not softmaxes:
            report.counts["already_fused"] = existing
            return
        values = _sequence_length_values(graph)
        if values is None:
            report.skipped.append(Skip(graph_name, "no attention_mask input to derive seqlens_k from"))
            return
        rules = pattern.RewriteRuleSet([_KVCachedGQA.rule(*values)])
        count = rules.apply_to_model(model)
        report.counts["group_query_attention"] = count
        # Explain every attention that did not fuse (the Softmax is its anchor).
        for node in graph:
            if node.op_type == "Softmax":
                report.skipped.append(Skip(node.name, "attention subgraph did not match the KV-cached GQA pattern"))
        remove_unused_nodes(model)
        graph.sort()  # the new seqlens nodes must precede the GQA nodes that read them
        if count:
            model.opset_imports.setdefault("com.microsoft", 1)
