"""Qwen3-VL image preprocessing in numpy + Pillow (no torch, no transformers).

A port of transformers' `Qwen2VLImageProcessorPil` (the processor Qwen3-VL checkpoints use), matched
bit for bit. The steps and their dtypes, in transformers' order:

1. RGB conversion (`image_transforms.convert_to_rgb`): a PIL image with an alpha band (RGBA, LA, PA, ...)
   or a `transparency` entry (P/L/RGB with tRNS) is converted to RGBA and alpha-composited onto opaque
   white with `Image.alpha_composite`; every other mode (L, P, CMYK, 1, I, I;16, F, YCbCr, ...) goes
   through `Image.convert("RGB")`. A uint8 numpy array (H, W, C) uses the numpy branch: 1 channel is
   repeated, 4 channels are blended onto white in float64 and rounded half-to-even.
2. Resize to `smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)` with PIL
   `Image.resize(..., resample=BICUBIC, reducing_gap=None)` on the **uint8** RGB image (transformers
   round-trips the uint8 array through `Image.fromarray`). The resize always runs, even to the same size.
3. Rescale: `uint8 -> float64 * rescale_factor -> float32`.
4. Normalize in float32: `(x - float32(mean)) / float32(std)` per channel.
   (Steps 3-4 map each (channel, uint8 value) to one float32, so they run once on the 256 possible
   values, with the same float ops, and the image is indexed through that table: bit-identical.)
5. Patchify: (C, H, W) -> (gh/m, gw/m, m, m, C, T, P, P) with the single frame repeated T times,
   flattened to `[grid_h * grid_w, C * T * P * P]`; grid_thw is `[1, grid_h, grid_w]`.

Image files: `load_image` opens files lazily and rejects anything larger than `MAX_IMAGE_PIXELS`
before decoding a pixel. Images below that cap but above the checkpoint's `max_pixels` are resized
down exactly as transformers does, not rejected.

Per request, `min_pixels` / `max_pixels` override the checkpoint's resize bounds exactly as the processor's
call arguments do (`processor(images=..., min_pixels=..., max_pixels=...)`, or `size={"shortest_edge": ...,
"longest_edge": ...}`): `ImageProcessorConfig.with_pixels`, `preprocess_images(..., min_pixels=, max_pixels=)`.
`max_image_tokens` bounds what one image becomes (its `<|image_pad|>` count; the vision encoder runs once
per image on merge_size**2 times as many patches): an image above it is a QvlError before it is resized,
with the numbers and how to raise the limit or shrink the image.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import struct
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from qvl.errors import QvlError

# Hard cap on the decoded pixel count of an input image: 8192 x 8192 = 67,108,864 pixels (256 MiB as
# RGBA uint8). Checked on the header before any pixel is decoded; larger images are rejected with a
# QvlError. This is our own limit (below PIL's default decompression-bomb limit of ~89.5 M pixels);
# it is independent of the checkpoint's `max_pixels`, which only sets the resize target.
MAX_IMAGE_PIXELS = 8192 * 8192

# transformers' class defaults (Qwen2VLImageProcessorPil / BaseImageProcessor / image_utils).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_MAX_ASPECT_RATIO = 200

# Default bound on the image tokens of one image (one vision call of 4x as many patches at merge size 2).
# The vision graph runs one image at a time with ORT's flash attention, so its activation memory is linear in
# the patches. Measured on a Qwen3-VL-2B-shaped vision tower (random fp32 weights, ORT 1.32 CPU, 2 threads), the
# peak RSS of one call grows by 0.59 GB at 4096 patches and 1.18 GB at 8160 (a 1920x1080 photo, 2040 tokens) with
# all 24 blocks, and by 2.0 GB at 16384 patches with 4 blocks (the peak hardly depends on depth: 0.52 vs 0.59 GB
# at 4096): ~2.3 GB at this limit, on top of the weights (1.6 GB fp32, less quantized). 4096 tokens admits
# 2048x2048-pixel (4.2 MP) images at patch 16, keeps one vision call near 2 GB, which an 8 GB laptop holds beside
# the quantized 2B model, and bounds its O(N^2) compute; the published 2B preprocessor alone would allow 16384
# tokens (4096x4096 pixels: ~9 GB and minutes per image on a laptop).
DEFAULT_MAX_IMAGE_TOKENS = 4096
_BICUBIC = 3  # PILImageResampling.BICUBIC


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What `preprocessor_config.json` says, with transformers' defaults for absent (or null) keys."""

    min_pixels: int = _DEFAULT_MIN_PIXELS  # size.shortest_edge
    max_pixels: int = _DEFAULT_MAX_PIXELS  # size.longest_edge
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = _BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this (one merged patch)."""
        return self.patch_size * self.merge_size

    def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "ImageProcessorConfig":
        """This config with the resize bounds of one request (None keeps the checkpoint's): the processor's
        `min_pixels=` / `max_pixels=` call arguments (`size.shortest_edge` / `size.longest_edge`). Giving both
        with min > max is refused; one bound that crosses the checkpoint's other one is taken as transformers
        takes it (`smart_resize` applies max_pixels first)."""
        check_image_limits(min_pixels=min_pixels, max_pixels=max_pixels)
        if min_pixels is None and max_pixels is None:
            return self
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise QvlError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})",
                           hint="give min_pixels <= max_pixels")
        lo = self.min_pixels if min_pixels is None else int(min_pixels)
        hi = self.max_pixels if max_pixels is None else int(max_pixels)
        return dataclasses.replace(self, min_pixels=lo, max_pixels=hi)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        def get(key, default):
            value = d.get(key)
            return default if value is None else value  # transformers: a null value means "class default"

        size = d.get("size")
        min_pixels, max_pixels = _DEFAULT_MIN_PIXELS, _DEFAULT_MAX_PIXELS
        if isinstance(size, dict):
            # Current key names first; old Qwen2-VL configs wrote min_pixels/max_pixels inside `size`.
            min_pixels = size.get("shortest_edge", size.get("min_pixels", min_pixels))
            max_pixels = size.get("longest_edge", size.get("max_pixels", max_pixels))
        elif size is not None:
            raise QvlError(f"preprocessor config: unsupported `size` {size!r}", hint="expected {shortest_edge, longest_edge}")
        # Top-level min_pixels/max_pixels override `size`, as in Qwen2VLImageProcessorPil.__init__.
        min_pixels = get("min_pixels", min_pixels)
        max_pixels = get("max_pixels", max_pixels)

        def floats(value) -> tuple[float, ...]:
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)

        cfg = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(get("patch_size", 14)),
            temporal_patch_size=int(get("temporal_patch_size", 2)),
            merge_size=int(get("merge_size", 2)),
            image_mean=floats(get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=floats(get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            resample=int(get("resample", _BICUBIC)),
            do_resize=bool(get("do_resize", True)),
            do_rescale=bool(get("do_rescale", True)),
            do_normalize=bool(get("do_normalize", True)),
            do_convert_rgb=bool(get("do_convert_rgb", True)),
        )
        if cfg.patch_size <= 0 or cfg.merge_size <= 0 or cfg.temporal_patch_size <= 0:
            raise QvlError("preprocessor config: patch_size, merge_size and temporal_patch_size must be positive")
        if cfg.do_resize and (cfg.min_pixels <= 0 or cfg.max_pixels <= 0):
            raise QvlError("preprocessor config: size.shortest_edge and size.longest_edge must be positive")
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QvlError(f"missing preprocessor config {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QvlError(f"cannot read preprocessor config {path}: {e}") from None
        if not isinstance(data, dict):
            raise QvlError(f"cannot read preprocessor config {path}: not a JSON object")
        return cls.from_dict(data)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = _DEFAULT_MIN_PIXELS,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """transformers' `smart_resize`, verbatim except that errors are QvlErrors.

    Returns (height, width), both multiples of `factor`, with about the same aspect ratio and (usually)
    `min_pixels <= h * w <= max_pixels`.
    """
    if height <= 0 or width <= 0:
        raise QvlError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise QvlError(
            f"image aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width)} ({width}x{height})",
            hint="crop or pad the image to a less extreme shape",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------
# Loading


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if isinstance(s, bytes):
            s = os.fsdecode(s)
        if s.startswith("data:"):
            return "data:" + s[5:].split(",", 1)[0].split(";", 1)[0] + " URI"
        return s
    return type(source).__name__


def media_source(source: str | os.PathLike, cannot_read) -> tuple[io.BytesIO | str, str]:
    """A media path given as text (a path, `file://` path or base64 `data:` URI): the file path or the data URI's
    decoded bytes, and the name errors use. Remote URLs and malformed data URIs are `cannot_read(name, reason)`
    (the caller's QvlError: images and videos word theirs differently)."""
    name = _source_name(source)
    s = os.fspath(source)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.startswith(("http://", "https://")):
        raise cannot_read(name, "remote URLs are not supported; download the file first")
    if s.startswith("data:"):
        header, sep, payload = s.partition(",")
        if not sep or ";base64" not in header:
            raise cannot_read(name, "only base64 data URIs are supported")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=False)), name
        except (ValueError, TypeError) as e:
            raise cannot_read(name, f"bad base64 ({e})") from None
    if s.startswith("file://"):
        s = s[len("file://"):]
        name = s
    return s, name


