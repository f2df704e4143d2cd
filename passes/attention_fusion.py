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

Targets choose the rewritten form by their capability table's `kv_cache`:

* `gqa-shared` (ORT CPU; ORT CUDA in fp16): the GroupQueryAttention above.
* `tensor-scatter` (ORT CUDA in fp32, i.e. Pascal: GQA's CUDA kernel is fp16/bf16 only): standard ONNX
  `present = TensorScatter(past, new, write_indices, axis=2)` (opset 24) on a fixed-capacity
  `[batch, kv_heads, capacity, head_dim]` buffer, bound as both past and present so the write is in place,
  then `Attention(q, present_k, present_v, mask)` (opset 23, GQA through its head counts) under a boolean
  causal mask over the whole capacity. The graph's `attention_mask` is then `[batch, capacity]`: ones for the
  positions held after this step (cache + new tokens), zeros for the free tail; `write_indices` (= positions
  already cached) and the mask are computed once in the graph from it, so every decode step has the same
  input shapes (what CUDA graph replay needs) and nothing is computed on the host. The model's opset is
  raised to 24 with onnxscript's version converter first.
* `concat` (TensorRT, no contrib ops): the pass skips with a reason and the graph stays standard ONNX,
  which TensorRT's parser fuses itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript import version_converter
from onnxscript.optimizer import remove_unused_nodes
from onnxscript.rewriter import MatchResult, pattern

from qvl.passes.base import GraphPass, PassReport, Skip, scalar_const


@dataclass(frozen=True)
class AttentionFusionConfig:
    graphs: tuple[str, ...] = ("decoder",)


SCATTER_OPSET = 24  # TensorScatter; Attention is opset 23


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


class _KVCachedScatterAttention(_KVCachedGQA):
    """The same match, rewritten to standard ONNX: TensorScatter into the fixed-capacity cache + Attention."""

    def __init__(self, write_indices: ir.Value, mask: ir.Value):
        pattern.RewriteRuleClassBase.__init__(self, "KVCachedScatterAttention", remove_nodes=True)
        self._write_indices = write_indices
        self._mask = mask

    def rewrite(self, op, q, k, v, past_k, past_v, scale, out_shape, **_):
        present_k = op.TensorScatter(past_k, k, self._write_indices, axis=2)
        present_v = op.TensorScatter(past_v, v, self._write_indices, axis=2)
        attn = op.Attention(q, present_k, present_v, self._mask, scale=scalar_const(scale))
        out = op.Reshape(op.Transpose(attn, perm=[0, 2, 1, 3]), out_shape)
        return out, present_k, present_v


def _scatter_values(graph: ir.Graph) -> tuple[ir.Value, ir.Value] | None:
    """write_indices = sum(attention_mask) - S (int64 [batch]: positions already cached) and the boolean mask
    [batch, 1, S, capacity]: key j is visible to new token i iff j <= write_index + i and attention_mask[j]."""
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    embeds = next((v for v in graph.inputs if v.name == "inputs_embeds"), None)
    if mask is None or embeds is None:
        return None
    named = {n.name: n for n in graph if n.name.startswith("qvl_scatter_")}
    if "qvl_scatter_write_indices" in named:
        return named["qvl_scatter_write_indices"].outputs[0], named["qvl_scatter_mask"].outputs[0]
    tape = ir.tape.Tape(graph)

    def const(name, value):
        return tape.initializer(ir.tensor(np.array(value, dtype=np.int64), name=f"qvl_scatter.{name}"))

    zero, one, axis1 = const("zero", 0), const("one", 1), const("axis1", [1])
    # S twice: as a host scalar for Range (whose bounds ORT reads on the host anyway), and as a device scalar
    # (a reduction over ones of shape [S]) for the arithmetic on the device-resident mask: a host scalar there
    # would need a host->device copy node, and ORT refuses CUDA graph capture for graphs with copy nodes.
    seq_shape = tape.op("Shape", [embeds], attributes={"start": 1, "end": 2})
    seq = tape.op("Squeeze", [seq_shape])  # S (host scalar)
    ones = tape.op("ConstantOfShape", [seq_shape], attributes={"value": ir.tensor(np.array([1], dtype=np.int64))})
    seq_dev = tape.op("ReduceSum", [ones], attributes={"keepdims": 0})
    capacity = tape.op("Squeeze", [tape.op("Shape", [mask], attributes={"start": 1, "end": 2})])
    held = tape.op("ReduceSum", [mask, axis1], attributes={"keepdims": 0})  # [B]: cache + new tokens
    write = tape.op("Sub", [held, seq_dev])
    write_node = tape.nodes[-1]
    query_pos = tape.op("Add", [tape.op("Unsqueeze", [write, axis1]), tape.op("Range", [zero, seq, one])])  # [B, S]
    key_pos = tape.op("Range", [zero, capacity, one])  # [capacity]
    causal = tape.op("LessOrEqual", [key_pos, tape.op("Unsqueeze", [query_pos, const("axis2", [2])])])  # [B,S,cap]
    present = tape.op("Cast", [tape.op("Unsqueeze", [mask, axis1])], attributes={"to": ir.DataType.BOOL})  # [B,1,cap]
    visible = tape.op("Unsqueeze", [tape.op("And", [causal, present]), axis1])  # [B, 1, S, capacity]
    write_node.name, tape.nodes[-1].name = "qvl_scatter_write_indices", "qvl_scatter_mask"
    graph.extend(tape.nodes)
    graph.sort()
    return write, visible


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
    count_keys = ("group_query_attention", "scatter_attention")

    def applies_to(self, target, graph: str) -> str | None:
        reason = super().applies_to(target, graph)
        if reason is None and target.kv_cache not in ("gqa-shared", "tensor-scatter"):
            reason = f"target {target.name} keeps the {target.kv_cache} KV cache form"
        return reason

    def run(self, model, report: PassReport) -> None:
        graph_name = self.graph
        graph = model.graph
        existing = sum(1 for n in graph if n.op_type in ("GroupQueryAttention", "Attention"))
        softmaxes = [n for n in graph if n.op_type == "Softmax"]
        if not softmaxes:
            report.counts["already_fused"] = existing
            return
        scatter = self.target.kv_cache == "tensor-scatter"
        if scatter:
            if model.opset_imports.get("", 0) < SCATTER_OPSET:
                version_converter.convert_version(model, SCATTER_OPSET)
            values = _scatter_values(graph)
        else:
            values = _sequence_length_values(graph)
        if values is None:
            report.skipped.append(Skip(graph_name, "no attention_mask (and inputs_embeds) input to derive the "
                                                   "cache positions from"))
            return
        rule = (_KVCachedScatterAttention if scatter else _KVCachedGQA).rule(*values)
        count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
        report.counts["scatter_attention" if scatter else "group_query_attention"] = count
        # Explain every attention that did not fuse (the Softmax is its anchor).
        for node in graph:
            if node.op_type == "Softmax":
                report.skipped.append(Skip(node.name, "attention subgraph did not match the KV-cached GQA pattern"))
        remove_unused_nodes(model)
        graph.sort()  # the new seqlens nodes must precede the GQA nodes that read them
        if count and not scatter:
            model.opset_imports.setdefault("com.microsoft", 1)
