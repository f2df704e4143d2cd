"""Host-side tables for the Qwen3-VL vision tower, in numpy.

Ports of the `transformers.vision_utils` helpers that `Qwen3VLVisionModel.forward` runs before its
blocks (they are data-dependent, so the exported graph takes their results as inputs):

* `vision_position_ids`      <- `get_vision_position_ids(grid_thw, spatial_merge_size)`   int64 `[N, 2]`
* `vision_rotary_cos_sin`    <- `Qwen3VLVisionRotaryEmbedding.forward`                    float32 `[N, head_dim]` x2
* `vision_interpolation_indices_and_weights`
      <- `get_vision_interpolation_indices_and_weights(..., "bilinear", align_corners=True, spatial_merge_size)`
                                                                      int64 `[N, 4]`, float32 `[N, 4]`
* `vision_cu_seqlens`        <- `get_vision_cu_seqlens(grid_thw)`                          int32 `[S + 1]`
* `vision_segment_ids`       attention segment of every patch (int64 `[N]`): the segment between
                             `cu_seqlens[s]` and `cu_seqlens[s+1]`, i.e. one per image and one per video
                             frame (transformers attends per frame, not per video). The previous
                             (packed) vision graph builds its block-diagonal mask from it.
* `vision_segments` / `encode_per_segment`: the vision graph is run once per attention segment, with that
                             segment's tables; the outputs concatenate to the packed result (see
                             `toolchain/export/adapters.py` for why that is exact).

N is the number of patches, `sum(t * h * w)`, in spatial-merge-block order (what the patch embedder gets).
All float math is done in float32 with the same operation order as torch, so the interpolation weights
are bit-identical; cos/sin are evaluated in float64 and rounded once (<= 1 ULP from torch's SLEEF kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qvl.errors import QvlError


def _grid(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {g.tolist()}")
    return g


def vision_position_ids(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """Block-major (h, w) rotary positions of every patch: int64 `[N, 2]` (h/w repeated for each of the t frames)."""
    m = int(spatial_merge_size)
    out = []
    for t, h, w in _grid(grid_thw).tolist():
        if h % m or w % m:
            raise ValueError(f"grid h={h}, w={w} is not divisible by spatial_merge_size={m}")
        hpos, wpos = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def vision_inv_freq(head_dim: int, rope_theta: float = 10000.0) -> np.ndarray:
    """`Qwen3VLVisionRotaryEmbedding.compute_axial_rope_parameters`: float32 `[head_dim // 4]`."""
    spatial_dim = head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    powed = np.power(np.float64(rope_theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / powed).astype(np.float32)


def vision_rotary_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`Qwen3VLVisionRotaryEmbedding.forward`: `[N, 2]` positions -> cos, sin float32 `[N, 4 * len(inv_freq)]`.

    Layout per row: [h-freqs | w-freqs | h-freqs | w-freqs] (the rotate_half duplicate).
    """
    pos = np.asarray(position_ids, dtype=np.int64)
    freqs = pos[..., None].astype(np.float32) * np.asarray(inv_freq, dtype=np.float32)  # [N, 2, D/4]
    f64 = freqs.astype(np.float64)
    cos, sin = np.cos(f64).astype(np.float32), np.sin(f64).astype(np.float32)

    def recompose(f):
        hw = np.concatenate([f[:, 0], f[:, 1]], axis=-1)
        return np.concatenate([hw, hw], axis=-1)

    return recompose(cos), recompose(sin)


def _axis_taps_weights(index: np.ndarray, size: np.ndarray, side: int, align_corners: bool):
    """Bilinear 2-tap version of `vision_utils._interpolation_axis_taps_weights` (padding='border'), float32 math."""
    idx = index.astype(np.float32)
    if align_corners:
        denom = np.maximum(size - 1, 1).astype(np.float32)
        src = (idx * np.float32(side - 1)) / denom
    else:
        src = (idx + np.float32(0.5)) * np.float32(side) / size.astype(np.float32) - np.float32(0.5)
    src = src.astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(0, 2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs((src[:, None] - floor[:, None]) - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1.0) - distance, np.float32(0.0)).astype(np.float32)
    return taps, weights