def _cannot_read(name: str, reason: Any) -> QvlError:
    reason = str(reason).strip().replace("\n", " ") or type(reason).__name__
    return QvlError(f"cannot read image {name}: {reason}")


_TOO_LARGE_HINT = "downscale the image first (it is resized to the model's max_pixels anyway)"


def _check_pixel_cap(name: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise QvlError(
            f"cannot read image {name}: {width}x{height} is {width * height:,} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,}-pixel limit",
            hint=_TOO_LARGE_HINT,
        )


def _too_large(name: str, exc: Exception | None = None) -> QvlError:
    # PIL's own decompression-bomb check fired before ours could run (it is part of Image.open, at
    # 2x PIL's limit; the host program may also have lowered that limit). Its message carries the
    # decoded pixel count, which makes ours say how large the image is, like _check_pixel_cap does.
    found = re.search(r"\((\d+) pixels\)", str(exc or ""))
    pixels = int(found.group(1)) if found else 0
    if pixels > MAX_IMAGE_PIXELS:
        return QvlError(f"cannot read image {name}: {pixels:,} pixels, more than the {MAX_IMAGE_PIXELS:,}-pixel "
                        "limit (decompression-bomb check)", hint=_TOO_LARGE_HINT)
    return QvlError(f"cannot read image {name}: image too large (decompression-bomb limit)", hint=_TOO_LARGE_HINT)


def _open_bytes_or_path(fp, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own cap (below PIL's) decides; PIL's warning for 89M+ pixel headers would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise _too_large(name, e) from None
    except FileNotFoundError:
        raise _cannot_read(name, "no such file") from None
    except IsADirectoryError:
        raise _cannot_read(name, "is a directory") from None
    except PermissionError:
        raise _cannot_read(name, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise _cannot_read(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _cannot_read(name, e) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise _cannot_read(name, f"image has no pixels ({width}x{height})")
    try:
        _check_pixel_cap(name, width, height)
    except QvlError:
        img.close()
        raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # decode now, so truncated/corrupt data fails here and not mid-preprocessing
    except Image.DecompressionBombError as e:
        img.close()
        raise _too_large(name, e) from None
    except MemoryError:
        img.close()
        raise _cannot_read(name, "out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        img.close()
        raise _cannot_read(name, e) from None
    # Like transformers.image_utils.load_image: apply the EXIF orientation of image files.
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make a readable image unusable
        transposed = None
    if transposed is not None and transposed is not img:
        img.close()
        img = transposed
    return img


def load_image(source: Any) -> Image.Image:
    """Open one image: a file path (str/PathLike, optionally `file://`), a `data:image/...;base64,` URI,
    a dict {"url": ...} / {"path": ...} (OpenAI `image_url` / HF content-block value), raw bytes,
    a PIL image, or a uint8 numpy array (H, W) or (H, W, C) with C in 1, 3, 4.

    Files are decoded fully here (corrupt data raises now) and get their EXIF orientation applied,
    as transformers' `load_image` does. The mode is kept (RGBA, P, L, ...): RGB conversion is part of
    `preprocess_images`, which composites transparency onto white like the processor does for PIL
    inputs. (transformers' own `load_image(path)` instead calls `convert("RGB")`, which drops alpha
    without compositing; we follow the processor.)

    PIL images are returned unchanged (the processor does not EXIF-transpose them either).
    Raises QvlError ("cannot read image NAME: reason") for anything unreadable, and for images over
    `MAX_IMAGE_PIXELS`, checked before any pixel is decoded.
    """
    if isinstance(source, Image.Image):
        _check_pixel_cap(type(source).__name__, *source.size)
        return source
    if isinstance(source, np.ndarray):
        arr = _validate_array(source)
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if isinstance(source, dict):
        for key in ("url", "path", "image"):
            if key in source:
                return load_image(source[key])
        raise _cannot_read("<dict>", "expected a 'url' or 'path' key")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_bytes_or_path(io.BytesIO(bytes(source)), "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        return _open_bytes_or_path(*media_source(source, _cannot_read))
    raise QvlError(f"cannot read image {type(source).__name__}: unsupported image input type")


def _validate_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise QvlError(f"cannot read image ndarray: expected dtype uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise QvlError(
            f"cannot read image ndarray: expected shape (H, W) or (H, W, C) with C in 1, 3, 4, got {arr.shape}"
        )
    if arr.shape[0] <= 0 or arr.shape[1] <= 0:
        raise QvlError(f"cannot read image ndarray: no pixels (shape {arr.shape})")
    _check_pixel_cap("ndarray", arr.shape[1], arr.shape[0])
    return arr


# ---------------------------------------------------------------------------------------------------
# The steps


def convert_to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """transformers' `convert_to_rgb(..., return_numpy=True)`; returns uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    arr = _validate_array(image)
    channels = arr.shape[-1]
    if channels == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 4:
        alpha = arr[..., 3:4] / 255  # float64, as transformers
        composite = alpha * arr[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return arr


def _to_hwc_uint8(image: Image.Image | np.ndarray, do_convert_rgb: bool) -> np.ndarray:
    if do_convert_rgb:
        return convert_to_rgb(image)
    if isinstance(image, Image.Image):
        arr = np.array(image)
        if arr.dtype != np.uint8:
            raise QvlError(f"cannot preprocess a mode {image.mode} image without RGB conversion")
        return arr[..., None] if arr.ndim == 2 else arr
    return _validate_array(image)


def resize(image: np.ndarray, height: int, width: int, resample: int = _BICUBIC) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C) through PIL, as `image_transforms.resize`."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.array(pil.resize((width, height), resample=resample, reducing_gap=None))
    return out[..., None] if out.ndim == 2 else out


def rescale_and_normalize(image: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """(H, W, C) uint8 -> float32, exactly transformers' separate `rescale` then `normalize`."""
    if cfg.do_rescale:
        image = (image.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
        channels = image.shape[-1]
        mean, std = cfg.image_mean, cfg.image_std
        mean = mean * channels if len(mean) == 1 else mean
        std = std * channels if len(std) == 1 else std
        if len(mean) != channels or len(std) != channels:
            raise QvlError(f"image has {channels} channels but image_mean/image_std have {len(mean)}/{len(std)}")
        image = (image - np.array(mean, dtype=image.dtype)) / np.array(std, dtype=image.dtype)
    return np.asarray(image, dtype=np.float32)


def patchify(image_chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """(C, H, W) float32 -> ([grid_h * grid_w, C * T * P * P], grid_h, grid_w), transformers' layout."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    channels, height, width = image_chw.shape
    if height % (p * m) or width % (p * m):
        raise QvlError(f"image size {width}x{height} is not a multiple of patch_size * merge_size = {p * m}")
    grid_h, grid_w = height // p, width // p
    patches = image_chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return patches.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to."""
    if not cfg.do_resize:
        return height, width
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def num_image_tokens(height: int, width: int, cfg: ImageProcessorConfig) -> int:
    """How many `<|image_pad|>` tokens an image of this size becomes."""
    h, w = target_size(height, width, cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size) // (cfg.merge_size**2)


_ALL_UINT8 = np.arange(256, dtype=np.uint8)


def _loaded(image: Image.Image) -> Image.Image:
    """A caller's lazily opened PIL image: decode it now, so a broken file is a QvlError."""
    _check_pixel_cap(type(image).__name__, *image.size)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        name = getattr(image, "filename", None) or type(image).__name__
        raise _cannot_read(name, e) from None
    return image


def preprocess_image(image: Any, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches float32 [grid_h * grid_w, C*T*P*P], (1, grid_h, grid_w))."""
    if isinstance(image, Image.Image):
        image = _loaded(image)
    elif not isinstance(image, np.ndarray):
        image = load_image(image)
    arr = _to_hwc_uint8(image, cfg.do_convert_rgb)
    if cfg.do_resize:
        h, w = smart_resize(arr.shape[0], arr.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
        arr = resize(arr, h, w, cfg.resample)
    # Rescale + normalize map each (channel, uint8 value) to one float32, so apply them to the 256
    # possible values with the very same float ops and index: bit-identical, no float64 temporaries.
    table = rescale_and_normalize(_ALL_UINT8[:, None].repeat(arr.shape[-1], axis=1)[None], cfg)[0]  # [256, C]
    values = table[arr, np.arange(arr.shape[-1])]  # (H, W, C) float32
    patches, grid_h, grid_w = patchify(values.transpose(2, 0, 1), cfg)
    return patches, (1, grid_h, grid_w)


def check_image_limits(flags: bool = False, **values) -> None:
    """QvlError unless each given limit (`max_image_tokens`, `min_pixels`, `max_pixels`) is an integer >= 1;
    `flags=True` names them as CLI flags. None means not given."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            label = "--" + name.replace("_", "-") if flags else name
            raise QvlError(f"{label} must be an integer >= 1, got {value!r}")


def image_tokens(image: Image.Image | np.ndarray, cfg: ImageProcessorConfig) -> int:
    """How many `<|image_pad|>` tokens a loaded image becomes (before it is resized)."""
    height, width = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else image.shape[:2]
    return num_image_tokens(height, width, cfg)


def check_image_tokens(images: Sequence[Image.Image | np.ndarray], cfgs: Sequence[ImageProcessorConfig],
                       max_image_tokens: int | None) -> None:
    """QvlError for the first image that becomes more than `max_image_tokens` tokens (None: no limit)."""
    if max_image_tokens is None:
        return
    check_image_limits(max_image_tokens=max_image_tokens)
    for i, (image, cfg) in enumerate(zip(images, cfgs)):
        tokens = image_tokens(image, cfg)
        if tokens > max_image_tokens:
            height, width = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else image.shape[:2]
            h, w = target_size(height, width, cfg)
            patches = tokens * cfg.merge_size**2
            raise QvlError(
                f"image {i + 1} ({width}x{height}, resized to {w}x{h}) is {tokens} image tokens ({patches} patches in "
                f"one vision call), more than the limit of {max_image_tokens} per image",
                hint="raise the limit (--max-image-tokens / max_image_tokens=; vision memory grows with it) or shrink "
                     "the image (--max-pixels / max_pixels=, e.g. "
                     f"{max_image_tokens * cfg.factor**2} for {max_image_tokens} tokens)",
            )


def preprocess_images(images: Sequence[Any] | Any, cfg: ImageProcessorConfig | Sequence[ImageProcessorConfig],
                      *, min_pixels: int | None = None, max_pixels: int | None = None,
                      max_image_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (PIL, uint8 arrays, or anything `load_image` takes) -> (pixel_values float32
    [sum of grid_h * grid_w, C*T*P*P], image_grid_thw int64 [n_images, 3]), as the processor returns.

    `cfg` is one config for all images or one per image; `min_pixels` / `max_pixels` override the resize
    bounds of every image (the processor's call arguments); `max_image_tokens` rejects, before any image is
    resized, an image that would become more tokens than that."""
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes, dict)):
        images = [images]
    images = list(images)
    cfgs = [cfg] * len(images) if isinstance(cfg, ImageProcessorConfig) else list(cfg)
    if len(cfgs) != len(images):
        raise ValueError(f"{len(cfgs)} image configs for {len(images)} images")
    cfgs = [c.with_pixels(min_pixels, max_pixels) for c in cfgs]
    if not images:
        c = cfg if isinstance(cfg, ImageProcessorConfig) else ImageProcessorConfig()
        dim = 3 * c.temporal_patch_size * c.patch_size**2
        return np.zeros((0, dim), np.float32), np.zeros((0, 3), np.int64)
    loaded = [_loaded(im) if isinstance(im, Image.Image) else _validate_array(im) if isinstance(im, np.ndarray)
              else load_image(im) for im in images]
    check_image_tokens(loaded, cfgs, max_image_tokens)
    all_patches, grids = [], []
    for image, c in zip(loaded, cfgs):
        patches, thw = preprocess_image(image, c)
        all_patches.append(patches)
        grids.append(thw)
    return np.concatenate(all_patches, axis=0), np.array(grids, dtype=np.int64)


__all__ = [
    "DEFAULT_MAX_IMAGE_TOKENS",
    "MAX_IMAGE_PIXELS",
    "ImageProcessorConfig",
    "check_image_limits",
    "check_image_tokens",
    "image_tokens",
    "convert_to_rgb",
    "load_image",
    "num_image_tokens",
    "patchify",
    "preprocess_image",
    "preprocess_images",
    "resize",
    "rescale_and_normalize",
    "smart_resize",
    "target_size",
]
