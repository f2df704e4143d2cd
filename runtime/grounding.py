"""Grounding answers: the boxes and points Qwen3-VL writes, parsed and mapped to the original image's pixels.

Asked to locate things, Qwen3-VL answers with JSON such as

    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], "label": "dog"}]
    ```

in coordinates relative to the image, 0..1000 on each axis. Answers in the wild come with or without the
fence, with text around them, with single quotes or trailing commas, nested in other objects, or cut off by
`max_new_tokens` in the middle of the last object. `parse_grounding` takes every object carrying a `bbox_2d`
or `point_2d` key that can be read and reports each one that cannot (`Grounding.unparsed`, one line per
fragment with the reason) instead of raising.

Coordinate mapping, and why it is exactly `x_px = x / 1000 * original_width`: the model sees the image
resized by `image_preprocess.smart_resize` to (h_bar, w_bar), multiples of patch_size * merge_size, so the
resized aspect ratio can differ from the original's (with the published 2B's preprocessor config 1920x1080
becomes 1920x1088 and 300x1200 288x1216; with the sentinel's 16384..32768 pixels 300x1200 becomes 64x352, an
aspect ratio of 0.18 instead of 0.25). Its 0..1000 coordinates are fractions of that resized
image: u = x / 1000 * w_bar. But the resize is a plain PIL `resize` of the whole frame to (w_bar, h_bar):
no crop, no padding, each axis stretched on its own, so the resized pixel u is original pixel u * W / w_bar
(continuous, edge-aligned coordinates, the ones box corners use). Composed: x / 1000 * w_bar * W / w_bar =
x / 1000 * W, and likewise for y with H. The aspect-ratio change cancels per axis; mapping with one
common scale (e.g. W / w_bar for both axes) would be the mistake. `tests/test_grounding.py` checks the
identity through the real `smart_resize` on wide, tall and tiny (upscaled) images. Pixel coordinates are
then clamped to [0, W] x [0, H]; the raw relative numbers are kept as the model wrote them.

"Original image" is the image after its EXIF orientation is applied (`image_preprocess.load_image`): the
frame the model was shown.

Torch-free: json, re and Pillow (plus `image_preprocess` for an image's resized size).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qvl.errors import QvlError

REL_SCALE = 1000.0  # Qwen3-VL's relative coordinate range, per axis
# key -> how many numbers its value holds
_KEYS = {"bbox_2d": 4, "point_2d": 2}
_FRAGMENT_CHARS = 80  # how much of an unreadable fragment `unparsed` quotes

# Loose reading of an object that is closed but not JSON (single quotes, trailing commas, unquoted keys).
_LOOSE_ENTRY = re.compile(r"""["']?\b(bbox_2d|point_2d)\b["']?\s*:\s*\[([^\[\]{}]*)\]""")
_LOOSE_LABEL = re.compile(r"""["']?\blabel\b["']?\s*:\s*(?:"([^"]*)"|'([^']*)')""")
_MENTIONS_KEY = re.compile(r"\b(bbox_2d|point_2d)\b")


@dataclass(frozen=True)
class Box:
    """A `bbox_2d` as the model wrote it: (x1, y1, x2, y2), 0..1000 relative to the image."""

    rel: tuple[float, float, float, float]
    label: str | None = None

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in the original image's pixels: corners ordered (x1 <= x2, y1 <= y2), clamped."""
        x1, y1, x2, y2 = self.rel
        xs = sorted((_to_px(x1, width), _to_px(x2, width)))
        ys = sorted((_to_px(y1, height), _to_px(y2, height)))
        return xs[0], ys[0], xs[1], ys[1]


@dataclass(frozen=True)
class Point:
    """A `point_2d` as the model wrote it: (x, y), 0..1000 relative to the image."""

    rel: tuple[float, float]
    label: str | None = None

    def to_pixels(self, width: int, height: int) -> tuple[float, float]:
        return _to_px(self.rel[0], width), _to_px(self.rel[1], height)


@dataclass(frozen=True)
class Grounding:
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    unparsed: tuple[str, ...] = field(default=())  # one line per fragment that looked like grounding but was unreadable

    def __bool__(self) -> bool:
        return bool(self.boxes or self.points or self.unparsed)


def _to_px(rel: float, size: int) -> float:
    """0..1000 relative -> pixel (see the module docstring: exact through smart-resize), clamped to [0, size]."""
    return round(min(max(rel * size / REL_SCALE, 0.0), float(size)), 2)


# ------------------------------------------------------------------------------------------------ parsing


def parse_grounding(text: str) -> Grounding:
    """Every box and point in an answer, in the order written; what could not be read goes to `unparsed`."""
    boxes: list[Box] = []
    points: list[Point] = []
    unparsed: list[str] = []
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            end = _read_loose(text, i, boxes, points, unparsed)
        else:
            _collect(value, boxes, points, unparsed)
        i = text.find("{", max(end, i + 1))
    return Grounding(tuple(boxes), tuple(points), tuple(unparsed))


def _collect(value: Any, boxes: list, points: list, unparsed: list) -> None:
    """Objects with grounding keys anywhere inside a decoded JSON value (an answer may nest them)."""
    if isinstance(value, list):
        for v in value:
            _collect(v, boxes, points, unparsed)
        return
    if not isinstance(value, dict):
        return
    label = value.get("label")
    label = None if label is None else str(label)
    for key, n in _KEYS.items():
        if key in value:
            numbers = _numbers(value[key], n)
            if numbers is None:
                unparsed.append(f"{key} must be {n} numbers, got {_quote(json.dumps(value[key]))}")
            else:
                (boxes if key == "bbox_2d" else points).append(_entry(key, numbers, label))
    for k, v in value.items():
        if k not in _KEYS and isinstance(v, (list, dict)):
            _collect(v, boxes, points, unparsed)


def _read_loose(text: str, start: int, boxes: list, points: list, unparsed: list) -> int:
    """An object at `start` that is not JSON. Grounding objects are flat, so it ends at the first `}` before
    the next `{`; without one it was cut off (truncated answer). Returns where to scan on."""
    close, nxt = text.find("}", start + 1), text.find("{", start + 1)
    closed = close != -1 and (nxt == -1 or close < nxt)
    end = close + 1 if closed else (nxt if nxt != -1 else len(text))
    fragment = text[start:end]
    if not _MENTIONS_KEY.search(fragment):
        return start + 1  # not grounding (or an outer object whose inner ones the scan reaches next)
    if not closed:
        unparsed.append(f"truncated object at character {start}: {_quote(fragment)}")
        return end
    found = False
    label_match = _LOOSE_LABEL.search(fragment)
    label = None if label_match is None else (label_match.group(1) if label_match.group(1) is not None
                                              else label_match.group(2))
    for m in _LOOSE_ENTRY.finditer(fragment):
        key, n = m.group(1), _KEYS[m.group(1)]
        numbers = _numbers([p.strip().strip("'\"") for p in m.group(2).split(",") if p.strip()], n, strings=True)
        if numbers is None:
            unparsed.append(f"{key} must be {n} numbers, got {_quote('[' + m.group(2) + ']')}")
        else:
            (boxes if key == "bbox_2d" else points).append(_entry(key, numbers, label))
        found = True
    if not found:
        unparsed.append(f"unreadable object at character {start}: {_quote(fragment)}")
    return end


def _numbers(value: Any, n: int, strings: bool = False) -> tuple[float, ...] | None:
    """`value` as n finite numbers, else None (bools are not numbers; strings only in the loose reading)."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        if isinstance(v, str) and strings:
            try:
                v = float(v)
            except ValueError:
                return None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(float(v))
    return tuple(out)


def _entry(key: str, numbers: tuple[float, ...], label: str | None) -> Box | Point:
    return Box(numbers, label) if key == "bbox_2d" else Point(numbers, label)  # type: ignore[arg-type]


def _quote(fragment: str) -> str:
    fragment = " ".join(fragment.split())
    return repr(fragment if len(fragment) <= _FRAGMENT_CHARS else fragment[:_FRAGMENT_CHARS] + "...")


# ------------------------------------------------------------------------------------------------ output


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def grounding_json(grounding: Grounding, image_size: tuple[int, int] | None = None,
                   resized_size: tuple[int, int] | None = None) -> dict:
    """The keys `run --json` adds for an answer with grounding ({} without): `boxes` / `points` with the
    model's relative numbers (`bbox_2d` / `point_2d`) and, when the answer is about one known image of
    `image_size` (width, height), pixel coordinates (`bbox_px` / `point_px`); `grounding_image` the original
    and resized sizes; `grounding_unparsed` what could not be read."""
    if not grounding:
        return {}
    out: dict[str, Any] = {}
    if grounding.boxes:
        out["boxes"] = [{"label": b.label, "bbox_2d": [_number(v) for v in b.rel],
                         **({"bbox_px": [_number(v) for v in b.to_pixels(*image_size)]} if image_size else {})}
                        for b in grounding.boxes]
    if grounding.points:
        out["points"] = [{"label": p.label, "point_2d": [_number(v) for v in p.rel],
                          **({"point_px": [_number(v) for v in p.to_pixels(*image_size)]} if image_size else {})}
                         for p in grounding.points]
    if image_size:
        out["grounding_image"] = {"width": image_size[0], "height": image_size[1],
                                  **({"resized_width": resized_size[0], "resized_height": resized_size[1]}
                                     if resized_size else {})}
    if grounding.unparsed:
        out["grounding_unparsed"] = list(grounding.unparsed)
    return out


# ------------------------------------------------------------------------------------------------ drawing

_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (128, 128, 0))


def check_draw_target(out: str | os.PathLike, flag: str = "--draw-boxes") -> str:
    """QvlError unless `out` can take an image file; returns Pillow's format name for its extension."""
    from PIL import Image

    out = Path(out)
    if out.is_dir():
        raise QvlError(f"{flag} {out} is a directory", hint="give a file path such as boxes.png")
    if not out.parent.is_dir():
        raise QvlError(f"{flag} {out}: folder {out.parent} does not exist", hint="create it first, or write elsewhere")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise QvlError(f"{flag} {out}: cannot write images with extension {out.suffix or '(none)'!r}",
                       hint="use .png (or .jpg, .webp)")
    return fmt


def draw_grounding(image, grounding: Grounding, out: str | os.PathLike, flag: str = "--draw-boxes") -> Path:
    """Draw the boxes (outline + label) and points (a dot + label) on a copy of `image` (the original, a PIL
    image) and write it to `out` atomically: a temporary file beside it, then a rename."""
    from PIL import Image, ImageDraw, ImageFont

    fmt = check_draw_target(out, flag)
    out = Path(out)
    canvas = image.convert("RGB")  # a copy: the caller's image is never drawn on
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(width, height) / 200))
    font = ImageFont.load_default()
    items = [(b.to_pixels(width, height), b.label, True) for b in grounding.boxes]
    items += [(p.to_pixels(width, height), p.label, False) for p in grounding.points]
    for i, (xy, label, is_box) in enumerate(items):
        colour = _COLOURS[i % len(_COLOURS)]
        if is_box:
            draw.rectangle(xy, outline=colour, width=line)
            anchor = (xy[0] + line, xy[1] + line)
        else:
            r = max(2, 2 * line)
            draw.ellipse((xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r), fill=colour, outline=(255, 255, 255))
            anchor = (xy[0] + r + 1, xy[1] - r)
        if label:
            left, top, right, bottom = draw.textbbox(anchor, label, font=font)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
            draw.text(anchor, label, fill=(255, 255, 255), font=font)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            canvas.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def answer_grounding(text: str, images: Sequence[Any], image_config=None) -> tuple[Grounding, dict]:
    """(Grounding, the `run --json` keys) for an answer to a prompt with these images (PIL images as
    `image_preprocess.load_image` returns them, EXIF orientation applied). Pixel coordinates only for exactly
    one image: with several, the answer does not say which image a box is on. `image_config` (the
    `ImageProcessorConfig` the prompt was built with) adds the resized size the model saw."""
    grounding = parse_grounding(text)
    if not grounding or len(images) != 1:
        return grounding, grounding_json(grounding)
    width, height = images[0].size
    resized = None
    if image_config is not None:
        from qvl.runtime.image_preprocess import target_size

        h_bar, w_bar = target_size(height, width, image_config)
        resized = (w_bar, h_bar)
    return grounding, grounding_json(grounding, (width, height), resized)


__all__ = ["Box", "Grounding", "Point", "REL_SCALE", "answer_grounding", "check_draw_target", "draw_grounding",
           "grounding_json", "parse_grounding"]
