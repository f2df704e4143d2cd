"""Host-side multimodal RoPE (MRoPE) for the Qwen3-VL text decoder, in numpy.

Ports of `Qwen3VLModel.get_rope_index` / `Qwen3VLModel.get_vision_position_ids`, of the decode-time
position rule used by `generate` (`compute_3d_position_ids` and `_update_model_kwargs_for_generation`)
and of `Qwen3VLTextRotaryEmbedding.forward` (inv_freq, cos/sin with the interleaved T/H/W layout).

Position ids are int64 `[3, B, L]` (rows: temporal, height, width), exactly as transformers returns them.
The decoder graph can take either these ids or the `[B, L, head_dim]` cos/sin tables computed here.

Exactness notes:
* Integer outputs are identical to transformers'.
* `freqs = float32(pos) * inv_freq` is one IEEE float32 multiply, so it is bit-identical to torch given
  the same `inv_freq`. cos/sin are evaluated in float64 and rounded once to float32 (correctly rounded,
  platform independent); torch's CPU kernels (SLEEF, 1 ULP) differ from that by at most 1 ULP (<= 6e-8).
* `text_inv_freq` is correctly rounded, but torch computes `theta ** x` with SLEEF `powf` (1 ULP) on
  AVX2/AVX512 CPUs (and with std::pow, matching ours, under ATEN_CPU_CAPABILITY=default), so for some
  configs one element differs by 1 ULP (the published 2B config: element 19). Because `freqs` grows with
  the position, that becomes ~1 ULP of `freqs` (cos/sin off by up to 7.6e-6 by position 6000). For exact
  tables, pass the `inv_freq` that torch computed at export time (the model's `rotary_emb.inv_freq`
  buffer, saved with the artifact) instead of `text_inv_freq(...)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2

# Qwen3-VL special token ids (the published tokenizer; the tiny checkpoints keep them).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


def mm_token_type_ids(
    input_ids: np.ndarray | Sequence[int],
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> np.ndarray:
    """`ProcessorMixin.create_mm_token_type_ids`: 1 at image pads, 2 at video pads, 0 elsewhere (int64, same shape)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    out = np.zeros_like(ids)
    out[ids == image_token_id] = IMAGE
    out[ids == video_token_id] = VIDEO
    return out


_default_mm_token_type_ids = mm_token_type_ids


