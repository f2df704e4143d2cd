"""Export adapters: thin `nn.Module`s around transformers' Qwen3-VL modules with graph-friendly I/O.

They reuse every weight-bearing submodule of the Hugging Face model unchanged and only re-state the
control flow that the ONNX exporters cannot take as written:

* Vision attention: transformers splits the packed patch sequence with
  `torch.split(x, cu_seqlens.diff().tolist())` (data-dependent; the dynamo exporter fails on it and the
  legacy exporter bakes one image grid into the graph). Here it is one masked attention over all patches
  with a block-diagonal mask built from per-patch `segment_ids`, so any number and size of images works.
* Vision helper tables (rotary cos/sin, bilinear position-embedding taps, segment ids) depend only on
  `image_grid_thw`; they are graph *inputs* computed on the host by `qvl.runtime.vision_tables`.
* Decoder: `DynamicCache` objects are replaced by explicit past/present key/value tensors, the causal +
  padding mask is built in the graph from `attention_mask`, DeepStack features come in as a dense
  `[num_deepstack, batch, seq, hidden]` tensor (zeros at non-visual positions, so adding it is exact),
  and only the last position's logits are produced (a full-vocabulary projection of every prompt
  position is never needed for generation and costs 311 M MACs per token at 2B size).
* The tied lm_head is `hidden @ embed_tokens.weight^T` on the one embedding matrix (no second copy).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision


class VisionEncoderAdapter(nn.Module):
    """pixel patches + host tables -> merged image embeddings and DeepStack features."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.deepstack_indexes = list(cfg.deepstack_visual_indexes)

    def forward(self, pixel_values, pos_interp_indices, pos_interp_weights, rotary_cos, rotary_sin, segment_ids):
        v = self.visual
        hidden = v.patch_embed(pixel_values)
        pos = (v.pos_embed(pos_interp_indices) * pos_interp_weights[:, :, None]).sum(1)
        hidden = hidden + pos.to(hidden.dtype)
        n = hidden.shape[0]
        same_image = segment_ids[:, None] == segment_ids[None, :]
        bias = torch.zeros((n, n), dtype=hidden.dtype).masked_fill(~same_image, torch.finfo(hidden.dtype).min)
        deepstack = []
        for idx, blk in enumerate(v.blocks):
            x = blk.norm1(hidden)
            q, k, val = blk.attn.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, rotary_cos, rotary_sin)
            q, k, val = (t.transpose(0, 1) for t in (q, k, val))  # [heads, n, d]
            scores = torch.matmul(q, k.transpose(1, 2)) * blk.attn.scaling + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, val).transpose(0, 1).reshape(n, -1)
            hidden = hidden + blk.attn.proj(attn)
            hidden = hidden + blk.mlp(blk.norm2(hidden))
            if idx in self.deepstack_indexes:
                deepstack.append(v.deepstack_merger_list[self.deepstack_indexes.index(idx)](hidden))
        return (v.merger(hidden), *deepstack)


class DecoderAdapter(nn.Module):
    """One KV-cached step (prefill, chunked prefill or decode) of the Qwen3-VL text decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.model.language_model
        cfg = self.lm.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.groups = self.num_heads // self.num_kv_heads

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds, *past_key_values):
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
        last = lm.norm(hidden[:, -1:, :])
        logits = torch.matmul(last, lm.embed_tokens.weight.t())
        return (logits, *presents)
