"""Synthetic visual question answering: simple scenes with short, exactly checkable answers.

Used to train and evaluate the `sentinel` checkpoint (a small *trained* Qwen3-VL), so that lossy passes
(int8/int4, fp16) can be judged by task accuracy instead of by logits of a random model.

Scenes are rasterised with numpy (no Pillow drawing, no fonts), so a seed gives byte-identical images
on every platform and Pillow version; Pillow only wraps the final array. numpy + Pillow only: the
evaluation of compiled artifacts runs this in torch-free environments.

Question kinds (one image each, the image is 128x128 by default, i.e. 8x8 patches of 16 px):

    colour  "What colour is the triangle?"        -> "red"
    count   "How many circles are there?"         -> "3"
    left    "Is the square on the left?"          -> "yes" / "no"   (left / right half of the image)
    number  "What number is written?"             -> "47"   (7-segment digits, 0..99)

Objects sit one per cell of a 4x4 grid (32 px cells, the size of one merged visual token), centred with
+-1 px jitter, in one of three sizes and six jittered colours on a light background; digits are 7-segment,
one per cell. Answers are never ambiguous. Train and test samples come from disjoint seed ranges
(`SPLITS`).

A sample is a dict: {"images": [PIL.Image], "question": str, "answer": str, "kind": str, "seed": int,
"messages": chat messages, ...}. `messages` is the user turn the real chat template renders:
[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]. Training extras:
"qa" (every valid question about the image), "description" (see describe_shapes), "objects", "cells".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from qvl.errors import QvlError

KINDS = ("colour", "count", "left", "number")
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 200, 10),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
# Seed ranges per split: [start, stop). Disjoint, so no held-out scene is ever trained on.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "test": (1_000_000_000, 1_100_000_000),
}
IMAGE_SIZE = 128  # pixels per side
GRID = 4  # cells per side
MAX_COUNT = 4
OBJECT_SIZES = (20, 24, 28)  # shape bounding boxes, pixels
DIGIT_H, DIGIT_W, DIGIT_T = 28, 18, 4  # 7-segment digit box and stroke, pixels
JITTER = 1  # +- pixels around the centre of a cell

QUESTION_TEMPLATES = {
    "colour": "What colour is the {shape}?",
    "count": "How many {shape}s are there?",
    "left": "Is the {shape} on the left?",
    "number": "What number is written?",
}
# Training-only turn: a dense description of a shape scene (see describe_shapes).
DESCRIBE_QUESTION = "Describe the shapes."


# --------------------------------------------------------------------------------------------- samples


def messages_for(question: str, num_images: int = 1) -> list[dict]:
    """The single user turn for `question` with `num_images` image placeholders before the text."""
    content: list[dict] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def make_sample(seed: int, kind: str | None = None, difficulty: float = 1.0) -> dict:
    """One sample, fully determined by `seed`, `kind` (default: KINDS[seed % 4], a balanced mix) and
    `difficulty`.

    `difficulty` in [0, 1] (training curricula only; evaluation always uses 1.0) scales the number of
    distractor objects and, for numbers, how often two digits are drawn: 0 gives lone objects and
    single digits, 1 the full distribution.
    """
    difficulty = min(1.0, max(0.0, float(difficulty)))
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if kind is None:
        kind = KINDS[seed % len(KINDS)]
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng(np.random.SeedSequence([0x5157_4C00, KINDS.index(kind), seed]))
    canvas = _background(rng)
    owner = np.full(canvas.shape[:2], -1, dtype=np.int16)  # which object/digit drew each pixel
    if kind == "number":
        question, answer, items = _number_scene(rng, canvas, owner, difficulty)
        qa = [(kind, question, answer)]
    else:
        question, answer, items = _shape_scene(rng, canvas, owner, kind, difficulty)
        qa = [(kind, question, answer)] + [q for q in _shape_questions(items) if q[1] != question]
    image = Image.fromarray(canvas)
    return {
        "images": [image],
        "question": question,
        "answer": answer,
        "kind": kind,
        "seed": seed,
        "messages": messages_for(question, 1),
        # Scene description, for training aids and debugging: every valid (kind, question, answer) about
        # this image (the sample's own first), the drawn items, and (shape, colour) classes of each grid
        # cell, row-major (CELL_SHAPE_CLASSES, CELL_COLOUR_CLASSES).
        "qa": qa,
        "description": None if kind == "number" else describe_shapes(items),
        "objects": items,
        "cells": _cell_labels(owner, items),
    }


def split_seeds(split: str, count: int, start: int = 0) -> range:
    """Seeds of samples `start .. start+count-1` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    if start < 0 or count < 0 or lo + start + count > hi:
        raise ValueError(f"{split} split holds seeds {lo}..{hi - 1}; asked for {start}+{count}")
    return range(lo + start, lo + start + count)


