"""Export adapters: thin `nn.Module`s around transformers' Qwen3-VL modules with graph-friendly I/O.

They reuse every weight-bearing submodule of the Hugging Face model unchanged and only re-state the
control flow that the ONNX exporters cannot take as written:

* Vision attention: transformers splits the packed patch sequence with
  `torch.split(x, cu_seqlens.diff().tolist())` and attends within each piece (one image, or one frame
  of a video); that split is data-dependent (the dynamo exporter fails on it). Here the vision graph is
  exported for ONE attention segment: every patch attends to every patch, no mask at all, and the
  runtime calls it once per segment (`qvl.runtime.vision_tables.encode_per_segment`). That is exactly the
  packed result, because nothing else in the tower mixes patches: the patch embedder is a Conv3d with
  stride = kernel (one patch in, one row out; a patch row already holds both frames of temporal patch
  2), the position embedding, rotary tables, norms and MLPs are per row, and the 2x2 merger and the
  DeepStack mergers group 4 consecutive rows, which never straddle a segment (h and w are multiples of
  the merge size). Attention without a mask lets ONNX Runtime's CPU MultiHeadAttention take its flash
  kernel (memory linear in the patch count, not quadratic).
  `VisionEncoderAdapter(visual, packed=True)` keeps the previous form reachable (one call for all
  images, a block-diagonal mask built in the graph from per-patch `segment_ids`): artifacts exported
  that way still load and run, and the tests compare the two forms.
* Vision helper tables (rotary cos/sin, bilinear position-embedding taps[, segment ids]) depend only on
  `image_grid_thw`; they are graph *inputs* computed on the host by `qvl.runtime.vision_tables`.
* Decoder: `DynamicCache` objects are replaced by explicit past/present key/value tensors, the causal +
  padding mask is built in the graph from `attention_mask`, DeepStack features come in as a dense
  `[num_deepstack, batch, seq, hidden]` tensor (zeros at non-visual positions, so adding it is exact),
  and logits are produced only for the positions `logit_positions` names (indices into this step's
  positions: the runtime asks for the last one on an ordinary step, for all of a speculative verify step's
  positions there; a full-vocabulary projection of every prompt position is never needed for generation and
  costs 311 M MACs per token at 2B size). The positions are gathered before the final norm.
* The lm_head is `hidden @ W^T`: for a tied checkpoint W is the one embedding matrix (transformers'
  `lm_head.weight` is that same Parameter; no second copy), for an untied one its own `lm_head.weight`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision


class VisionEncoderAdapter(nn.Module):
    """pixel patches + host tables -> merged image embeddings and DeepStack features.

    Default: one attention segment per call (an image, or one frame of a video), no mask.
    `packed=True`: the previous form, all segments in one call with a block-diagonal mask from `segment_ids`.
    """

    def __init__(self, visual: nn.Module, packed: bool = False):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.deepstack_indexes = list(cfg.deepstack_visual_indexes)
        self.packed = packed

    def forward(self, pixel_values, pos_interp_indices, pos_interp_weights, rotary_cos, rotary_sin, segment_ids=None):
        v = self.visual
        hidden = v.patch_embed(pixel_values)
        pos = (v.pos_embed(pos_interp_indices) * pos_interp_weights[:, :, None]).sum(1)
        hidden = hidden + pos.to(hidden.dtype)
        n = hidden.shape[0]
        bias = None
        if self.packed:
            same_image = segment_ids[:, None] == segment_ids[None, :]
            bias = torch.zeros((n, n), dtype=hidden.dtype).masked_fill(~same_image, torch.finfo(hidden.dtype).min)
        deepstack = []
        for idx, blk in enumerate(v.blocks):
            x = blk.norm1(hidden)
            q, k, val = blk.attn.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, rotary_cos, rotary_sin)
            q, k, val = (t.transpose(0, 1) for t in (q, k, val))  # [heads, n, d]
            scores = torch.matmul(q, k.transpose(1, 2)) * blk.attn.scaling
            if bias is not None:
                scores = scores + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, val).transpose(0, 1).reshape(n, -1)
            hidden = hidden + blk.attn.proj(attn)
            hidden = hidden + blk.mlp(blk.norm2(hidden))
            if idx in self.deepstack_indexes:
                deepstack.append(v.deepstack_merger_list[self.deepstack_indexes.index(idx)](hidden))
        return (v.merger(hidden), *deepstack)


class DecoderAdapter(nn.Module):
    """One KV-cached step (prefill, chunked prefill or decode) of the Qwen3-VL text decoder.

    `logit_positions=False`: the previous form (no such input, the last position's logits only), which artifacts
    exported before it still have; kept reachable for the compatibility tests."""

    def __init__(self, model: nn.Module, logit_positions: bool = True):
        super().__init__()
        self.logit_positions = logit_positions
        self.lm = model.model.language_model
        # tied: lm_head.weight is the Parameter lm.embed_tokens.weight, read through that one module path
        self.lm_head = None if model.lm_head.weight is self.lm.embed_tokens.weight else model.lm_head
        cfg = self.lm.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.groups = self.num_heads // self.num_kv_heads

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds, *past_and_positions):
        """`past_and_positions`: the 2 * num_layers past key/value tensors, then `logit_positions` [P] (int64
        indices in [0, S) into this step's S positions) -> logits [B, P, V]."""
        if self.logit_positions:
            *past_key_values, logit_positions = past_and_positions
        else:
            past_key_values, logit_positions = past_and_positions, None
        lm = self.lm
        bsz, seq, _ = inputs_embeds.shape
        past_len = past_key_values[0].shape[2]
        total = past_len + seq
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids)

        q_pos = torch.arange(seq, device=inputs_embeds.device) + past_len
        k_pos = torch.arange(total, device=inputs_embeds.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype).masked_fill(
            ~allowed, torch.finfo(inputs_embeds.dtype).min
        )

        hidden = inputs_embeds
        presents = []
        for i, layer in enumerate(lm.layers):
            attn_mod = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn_mod.q_norm(attn_mod.q_proj(x).view(bsz, seq, -1, self.head_dim)).transpose(1, 2)
            k = attn_mod.k_norm(attn_mod.k_proj(x).view(bsz, seq, -1, self.head_dim)).transpose(1, 2)
            v = attn_mod.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past_key_values[2 * i], k], dim=2)
            v = torch.cat([past_key_values[2 * i + 1], v], dim=2)
            presents += [k, v]
            # GQA: each KV head serves `groups` query heads (transformers' repeat_kv).
            k_rep = k[:, :, None].expand(bsz, self.num_kv_heads, self.groups, total, self.head_dim).reshape(
                bsz, self.num_heads, total, self.head_dim
            )
            v_rep = v[:, :, None].expand(bsz, self.num_kv_heads, self.groups, total, self.head_dim).reshape(
                bsz, self.num_heads, total, self.head_dim
            )
            scores = torch.matmul(q, k_rep.transpose(2, 3)) * attn_mod.scaling + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, v_rep).transpose(1, 2).reshape(bsz, seq, -1)
            hidden = hidden + attn_mod.o_proj(attn)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if i < deepstack_embeds.shape[0]:
                hidden = hidden + deepstack_embeds[i]
        picked = hidden[:, -1:, :] if logit_positions is None else torch.index_select(hidden, 1, logit_positions)
        picked = lm.norm(picked)
        head = lm.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.matmul(picked, head.t())
        return (logits, *presents)