def get_vision_position_ids(
    start_position: int,
    grid_thw: Sequence[int] | np.ndarray,
    temp_merge_size: int = 1,
    spatial_merge_size: int = 1,
    time_interval: float = 1.0,
) -> np.ndarray:
    """`Qwen3VLModel.get_vision_position_ids`: int64 `[3, t*h*w]` (merged grid) positions offset by `start_position`."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    llm_t, llm_h, llm_w = t // temp_merge_size, h // spatial_merge_size, w // spatial_merge_size
    # torch: (arange(t) * time_interval).long() -- float multiply, then truncation toward zero.
    pos_t = np.trunc(np.arange(llm_t, dtype=np.int64) * time_interval).astype(np.int64)
    pos_h = np.arange(llm_h, dtype=np.int64) + start_position
    pos_w = np.arange(llm_w, dtype=np.int64) + start_position
    tg, hg, wg = np.meshgrid(pos_t, pos_h, pos_w, indexing="ij")
    out = np.stack([tg, hg, wg], axis=0).reshape(3, -1)
    out[0] += start_position
    return out


def get_rope_index(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """`Qwen3VLModel.get_rope_index`, batched: returns (position_ids int64 `[3, B, L]`, rope_deltas int64 `[B, 1]`).

    `input_ids`/`mm_token_type_ids`/`attention_mask` are `[B, L]` (a 1-D `[L]` is treated as B=1).
    Grids are consumed in order across the whole batch, per modality, like transformers' iterators.
    Masked-out (padding) positions get position 0.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    types = np.asarray(mm_token_type_ids, dtype=np.int64)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if types.ndim == 1:
        types = types[None]
    if types.shape != input_ids.shape:
        raise ValueError(f"mm_token_type_ids shape {types.shape} != input_ids shape {input_ids.shape}")
    mask = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")

    # Videos: transformers splits every video into t single-frame grids (timestamps separate frames).
    if video_grid_thw is not None:
        video_grid_thw = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
        video_grid_thw = np.repeat(video_grid_thw, video_grid_thw[:, 0], axis=0)
        video_grid_thw[:, 0] = 1
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)) if image_grid_thw is not None else None,
        VIDEO: iter(video_grid_thw) if video_grid_thw is not None else None,
    }

    batch, length = input_ids.shape
    position_ids = np.zeros((3, batch, length), dtype=np.int64)
    deltas = []
    for b in range(batch):
        row_types = types[b] if mask is None else types[b][mask[b]]
        n_tokens = len(row_types)
        pieces = []
        current = 0
        for key, group in itertools.groupby(enumerate(row_types.tolist()), lambda x: x[1]):
            group = list(group)
            start, end = group[0][0], group[-1][0] + 1
            if key == TEXT:
                n = end - start
                pieces.append(np.broadcast_to(np.arange(n, dtype=np.int64) + current, (3, n)))
                current += n
            else:
                it = grids.get(key)
                if it is None:
                    raise ValueError(f"mm_token_type_ids has modality {key} but no grid was given for it")
                try:
                    grid = next(it)
                except StopIteration:
                    raise ValueError(f"more modality-{key} token groups than grids") from None
                vision = get_vision_position_ids(current, grid, 1, spatial_merge_size)
                if vision.shape[1] != end - start:
                    # transformers does not check this; a wrong grid order would silently shift positions
                    raise ValueError(
                        f"a run of {end - start} modality-{key} tokens does not match grid {grid.tolist()} "
                        f"({vision.shape[1]} tokens after {spatial_merge_size}x{spatial_merge_size} merge)"
                    )
                pieces.append(vision)
                current += int(max(grid[1], grid[2])) // spatial_merge_size
        llm_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
        if llm_positions.shape[1] != n_tokens:
            raise ValueError(
                f"vision token groups do not match the grids: {llm_positions.shape[1]} positions for {n_tokens} tokens"
            )
        if mask is None:
            position_ids[:, b] = llm_positions
        else:
            position_ids[:, b, mask[b]] = llm_positions
        deltas.append(int(llm_positions.max()) + 1 - n_tokens if n_tokens else 0)
    return position_ids, np.asarray(deltas, dtype=np.int64).reshape(batch, 1)