def make_samples(split: str, count: int, start: int = 0, kind: str | None = None) -> list[dict]:
    """`count` samples of `split` (train/test), beginning at index `start` of that split (difficulty 1)."""
    return [make_sample(s, kind) for s in split_seeds(split, count, start)]


# --------------------------------------------------------------------------------------------- scenes


def _background(rng: np.random.Generator) -> np.ndarray:
    level = int(rng.integers(236, 256))
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, dtype=np.uint8)


def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 12) -> np.ndarray:
    c = np.array(rgb, dtype=np.int64) + rng.integers(-amount, amount + 1, size=3)
    return np.clip(c, 0, 255).astype(np.uint8)


def _shape_scene(
    rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray, kind: str, difficulty: float
) -> tuple[str, str, list[dict]]:
    """Place objects one per grid cell and ask a `kind` question about them."""
    extra = 1 + round(3 * difficulty)  # distractors drawn from 0 .. extra-1
    objects: list[tuple[str, str]] = []  # (shape, colour name); cells assigned below
    if kind == "colour":
        target = SHAPES[rng.integers(len(SHAPES))]
        others = [s for s in SHAPES if s != target]
        objects.append((target, _pick(rng, COLOURS)))
        for _ in range(int(rng.integers(0, extra))):
            objects.append((others[rng.integers(len(others))], _pick(rng, COLOURS)))
        question = QUESTION_TEMPLATES["colour"].format(shape=target)
        answer = objects[0][1]
        cells = _cells(rng, len(objects))
    elif kind == "count":
        target = SHAPES[rng.integers(len(SHAPES))]
        others = [s for s in SHAPES if s != target]
        n = int(rng.integers(1, MAX_COUNT + 1))
        objects += [(target, _pick(rng, COLOURS)) for _ in range(n)]
        for _ in range(int(rng.integers(0, extra))):
            objects.append((others[rng.integers(len(others))], _pick(rng, COLOURS)))
        question = QUESTION_TEMPLATES["count"].format(shape=target)
        answer = str(n)
        cells = _cells(rng, len(objects))
    else:  # left: is the (unique) target in the left half of the image?
        target = SHAPES[rng.integers(len(SHAPES))]
        others = [s for s in SHAPES if s != target]
        objects.append((target, _pick(rng, COLOURS)))
        for _ in range(int(rng.integers(0, extra))):
            objects.append((others[rng.integers(len(others))], _pick(rng, COLOURS)))
        want_yes = bool(rng.integers(2))
        half = GRID // 2
        cell_t = (int(rng.integers(GRID)), int(rng.integers(half)) + (0 if want_yes else half))
        free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) != cell_t]
        picks = rng.choice(len(free), size=len(objects) - 1, replace=False)
        cells = [cell_t] + [free[i] for i in picks]
        question = QUESTION_TEMPLATES["left"].format(shape=target)
        answer = "yes" if want_yes else "no"

    items = []
    for i, ((shape, colour), (row, col)) in enumerate(zip(objects, cells)):
        _draw_object(rng, canvas, owner, i, shape, COLOURS[colour], row, col)
        items.append({"shape": shape, "colour": colour, "row": row, "col": col})
    return question, answer, items


def _shape_questions(items: list[dict]) -> list[tuple[str, str, str]]:
    """Every unambiguous question about a shape scene, as (kind, question, answer)."""
    counts = {s: sum(o["shape"] == s for o in items) for s in SHAPES}
    unique = {o["shape"]: o for o in items if counts[o["shape"]] == 1}
    out = []
    for shape in SHAPES:
        if shape in unique:
            out.append(("colour", QUESTION_TEMPLATES["colour"].format(shape=shape), unique[shape]["colour"]))
        if counts[shape]:
            out.append(("count", QUESTION_TEMPLATES["count"].format(shape=shape), str(counts[shape])))
        if shape in unique:
            yes = _half(unique[shape]) == 0
            out.append(("left", QUESTION_TEMPLATES["left"].format(shape=shape), "yes" if yes else "no"))
    return out


