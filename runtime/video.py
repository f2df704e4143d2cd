"""Qwen3-VL video input in numpy + PyAV (no torch, no transformers).

A port of what transformers 5.24 does for `Qwen3VLProcessor(videos=...)`, matched bit for bit:

1. **Decoding** like `video_utils.read_video_pyav`: `av.open`, `stream.frames` frames at
   `stream.average_rate` fps, `container.seek(0)`, every frame decoded in order up to the last sampled
   index, the sampled ones converted with `frame.to_ndarray(format="rgb24")`. (Frames that are not
   sampled are decoded but never converted; sampled frames are resized as they arrive, so memory holds
   the resized clip only.) A stream whose header has no frame count is counted by demuxing first.
2. **Frame sampling** (`Qwen3VLVideoProcessor.sample_frames`): `n = int(total / video_fps * fps)`,
   clamped to `[min_frames, max_frames]` and to `total`, indices `linspace(0, total - 1, n).round()`.
3. **Resize** to the video `smart_resize(num_frames, h, w, temporal_factor, factor, min, max)` (the
   pixel budget `size.longest_edge` is over all sampled frames) with torchvision's
   `resize(..., BICUBIC, antialias=True)` on uint8 frames, which on the CPU is ATen's separable uint8
   kernel: PIL-style support and Keys cubic (a = -0.5), weights normalised in float64 then rounded to
   int16 at the precision the largest weight allows, an integer dot product plus half an LSB, shifted
   and clamped; width first, then height, each pass only when that size changes (`resize_bicubic_aa`).
4. **Rescale + normalize** fused as `TorchvisionBackend.rescale_and_normalize` does it:
   `(x - float32(mean) * float32(1 / rescale)) / (float32(std) * float32(1 / rescale))` in float32,
   evaluated once per (channel, uint8 value) and indexed (bit-identical).
5. **Patchify** (`Qwen3VLVideoProcessor.patchify`): the last frame repeated up to a multiple of
   `temporal_patch_size`, then `(gt, tp, C, gh/m, m, p, gw/m, m, p) -> (gt, gh/m, gw/m, m, m, C, tp, p, p)`,
   flattened to `[gt * gh * gw, C * tp * p * p]`; `video_grid_thw` is `[gt, gh, gw]`.
6. **Prompt** (`Qwen3VLProcessor.replace_video_token`): the `<|video_pad|>` the chat template wrote
   (inside its own `<|vision_start|>...<|vision_end|>`, which transformers >= 5.25 collapses into the bare token
   first, as Qwen's processor does; 5.24 kept it) becomes, per temporal
   group, `<{t:.1f} seconds><|vision_start|>` + `gh * gw / m**2` pads + `<|vision_end|>`, where t is the
   mean of the group's first and last frame time (`_calculate_timestamps`, the indices padded like the
   frames).

The video processor's settings come from `processor_config.json["video_processor"]`, else
`video_preprocessor_config.json`, else `preprocessor_config.json` (transformers' order), with
`Qwen3VLVideoProcessor`'s class defaults (fps 2, 4..768 frames) for absent keys.

Limits: `max_video_tokens` bounds the `<|video_pad|>` tokens of one video (prefill and KV memory) and
`max_frame_tokens` those of one temporal group (one vision call, like `max_image_tokens` for an image);
both are checked on the container's header, before a frame is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qvl.errors import QvlError
from qvl.runtime.image_preprocess import MAX_IMAGE_PIXELS, media_source

# transformers' class defaults (Qwen3VLVideoProcessor / VideoProcessorMixin / image_utils).
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
_DEFAULT_MIN_PIXELS = 128 * 32 * 32  # size.shortest_edge
_DEFAULT_MAX_PIXELS = 32 * 32 * 768  # size.longest_edge
_BICUBIC = 3
_MAX_ASPECT_RATIO = 200
# transformers' replace_video_token: a video without a known frame rate is timed at 24 fps.
FALLBACK_FPS = 24.0

# Default bound on the `<|video_pad|>` tokens of one video: every one is a prefill position with its KV cache.
# The published 2B video config's pixel budget (size.longest_edge 25,165,824 over all frames) tops out at
# 12,288 tokens, so the default never refuses what the checkpoint's own processor makes; it catches a raised
# budget or a config without one. Each temporal group is one vision call, bounded by `max_frame_tokens`.
DEFAULT_MAX_VIDEO_TOKENS = 16384

VIDEO_SOURCE_KEYS = ("video", "url", "path")  # ProcessorMixin's video keys of a `type == "video"` block
# Per-video options of a content block: the sampling rate (qwen-vl-utils' `fps`), the frame cap
# (`max_frames`, what Qwen3VLVideoProcessor.max_frames sets) and the pixel budget over all frames
# (`total_pixels`, what size.longest_edge sets).
VIDEO_OPTION_KEYS = ("fps", "max_frames", "total_pixels")


@dataclass(frozen=True)
class VideoProcessorConfig:
    """What the video processor config says, with `Qwen3VLVideoProcessor`'s defaults for absent keys."""

    min_pixels: int = _DEFAULT_MIN_PIXELS  # size.shortest_edge, over all sampled frames
    max_pixels: int = _DEFAULT_MAX_PIXELS  # size.longest_edge, over all sampled frames
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
    rescale_factor: float = 1 / 255
    resample: int = _BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_sample_frames: bool = True
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    # transformers' `cap_pixels_per_frame` (None -> False in 5.24) and its per-frame ceiling, which
    # transformers calls `max_video_tokens` (tokens of one frame, not of the video).
    cap_pixels_per_frame: bool = False
    frame_cap_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def with_request(self, fps: float | None = None, max_frames: int | None = None,
                     total_pixels: int | None = None) -> "VideoProcessorConfig":
        """This config with one request's sampling rate, frame cap and pixel budget (None keeps the config's)."""
        check_video_options(fps=fps, max_frames=max_frames, total_pixels=total_pixels)
        changes: dict[str, Any] = {}
        if fps is not None:
            changes["fps"] = float(fps)
        if max_frames is not None:
            changes["max_frames"] = int(max_frames)
        if total_pixels is not None:
            changes["max_pixels"] = int(total_pixels)
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoProcessorConfig":
        def get(key, default):
            value = d.get(key)
            return default if value is None else value

        size = d.get("size")
        min_pixels, max_pixels = _DEFAULT_MIN_PIXELS, _DEFAULT_MAX_PIXELS
        if isinstance(size, dict):  # Qwen3VLVideoProcessor.resize needs both keys
            min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")
            if not min_pixels or not max_pixels:
                raise QvlError(f"video processor config: `size` must have shortest_edge and longest_edge, got {size!r}")
        elif size is not None:
            raise QvlError(f"video processor config: unsupported `size` {size!r}",
                           hint="expected {shortest_edge, longest_edge}")

        def floats(value) -> tuple[float, ...]:
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)

        try:
            cfg = cls(
                min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                patch_size=int(get("patch_size", 16)), temporal_patch_size=int(get("temporal_patch_size", 2)),
                merge_size=int(get("merge_size", 2)),
                image_mean=floats(get("image_mean", IMAGENET_STANDARD_MEAN)),
                image_std=floats(get("image_std", IMAGENET_STANDARD_STD)),
                rescale_factor=float(get("rescale_factor", 1 / 255)), resample=int(get("resample", _BICUBIC)),
                do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
                do_normalize=bool(get("do_normalize", True)), do_convert_rgb=bool(get("do_convert_rgb", True)),
                do_sample_frames=bool(get("do_sample_frames", True)), fps=float(get("fps", 2.0)),
                min_frames=int(get("min_frames", 4)), max_frames=int(get("max_frames", 768)),
                cap_pixels_per_frame=bool(get("cap_pixels_per_frame", False)),
                frame_cap_tokens=int(get("max_video_tokens", 768)),
            )
        except (TypeError, ValueError) as e:
            raise QvlError(f"video processor config: {e}") from None
        if min(cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) <= 0:
            raise QvlError("video processor config: patch_size, merge_size and temporal_patch_size must be positive")
        if cfg.do_resize and (cfg.min_pixels <= 0 or cfg.max_pixels <= 0):
            raise QvlError("video processor config: size.shortest_edge and size.longest_edge must be positive")
        if cfg.do_resize and cfg.resample != _BICUBIC:
            raise QvlError(f"video processor config: resample={cfg.resample} is not supported (only bicubic, 3)",
                           hint="Qwen3-VL's video processor resizes bicubic")
        if not (cfg.fps > 0 and math.isfinite(cfg.fps)) or cfg.min_frames < 1 or cfg.max_frames < 1:
            raise QvlError("video processor config: fps, min_frames and max_frames must be positive")
        return cfg

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "VideoProcessorConfig":
        """transformers' `get_video_processor_dict` order: processor_config.json's nested `video_processor`,
        then video_preprocessor_config.json, then preprocessor_config.json."""
        d = Path(directory)
        nested = d / "processor_config.json"
        if nested.is_file():
            data = _read_json(nested)
            if isinstance(data, dict) and isinstance(data.get("video_processor"), dict):
                return cls.from_dict(data["video_processor"])
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = d / name
            if path.is_file():
                data = _read_json(path)
                if not isinstance(data, dict):
                    raise QvlError(f"cannot read {path}: not a JSON object")
                return cls.from_dict(data)
        raise QvlError(f"no video processor config in {d}",
                       hint="expected video_preprocessor_config.json or preprocessor_config.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QvlError(f"cannot read {path}: {e}") from None


def check_video_options(flags: bool = False, **values) -> None:
    """QvlError unless each given option is valid: `fps` a finite number > 0, the others integers >= 1.
    `flags=True` names them as CLI flags (`--fps`, `--video-max-frames`, ...). None means not given."""
    names = {"fps": "--fps", "max_frames": "--video-max-frames", "total_pixels": "--video-total-pixels",
             "max_video_tokens": "--max-video-tokens"}
    for name, value in values.items():
        if value is None:
            continue
        label = names.get(name, "--" + name.replace("_", "-")) if flags else name
        if name == "fps":
            ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
                  and math.isfinite(float(value)) and float(value) > 0)
            if not ok:
                raise QvlError(f"{label} must be a number > 0, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise QvlError(f"{label} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Sampling, sizes, timestamps (pure functions of the header)


def sample_frame_indices(total_num_frames: int, video_fps: float | None, cfg: VideoProcessorConfig) -> np.ndarray:
    """`Qwen3VLVideoProcessor.sample_frames` (fps sampling; `do_sample_frames=False`: every frame)."""
    total = int(total_num_frames)
    if not cfg.do_sample_frames:
        return np.arange(total, dtype=np.int64)
    video_fps = FALLBACK_FPS if video_fps is None else video_fps
    num_frames = int(total / video_fps * cfg.fps)
    num_frames = min(max(num_frames, cfg.min_frames), cfg.max_frames, total)
    return np.linspace(0, total - 1, num_frames).round().astype(int)


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = _DEFAULT_MIN_PIXELS, max_pixels: int = _DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """transformers' video `smart_resize` (qwen3_vl), verbatim except that errors are QvlErrors."""
    if num_frames < temporal_factor:
        raise QvlError(f"the video gives {num_frames} frame(s); Qwen3-VL needs at least {temporal_factor}",
                       hint="pass a single frame as an image, or a longer video")
    if height <= 0 or width <= 0:
        raise QvlError(f"the video has no pixels ({width}x{height})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise QvlError(f"video aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, got "
                       f"{max(height, width) / min(height, width)} ({width}x{height})",
                       hint="crop the video to a less extreme shape")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_target_size(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int]:
    """The (height, width) every sampled frame is resized to (`Qwen3VLVideoProcessor.resize`)."""
    if not cfg.do_resize:
        return height, width
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.frame_cap_tokens * cfg.factor * cfg.factor
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_video(num_frames, height, width, cfg.temporal_patch_size, cfg.factor, cfg.min_pixels,
                              max_pixels)


def video_grid(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int, int]:
    """`video_grid_thw` of `num_frames` sampled frames of this size."""
    h, w = video_target_size(num_frames, height, width, cfg)
    if h % cfg.factor or w % cfg.factor:
        raise QvlError(f"video frame size {w}x{h} is not a multiple of patch_size * merge_size = {cfg.factor}")
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, h // cfg.patch_size, w // cfg.patch_size


def frame_timestamps(indices: Sequence[int] | np.ndarray, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """`Qwen3VLProcessor._calculate_timestamps`: one time (s) per temporal group, the mean of its first and last
    frame's time, the indices padded with the last one like the frames."""
    indices = [int(i) for i in np.asarray(indices).reshape(-1).tolist()]
    if len(indices) % temporal_patch_size:
        indices.extend(indices[-1] for _ in range(temporal_patch_size - len(indices) % temporal_patch_size))
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def video_placeholder(grid_thw: Sequence[int], timestamps: Sequence[float], merge_size: int, video_token: str,
                      vision_start: str, vision_end: str) -> str:
    """`Qwen3VLProcessor.replace_video_token`: what one `<|video_pad|>` of the rendered template becomes."""
    t, h, w = (int(v) for v in grid_thw)
    frame_tokens = h * w // merge_size**2
    if len(timestamps) < t:
        raise QvlError(f"{len(timestamps)} frame timestamps for a video of {t} temporal groups")
    return "".join(f"<{timestamps[i]:.1f} seconds>" + vision_start + video_token * frame_tokens + vision_end
                   for i in range(t))


def check_video_tokens(grid_thw: Sequence[int], cfg: VideoProcessorConfig, max_video_tokens: int | None,
                       max_frame_tokens: int | None, name: str, num_frames: int, size: tuple[int, int]) -> None:
    """QvlError when the video becomes more tokens than `max_video_tokens`, or one temporal group (one vision
    call) more than `max_frame_tokens` (None: no limit). `size` is the source (width, height)."""
    t, h, w = (int(v) for v in grid_thw)
    per_group = h * w // cfg.merge_size**2
    total = t * per_group
    resized = f"{w * cfg.patch_size}x{h * cfg.patch_size}"
    where = f"video {name} ({size[0]}x{size[1]}, {num_frames} frames sampled, resized to {resized})"
    if max_video_tokens is not None and total > max_video_tokens:
        raise QvlError(
            f"{where} is {total} video tokens ({t} groups of {per_group}), more than the limit of "
            f"{max_video_tokens} per video",
            hint="raise the limit (--max-video-tokens / max_video_tokens=; prefill time and KV memory grow with it) "
                 "or lower the pixel budget over all frames (--video-total-pixels / total_pixels=, e.g. "
                 f"{max_video_tokens * cfg.temporal_patch_size * cfg.factor**2})")
    if max_frame_tokens is not None and per_group > max_frame_tokens:
        raise QvlError(
            f"{where} is {per_group} tokens per frame group ({per_group * cfg.merge_size**2} patches in one vision "
            f"call), more than the per-call limit of {max_frame_tokens} (--max-image-tokens)",
            hint="sample more frames (--fps / fps=; the pixel budget is shared by all frames), lower the pixel "
                 "budget (--video-total-pixels / total_pixels=) or raise --max-image-tokens")


# ---------------------------------------------------------------------------------------------------
# Resize: ATen's uint8 antialiased bicubic (what torchvision's resize runs on CPU uint8 tensors)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """`HelperInterpCubic::aa_filter<double, true>`: Keys cubic with a = -0.5 (PIL's), in float64."""
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    near, far = x < 1.0, (x >= 1.0) & (x < 2.0)
    xn, xf = x[near], x[far]
    out[near] = ((a + 2) * xn - (a + 3)) * xn * xn + 1
    out[far] = ((a * xf - 5 * a) * xf + 8 * a) * xf - 4 * a
    return out


def _axis_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`_compute_index_ranges_int16_weights` (antialias, align_corners False, no scale factor) for one axis:
    tap indices int64 `[out, K]` (clipped; their weights are 0 past each row's size), int32 weights `[out, K]`
    and the fixed-point precision in bits."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # interp_size 4 * 0.5, widened when downscaling
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # static_cast<int64_t>: truncation
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, taps)
    j = np.arange(taps, dtype=np.int64)
    valid = j[None, :] < xsize[:, None]
    w = np.where(valid, _keys_cubic(((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5)
                                    * invscale), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(taps):  # ATen sums the taps in order
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    wt_max = float(w.max()) if w.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    weights = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int32)
    indices = np.minimum(xmin[:, None] + j[None, :], in_size - 1)
    return indices, weights, precision


def _resize_axis(arr: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    indices, weights, precision = _axis_int16_weights(arr.shape[axis], out_size)
    src = arr.astype(np.int32)  # products and sums are exact integers (int32 as ATen), any order gives the same
    shape = [1] * arr.ndim
    shape[axis] = out_size
    acc = np.full(arr.shape[:axis] + (out_size,) + arr.shape[axis + 1:], 1 << (precision - 1), dtype=np.int32)
    for k in range(indices.shape[1]):  # one tap of every output sample at a time (whole rows / pixels per gather)
        acc += np.take(src, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[T, H, W, C]` -> uint8 `[T, height, width, C]`, bit-equal to
    `torch.nn.functional.interpolate(x, (height, width), mode="bicubic", antialias=True)` on uint8 (torchvision's
    `resize(..., BICUBIC, antialias=True)` on the CPU). Width pass first, then height; a size that does not
    change is not resampled (an unchanged frame is returned as is, like torchvision)."""
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"expected uint8 [T, H, W, C] frames, got {frames.dtype} {frames.shape}")
    out = frames
    if width != frames.shape[2]:
        out = _resize_axis(out, 2, width)
    if height != frames.shape[1]:
        out = _resize_axis(out, 1, height)
    return out


# ---------------------------------------------------------------------------------------------------
# Normalisation and patches


def _value_table(cfg: VideoProcessorConfig, channels: int) -> np.ndarray:
    """float32 `[256, C]`: every uint8 value of every channel through `rescale_and_normalize`, with torch's ops."""
    x = np.arange(256, dtype=np.float32)[:, None].repeat(channels, axis=1)  # images.to(float32)

    def per_channel(values) -> np.ndarray:
        v = tuple(values) * channels if len(values) == 1 else tuple(values)
        if len(v) != channels:
            raise QvlError(f"video has {channels} channels but image_mean/image_std have {len(v)}")
        return np.asarray(v, dtype=np.float32)  # torch.tensor(list of floats): float32

    if cfg.do_normalize:
        mean, std = per_channel(cfg.image_mean), per_channel(cfg.image_std)
        if cfg.do_rescale:  # _fuse_mean_std_and_rescale_factor: float32 tensor * python float (cast to float32)
            inv = np.float32(1.0 / cfg.rescale_factor)
            mean, std = (mean * inv).astype(np.float32), (std * inv).astype(np.float32)
        return ((x - mean) / std).astype(np.float32)  # tvF.normalize: sub_ then div_
    if cfg.do_rescale:
        return (x * np.float32(cfg.rescale_factor)).astype(np.float32)
    return x


def patchify_video(frames: np.ndarray, cfg: VideoProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resized uint8 frames `[T, H, W, C]` -> (pixel values float32 `[gt * gh * gw, C * tp * p * p]`, (gt, gh, gw)):
    rescale + normalize, the last frame repeated to a multiple of `temporal_patch_size`, transformers' layout."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    n, height, width, channels = frames.shape
    if height % (p * m) or width % (p * m):
        raise QvlError(f"video frame size {width}x{height} is not a multiple of patch_size * merge_size = {p * m}")
    if pad := -n % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        n += pad
    table = _value_table(cfg, channels)
    values = table[frames, np.arange(channels)]  # [T, H, W, C] float32
    gt, gh, gw = n // tp, height // p, width // p
    patches = values.reshape(gt, tp, gh // m, m, p, gw // m, m, p, channels)
    # (gt, tp, bh, mh, ph, bw, mw, pw, C) -> (gt, bh, bw, mh, mw, C, tp, ph, pw)
    patches = patches.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(patches.reshape(gt * gh * gw, channels * tp * p * p)), (gt, gh, gw)


def preprocess_frames(frames: np.ndarray, cfg: VideoProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Already-sampled uint8 RGB frames `[T, H, W, 3]` -> (pixel values, grid), as the video processor's
    `_preprocess` (resize, rescale + normalize, patchify)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise QvlError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    h, w = video_target_size(frames.shape[0], frames.shape[1], frames.shape[2], cfg)
    return patchify_video(resize_bicubic_aa(frames, h, w) if cfg.do_resize else frames, cfg)


# ---------------------------------------------------------------------------------------------------
# Decoding (PyAV)


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's header, as `read_video_pyav` reads it."""

    total_num_frames: int
    fps: float | None  # stream.average_rate; None when the container has none
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class PreparedVideo:
    pixel_values: np.ndarray  # float32 [gt * gh * gw, C * tp * p * p]
    grid_thw: tuple[int, int, int]
    frame_indices: np.ndarray  # int64: the sampled frames (transformers' metadata.frames_indices)
    fps: float  # the frame rate the timestamps use
    timestamps: list[float]  # seconds, one per temporal group
    info: VideoInfo


def _av():
    try:
        import av
    except ImportError:
        raise QvlError("video input needs PyAV, which is not installed",
                       hint="pip install 'qvl-compile[video]' (or: pip install av)") from None
    return av


def _cannot_read(name: str, reason: Any) -> QvlError:
    text = str(reason).strip().replace("\n", " ") or type(reason).__name__
    return QvlError(f"cannot read video {name}: {text}", hint="pass a readable video file (mp4, mkv, webm, avi, ...)")


def _open_target(source: Any) -> tuple[Any, str]:
    """What `av.open` gets (a path or a file object) and the name errors use."""
    if isinstance(source, dict):
        for key in VIDEO_SOURCE_KEYS:
            if key in source:
                return _open_target(source[key])
        raise QvlError("a video source dict needs a 'video', 'url' or 'path' key")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        s, name = media_source(source, _cannot_read)
        if not isinstance(s, str):  # a data URI's bytes
            return s, name
        path = Path(s)
        if not path.exists():
            raise _cannot_read(name, "no such file")
        if path.is_dir():
            raise _cannot_read(name, "is a directory")
        return s, name
    raise QvlError(f"cannot read video {type(source).__name__}: unsupported video input type",
                   hint="pass a file path, a data: URI or the file's bytes")


class _Container:
    """An opened container with its first video stream; errors become QvlErrors naming the source."""

    def __init__(self, source: Any):
        self.av = _av()
        self.target, self.name = _open_target(source)
        self.container = None
        self.reopen()

    def reopen(self) -> None:
        self.close()
        if hasattr(self.target, "seek"):
            self.target.seek(0)
        try:
            self.container = self.av.open(self.target)
        except self.av.error.FFmpegError as e:
            raise _cannot_read(self.name, getattr(e, "strerror", None) or e) from None
        except (OSError, ValueError, EOFError) as e:
            raise _cannot_read(self.name, e) from None
        if not self.container.streams.video:
            self.close()
            raise _cannot_read(self.name, "no video stream")
        self.stream = self.container.streams.video[0]

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self) -> "_Container":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fail(self, exc: BaseException) -> QvlError:
        return _cannot_read(self.name, getattr(exc, "strerror", None) or exc)


def _count_frames(c: _Container) -> int:
    """Frames of a stream whose header has no count: its video packets, demuxed (not decoded)."""
    count = 0
    try:
        for packet in c.container.demux(c.stream):
            if packet.size:
                count += 1
    except (c.av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise c.fail(e) from None
    c.reopen()
    return count


def probe_video(source: Any) -> VideoInfo:
    """The header of `source`'s first video stream (frame count, frame rate, size), decoding nothing."""
    with _Container(source) as c:
        return _probe(c)


def _probe(c: _Container) -> VideoInfo:
    stream = c.stream
    total = int(stream.frames or 0) or _count_frames(c)
    stream = c.stream
    rate = stream.average_rate
    fps = float(rate) if rate else None
    width, height = int(stream.width or 0), int(stream.height or 0)
    if total <= 0:
        raise _cannot_read(c.name, "the video stream has no frames")
    if width <= 0 or height <= 0:
        raise _cannot_read(c.name, f"the video stream has no picture size ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise QvlError(f"cannot read video {c.name}: frames of {width}x{height} are {width * height:,} pixels, more "
                       f"than the {MAX_IMAGE_PIXELS:,}-pixel limit", hint="downscale the video first")
    return VideoInfo(total, fps, width, height)


def _decode_sampled(c: _Container, indices: np.ndarray, on_frame: Callable[[int, np.ndarray], None]) -> int:
    """Decode in order (read_video_pyav: seek(0), decode(video=0)) and hand every sampled frame (rgb24) to
    `on_frame(index, frame)`; stop after the last sampled index. Returns how many frames were decoded."""
    wanted = set(int(i) for i in indices.tolist())
    end_index = int(indices[-1])
    decoded = 0
    try:
        try:
            c.container.seek(0)
        except (c.av.error.FFmpegError, OSError, ValueError):
            c.reopen()  # a container that cannot seek is read from its start anyway
        for i, frame in enumerate(c.container.decode(video=0)):
            if i > end_index:
                break
            decoded = i + 1
            if i in wanted:
                on_frame(i, frame.to_ndarray(format="rgb24"))
    except QvlError:
        raise
    except (c.av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise c.fail(e) from None
    return decoded


def load_video(source: Any, cfg: VideoProcessorConfig, *, max_video_tokens: int | None = DEFAULT_MAX_VIDEO_TOKENS,
               max_frame_tokens: int | None = None) -> PreparedVideo:
    """Decode, sample and preprocess one video (a path, `file://` path, base64 `data:` URI or the file's bytes):
    what `Qwen3VLVideoProcessor` returns for it, and its frame timestamps. The token limits are checked on the
    header, before any frame is decoded; unreadable input is a QvlError ("cannot read video NAME: ...")."""
    check_video_options(max_video_tokens=max_video_tokens)
    with _Container(source) as c:
        info = _probe(c)
        indices = sample_frame_indices(info.total_num_frames, info.fps, cfg)
        frames = _decode_resized(c, info, indices, cfg, max_video_tokens, max_frame_tokens)
        if frames is None:  # the stream ended before the frames its header counts: sample what it has
            c.reopen()
            decoded = _count_decoded(c)
            info = dataclasses.replace(info, total_num_frames=decoded)
            indices = sample_frame_indices(decoded, info.fps, cfg)
            c.reopen()
            frames = _decode_resized(c, info, indices, cfg, max_video_tokens, max_frame_tokens)
            if frames is None:
                raise _cannot_read(c.name, "the video stream ended early twice")
    pixel_values, grid = patchify_video(frames, cfg)
    fps = FALLBACK_FPS if info.fps is None else info.fps
    return PreparedVideo(pixel_values, grid, indices.astype(np.int64), fps,
                         frame_timestamps(indices, fps, cfg.temporal_patch_size), info)


def _count_decoded(c: _Container) -> int:
    n = 0
    try:
        for _ in c.container.decode(video=0):
            n += 1
    except (c.av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise c.fail(e) from None
    if n <= 0:
        raise _cannot_read(c.name, "no frame could be decoded")
    return n


def _decode_resized(c: _Container, info: VideoInfo, indices: np.ndarray, cfg: VideoProcessorConfig,
                    max_video_tokens: int | None, max_frame_tokens: int | None) -> np.ndarray | None:
    """The sampled frames, resized as they are decoded: uint8 `[n, h, w, 3]`, or None if the stream ends
    before the last sampled index."""
    n = len(np.unique(indices))  # transformers keeps each decoded frame once (`i in indices`)
    grid = video_grid(n, info.height, info.width, cfg)
    check_video_tokens(grid, cfg, max_video_tokens, max_frame_tokens, c.name, n, (info.width, info.height))
    out: list[np.ndarray] = []
    target: list[tuple[int, int]] = []

    def on_frame(index: int, rgb: np.ndarray) -> None:
        if not target:
            h, w = rgb.shape[:2]
            if (w, h) != (info.width, info.height):  # the decoder's size wins; the grid follows it
                g = video_grid(n, h, w, cfg)
                check_video_tokens(g, cfg, max_video_tokens, max_frame_tokens, c.name, n, (w, h))
            target.append((h, w))
            target.append(video_target_size(n, h, w, cfg) if cfg.do_resize else (h, w))
        if rgb.shape[:2] != target[0]:
            raise _cannot_read(c.name, f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the first sampled frame "
                                       f"{target[0][1]}x{target[0][0]} (the picture size changes mid-stream)")
        th, tw = target[1]
        out.append(resize_bicubic_aa(rgb[None], th, tw)[0] if cfg.do_resize else rgb)

    decoded = _decode_sampled(c, indices, on_frame)
    if decoded <= int(indices[-1]):
        return None
    return np.stack(out)


__all__ = [
    "DEFAULT_MAX_VIDEO_TOKENS",
    "PreparedVideo",
    "VIDEO_OPTION_KEYS",
    "VIDEO_SOURCE_KEYS",
    "VideoInfo",
    "VideoProcessorConfig",
    "check_video_options",
    "check_video_tokens",
    "frame_timestamps",
    "load_video",
    "patchify_video",
    "preprocess_frames",
    "probe_video",
    "resize_bicubic_aa",
    "sample_frame_indices",
    "smart_resize_video",
    "video_grid",
    "video_placeholder",
    "video_target_size",
]