def rope_index(
    input_ids: np.ndarray | Sequence[int],
    mm_token_type_ids: np.ndarray | Sequence[int] | None = None,
    image_grid_thw: np.ndarray | None = None,
    spatial_merge_size: int = 2,
    video_grid_thw: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Batch-1 convenience: `[L]` ids -> (position_ids int64 `[3, 1, L]`, rope_delta int).

    `mm_token_type_ids` defaults to `mm_token_type_ids(input_ids)` (image/video pad ids of Qwen3-VL).
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    if mm_token_type_ids is None:
        types = _default_mm_token_type_ids(ids)
    else:
        types = np.asarray(mm_token_type_ids, dtype=np.int64).reshape(1, -1)
    pos, deltas = get_rope_index(ids, types, image_grid_thw, video_grid_thw, None, spatial_merge_size)
    return pos, int(deltas[0, 0])


def decode_position_ids(start: int, length: int, rope_delta: int | np.ndarray) -> np.ndarray:
    """Positions of `length` new tokens after `start` cached ones: int64 `[3, B, length]`.

    `compute_3d_position_ids` with a cache: `arange(start, start + length) + rope_delta` on all three axes.
    `rope_delta` is an int (B=1) or an array `[B]`/`[B, 1]`. During `generate` with a text-final prompt
    this equals the position generate itself feeds (the prompt's last position + 1 + k, per axis).
    """
    base = np.arange(start, start + length, dtype=np.int64)
    delta = np.asarray(rope_delta, dtype=np.int64).reshape(-1, 1)  # [B, 1]
    return np.broadcast_to((base[None, :] + delta)[None], (3, delta.shape[0], length)).copy()


def next_position_ids(position_ids: np.ndarray, num_new_tokens: int = 1) -> np.ndarray:
    """`generate`'s own update (`_update_model_kwargs_for_generation`): last position per axis + 1 + arange.

    Takes the positions fed so far (`[..., L]`, e.g. the prompt's `[3, B, L]`) and returns only the new
    ones `[..., num_new_tokens]`. Identical to `decode_position_ids` unless the prompt ends on a vision token.
    """
    position_ids = np.asarray(position_ids, dtype=np.int64)
    return position_ids[..., -1:] + 1 + np.arange(num_new_tokens, dtype=np.int64)


def text_inv_freq(head_dim: int, rope_theta: float) -> np.ndarray:
    """`1 / theta ** (arange(0, dim, 2) / dim)` in float32 (see the module note: may be 1 ULP off torch's)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # float32 like torch
    powed = np.power(np.float64(rope_theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / powed).astype(np.float32)


def _cos_sin_f32(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f64 = freqs.astype(np.float64)
    return np.cos(f64).astype(np.float32), np.sin(f64).astype(np.float32)


def _recompose(freq: np.ndarray, mrope_section: Sequence[int], interleaved: bool) -> np.ndarray:
    """[3, B, L, D/2] -> [B, L, D]: pick T/H/W per frequency slot, then duplicate (rotate_half layout)."""
    if interleaved:
        # Qwen3VLTextRotaryEmbedding.recomposition_frequencies: T everywhere, then H at 1::3 and W at 2::3
        # up to 3 * section.
        out = freq[0].copy()
        for dim, offset in ((1, 1), (2, 2)):
            idx = slice(offset, mrope_section[dim] * 3, 3)
            out[..., idx] = freq[dim, ..., idx]
    else:
        # Qwen2-VL chunked layout: contiguous sections [T | H | W].
        bounds = np.cumsum([0, *mrope_section])
        out = np.concatenate([freq[i, ..., bounds[i] : bounds[i + 1]] for i in range(3)], axis=-1)
    return np.concatenate([out, out], axis=-1)


def mrope_cos_sin(
    position_ids: np.ndarray,
    inv_freq: np.ndarray,
    mrope_section: Sequence[int],
    interleaved: bool = True,
    attention_scaling: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`Qwen3VLTextRotaryEmbedding.forward`: position_ids `[3, B, L]` -> cos, sin float32 `[B, L, head_dim]`.

    A `[B, L]` input is broadcast to the three axes (text-only positions). `inv_freq` should be the torch
    buffer saved at export time for exact tables (see the module note). transformers casts cos/sin to the
    activation dtype afterwards (bf16/fp16 models); cast the result yourself for such a graph.
    """
    pos = np.asarray(position_ids, dtype=np.int64)
    if pos.ndim == 2:
        pos = np.broadcast_to(pos[None], (3, *pos.shape))
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, L], got {pos.shape}")
    inv = np.asarray(inv_freq, dtype=np.float32)
    if sum(mrope_section) != inv.shape[0]:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {inv.shape[0]}")
    freqs = pos[..., None].astype(np.float32) * inv  # [3, B, L, D/2], float32 multiply like torch
    cos, sin = _cos_sin_f32(freqs)
    if attention_scaling != 1.0:
        cos = (cos * np.float32(attention_scaling)).astype(np.float32)
        sin = (sin * np.float32(attention_scaling)).astype(np.float32)
    return _recompose(cos, mrope_section, interleaved), _recompose(sin, mrope_section, interleaved)


def text_rope_parameters(text_config: dict) -> tuple[int, float, list[int], bool]:
    """(head_dim, rope_theta, mrope_section, interleaved) from a Qwen3-VL `text_config` dict (config.json)."""
    rope = dict(text_config.get("rope_parameters") or text_config.get("rope_scaling") or {})
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]
    theta = rope.get("rope_theta", text_config.get("rope_theta", 10000.0))
    section = list(rope.get("mrope_section", [24, 20, 20]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"only the default rope_type is supported, got {rope_type!r}")
    # Qwen3VLTextRotaryEmbedding always uses the interleaved layout; transformers ignores `mrope_interleaved`.
    return int(head_dim), float(theta), section, True