def describe_shapes(items: list[dict]) -> str:
    """Dense training text about a shape scene: per shape (SHAPES order) its count if more than one, and
    each instance's colour and grid column (1 = leftmost), in reading order. E.g.
    "Shapes: circle red 2, squares 2 blue 1 green 4, star yellow 3."
    """
    parts = []
    for shape in SHAPES:
        objs = sorted((o for o in items if o["shape"] == shape), key=lambda o: (o["row"], o["col"]))
        desc = " ".join(f"{o['colour']} {o['col'] + 1}" for o in objs)
        if len(objs) == 1:
            parts.append(f" {shape} {desc}")
        elif objs:
            parts.append(f" {shape}s {len(objs)} {desc}")
    return "Shapes:" + ",".join(parts) + "."


def _half(item: dict) -> int:
    return 0 if item["col"] < GRID // 2 else 1


# Per-cell classes (one cell = one merged visual token of a 128x128 image).
CELL_SHAPE_CLASSES = ("empty",) + SHAPES + tuple(f"digit {d}" for d in range(10))
CELL_COLOUR_CLASSES = ("none",) + tuple(COLOURS) + ("black",)


def _cell_labels(owner: np.ndarray, items: list[dict]) -> list[tuple[int, int]]:
    """(shape class, colour class) of each grid cell, row-major: the item owning most of its pixels."""
    cell = IMAGE_SIZE // GRID
    out = []
    for r in range(GRID):
        for c in range(GRID):
            block = owner[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            ids, n = np.unique(block[block >= 0], return_counts=True)
            if len(ids) == 0 or n.max() < 12:
                out.append((0, 0))
                continue
            item = items[int(ids[np.argmax(n)])]
            shape = item["shape"] if "shape" in item else f"digit {item['digit']}"
            out.append((CELL_SHAPE_CLASSES.index(shape), CELL_COLOUR_CLASSES.index(item["colour"])))
    return out


def _pick(rng: np.random.Generator, table: dict) -> str:
    keys = list(table)
    return keys[int(rng.integers(len(keys)))]


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    idx = rng.choice(GRID * GRID, size=n, replace=False)
    return [(int(i) // GRID, int(i) % GRID) for i in idx]


def _grid_coords(y0: float, x0: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a size x size window relative to (y0, x0)."""
    ys = np.arange(size, dtype=np.float64)[:, None] + 0.5 - y0
    xs = np.arange(size, dtype=np.float64)[None, :] + 0.5 - x0
    return np.broadcast_to(ys, (size, size)), np.broadcast_to(xs, (size, size))


def _offset(rng: np.random.Generator, slack: int) -> int:
    """Position inside a cell: centred, jittered by up to JITTER pixels."""
    return min(slack, max(0, slack // 2 + int(rng.integers(-JITTER, JITTER + 1))))


def _draw_object(rng, canvas: np.ndarray, owner: np.ndarray, index: int, shape: str, rgb, row: int, col: int) -> None:
    cell = IMAGE_SIZE // GRID
    size = OBJECT_SIZES[int(rng.integers(len(OBJECT_SIZES)))]  # bounding box edge in pixels
    top = row * cell + _offset(rng, cell - size)
    left = col * cell + _offset(rng, cell - size)
    r = size / 2.0
    y, x = _grid_coords(r, r, size)
    if shape == "circle":
        mask = x * x + y * y <= r * r
    elif shape == "square":
        h = r * 0.86
        mask = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        mask = _polygon_mask(x, y, [(0.0, -r), (r, r * 0.85), (-r, r * 0.85)])
    elif shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((rad * math.cos(ang), rad * math.sin(ang) + r * 0.08))
        mask = _polygon_mask(x, y, pts)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    canvas[top : top + size, left : left + size][mask] = _jitter_colour(rng, rgb)
    owner[top : top + size, left : left + size][mask] = index


def _polygon_mask(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test; pts are (x, y) vertices."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


# 7-segment layout: segment -> (kind, position); digits -> lit segments.
_SEGMENTS = {
    "a": ("h", 0), "g": ("h", 1), "d": ("h", 2),
    "f": ("vl", 0), "b": ("vr", 0), "e": ("vl", 1), "c": ("vr", 1),
}
_DIGITS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _number_scene(
    rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray, difficulty: float
) -> tuple[str, str, list[dict]]:
    two_digits = rng.random() < difficulty
    value = int(rng.integers(0, 100 if two_digits else 10))
    digits = [int(c) for c in str(value)]
    # One digit per grid cell, in adjacent cells of one row.
    cell = IMAGE_SIZE // GRID
    h, w, t = DIGIT_H, DIGIT_W, DIGIT_T
    row = int(rng.integers(GRID))
    col0 = int(rng.integers(GRID - len(digits) + 1))
    top = row * cell + _offset(rng, cell - h)
    ink_name = "black"
    ink = _jitter_colour(rng, (20, 20, 20), amount=20)
    if rng.integers(4) == 0:  # sometimes coloured ink
        ink_name = _pick(rng, COLOURS)
        ink = _jitter_colour(rng, COLOURS[ink_name])
    items = []
    for i, d in enumerate(digits):
        x = (col0 + i) * cell + _offset(rng, cell - w)
        _draw_digit(canvas, owner, i, d, top, x, h, w, t, ink)
        items.append({"digit": d, "colour": ink_name, "box": (top, x, h, w)})
    return QUESTION_TEMPLATES["number"], str(value), items


def _draw_digit(canvas, owner, index: int, digit: int, top: int, left: int, h: int, w: int, t: int, ink) -> None:
    half = (h - t) // 2
    for seg in _DIGITS[digit]:
        kind, pos = _SEGMENTS[seg]
        if kind == "h":
            y0 = top + pos * half
            box = (slice(y0, y0 + t), slice(left + 1, left + w - 1))
        else:
            x0 = left if kind == "vl" else left + w - t
            y0 = top + pos * half
            box = (slice(y0 + 1, y0 + half + t - 1), slice(x0, x0 + t))
        canvas[box] = ink
        owner[box] = index


# --------------------------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | Path) -> list[dict]:
    """Load user questions: one JSON object per line, {"images": [paths], "question": str, "answer": str}.

    Image paths are relative to the JSONL file's folder unless absolute. Blank lines and lines starting
    with '#' are skipped. Any malformed line is a QvlError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QvlError(f"questions file not found: {path}", hint="pass a .jsonl file of questions") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QvlError(f"cannot read questions file {path}: {exc}") from None
    samples: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        samples.append(_parse_line(path, lineno, line))
    if not samples:
        raise QvlError(f"{path}: no questions in file", hint='one JSON object per line: {"images": [...], "question": ..., "answer": ...}')
    return samples


_LINE_HINT = 'each line must be {"images": ["a.png"], "question": "...", "answer": "..."}'


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QvlError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", hint=_LINE_HINT) from None
    if not isinstance(obj, dict):
        raise QvlError(f"{where}: expected a JSON object, got {type(obj).__name__}", hint=_LINE_HINT)
    missing = [k for k in ("images", "question", "answer") if k not in obj]
    if missing:
        raise QvlError(f"{where}: missing key(s) {', '.join(missing)}", hint=_LINE_HINT)
    images, question, answer = obj["images"], obj["question"], obj["answer"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise QvlError(f"{where}: \"images\" must be a list of image paths", hint=_LINE_HINT)
    if not isinstance(question, str) or not question.strip():
        raise QvlError(f"{where}: \"question\" must be a non-empty string", hint=_LINE_HINT)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise QvlError(f"{where}: \"answer\" must be a string", hint=_LINE_HINT)
    loaded = []
    for p in images:
        img_path = Path(p) if Path(p).is_absolute() else path.parent / p
        try:
            with Image.open(img_path) as im:
                loaded.append(im.convert("RGB"))
        except FileNotFoundError:
            raise QvlError(f"{where}: image not found: {img_path}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise QvlError(f"{where}: cannot read image {img_path}: {exc}") from None
    return {
        "images": loaded,
        "question": question,
        "answer": answer,
        "kind": obj.get("kind", "user") if isinstance(obj.get("kind", "user"), str) else "user",
        "seed": None,
        "messages": messages_for(question, len(loaded)),
    }