def vision_interpolation_indices_and_weights(
    grid_thw, num_grid_per_side: int, spatial_merge_size: int = 2, align_corners: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of the learned `side x side` position table to each grid.

    Returns gather indices int64 `[N, 4]` into the flattened table and weights float32 `[N, 4]`;
    `pos_embed = (table[indices] * weights[..., None]).sum(1)`. Patches are in spatial-merge-block order.
    """
    g = _grid(grid_thw)
    side = int(num_grid_per_side)
    m = int(spatial_merge_size)
    counts = g[:, 0] * g[:, 1] * g[:, 2]
    heights = np.repeat(g[:, 1], counts)
    widths = np.repeat(g[:, 2], counts)
    starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    within = (np.arange(int(counts.sum()), dtype=np.int64) - starts) % (heights * widths)
    blocks_w = widths // m
    in_col = within % m
    in_row = (within // m) % m
    block_col = (within // (m * m)) % blocks_w
    block_row = within // (m * m * blocks_w)
    row = block_row * m + in_row
    col = block_col * m + in_col
    h_taps, h_w = _axis_taps_weights(row, heights, side, align_corners)
    w_taps, w_w = _axis_taps_weights(col, widths, side, align_corners)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    return indices, weights


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    """`get_vision_cu_seqlens` (merge_temporal=False): int32 `[S + 1]`, one segment of h*w patches per frame."""
    g = _grid(grid_thw)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def vision_segment_ids(grid_thw) -> np.ndarray:
    """Attention segment (image, or video frame) of every patch: int64 `[N]`, consistent with `vision_cu_seqlens`."""
    g = _grid(grid_thw)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.repeat(np.arange(len(seqlens), dtype=np.int64), seqlens)


def vision_image_ids(grid_thw) -> np.ndarray:
    """Index of the image/video (row of `grid_thw`) every patch belongs to: int64 `[N]`."""
    g = _grid(grid_thw)
    return np.repeat(np.arange(len(g), dtype=np.int64), g[:, 0] * g[:, 1] * g[:, 2])


def block_diagonal_mask(segment_ids: np.ndarray) -> np.ndarray:
    """bool `[N, N]`: True where query and key patch share a segment (what the graph should compute)."""
    s = np.asarray(segment_ids)
    return s[:, None] == s[None, :]


def vision_head_dim(vision_config: Mapping) -> int:
    return int(vision_config.get("head_dim") or vision_config["hidden_size"] // vision_config["num_heads"])


def vision_tables(grid_thw, vision_config: Mapping) -> dict[str, np.ndarray]:
    """Everything the vision graph needs for `grid_thw`, from a Qwen3-VL `vision_config` dict (config.json).

    Keys: position_ids [N,2] int64, cos/sin [N,head_dim] float32, interp_indices [N,4] int64,
    interp_weights [N,4] float32, cu_seqlens [S+1] int32, segment_ids [N] int64.
    """
    merge = int(vision_config.get("spatial_merge_size", 2))
    rope = vision_config.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"Qwen3-VL vision rope must be 'axial', got {rope.get('rope_type')!r}")
    theta = float(rope.get("rope_theta", 10000.0))
    side = int(int(vision_config.get("num_position_embeddings", 2304)) ** 0.5)
    pos = vision_position_ids(grid_thw, merge)
    cos, sin = vision_rotary_cos_sin(pos, vision_inv_freq(vision_head_dim(vision_config), theta))
    indices, weights = vision_interpolation_indices_and_weights(grid_thw, side, merge, align_corners=True)
    return {
        "position_ids": pos,
        "cos": cos,
        "sin": sin,
        "interp_indices": indices,
        "interp_weights": weights,
        "cu_seqlens": vision_cu_seqlens(grid_thw),
        "segment_ids": vision_segment_ids(grid_thw),
    }


# -- one vision call per attention segment ---------------------------------------------------------

# vision graph input -> key of `vision_tables` (besides pixel_values, which is sliced per segment)
_TABLE_INPUTS = {"pos_interp_indices": "interp_indices", "pos_interp_weights": "interp_weights",
                 "rotary_cos": "cos", "rotary_sin": "sin"}
PACKED_INPUT = "segment_ids"  # only the previous (packed, masked) vision graphs have it


def vision_segments(grid_thw) -> list[tuple[int, int, int, int]]:
    """(start, stop, h, w) of every attention segment in patch order: one per image, one per video frame
    (the rows between consecutive `vision_cu_seqlens`)."""
    out, start = [], 0
    for t, h, w in _grid(grid_thw).tolist():
        for _ in range(t):
            out.append((start, start + h * w, h, w))
            start += h * w
    return out


def max_segment_patches(grid_thw) -> int:
    """Patches of the largest attention segment: what one vision call holds."""
    g = _grid(grid_thw)
    return int((g[:, 1] * g[:, 2]).max()) if len(g) else 0


def segment_feeds(pixel_values: np.ndarray, start: int, stop: int, h: int, w: int, vision_config: Mapping,
                  input_names: Sequence[str], cache: dict | None = None) -> dict[str, np.ndarray]:
    """The vision graph's feeds for the segment of patches [start, stop) with an h x w grid. Its tables are
    those of a lone `[1, h, w]` image (a video frame's positions and taps equal its first frame's); a packed
    graph's `segment_ids` are all 0 (one segment: its mask is all zeros, i.e. no mask)."""
    key = (h, w)
    tables = cache.get(key) if cache is not None else None
    if tables is None:
        tables = vision_tables([[1, h, w]], vision_config)
        if cache is not None:
            cache[key] = tables
    feeds = {}
    for name in input_names:
        if name == "pixel_values":
            feeds[name] = np.ascontiguousarray(pixel_values[start:stop], dtype=np.float32)
        elif name in _TABLE_INPUTS:
            feeds[name] = tables[_TABLE_INPUTS[name]]
        elif name == PACKED_INPUT:
            feeds[name] = np.zeros(stop - start, dtype=np.int64)
        else:
            raise QvlError(f"the vision graph has an input {name!r} the runtime does not know",
                           hint="re-export the artifact with this version of qvl-compile")
    return feeds


def encode_per_segment(run: Callable[[dict], Sequence[np.ndarray]], pixel_values: np.ndarray, grid_thw,
                       vision_config: Mapping, input_names: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the vision graph (`run(feeds) -> [image_embeds, deepstack_0, ...]`) once per attention segment and
    concatenate: (image embeddings [N / merge^2, H], DeepStack features, one such array per level)."""
    pixel_values = np.asarray(pixel_values)
    segments = vision_segments(grid_thw)
    if not segments or segments[-1][1] != pixel_values.shape[0]:
        n = segments[-1][1] if segments else 0
        raise QvlError(f"{pixel_values.shape[0]} pixel-value rows for image grids of {n} patches")
    cache: dict = {}
    parts: list[list[np.ndarray]] = []
    for start, stop, h, w in segments:
        outs = run(segment_feeds(pixel_values, start, stop, h, w, vision_config, input_names, cache))
        parts.append([np.asarray(o) for o in outs])
    if len(parts) == 1:
        return parts[0][0], parts[0][1:]
    merged = [np.concatenate(column, axis=0) for column in zip(*parts)]
    return merged[0], merged[1:]
