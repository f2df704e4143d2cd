"""Reuse between generations of one conversation: its KV cache (prefix reuse) and its images' vision features.

A `PrefixCache` belongs to one conversation (`Model.session()` makes one; a server keeps one per slot). After a
generation it keeps the decoder's KV cache together with what the cache holds, position by position:

* the token ids (the prompt, then the generated tokens that were fed back: every generated token but the last),
* their MRoPE position ids (`[3, L]`: the prompt's from `mrope.rope_index` over the whole prompt, then the decode
  positions `length + rope_delta`),
* the image spans (start, end, digest) of the images in the prompt.

The next generation (`Model.generate_ids(..., cache=...)`) renders and tokenizes the whole conversation again,
computes the full prompt's position ids, and takes the longest prefix on which the held sequence and the new prompt
agree in ids, in position ids and in which image (by digest) fills each image span (`common_prefix`). The KV cache
is truncated to that prefix (`Runner.truncate`) and only the rest of the prompt is prefilled, with the slice of the
full prompt's position ids and DeepStack features for the images in that rest. At least the prompt's last token is
always prefilled (its logits give the first new token). The re-rendered history need not tokenize the previous
answer into the ids that were generated (the template appends `<|im_end|>\\n`; text detokenized and retokenized can
merge differently): reuse stops where the ids part, and what follows is prefilled.

A prompt that shares fewer than `min_reuse` tokens with the held sequence is a new conversation: the held cache is
freed before a new one is made. At most one KV cache (one sequence, at most the model's context) is held per
`PrefixCache`; `clear()` frees it and empties the image cache.

`ImageCache` holds vision-encoder outputs (image embeddings and DeepStack features) per image, keyed by a digest of
the preprocessed pixel values, the image's grid and the runner's identity (vision graph, weights, device), least
recently used first out once `max_bytes` is exceeded.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_IMAGE_CACHE_BYTES = 256 << 20
DEFAULT_MIN_REUSE = 8


# -- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFeatures:
    """One image's vision-encoder output: embeddings [N, H] and one [N, H] per DeepStack layer."""

    embeds: np.ndarray
    deepstack: tuple

    @property
    def nbytes(self) -> int:
        return int(self.embeds.nbytes + sum(d.nbytes for d in self.deepstack))


def runner_identity(runner: Any) -> str:
    """What makes two runners' vision outputs interchangeable: the vision graph, the weights and the device."""
    manifest = getattr(runner, "manifest", None)
    parts = [str(getattr(runner, "device", ""))]
    if manifest is not None:
        vision = manifest.graphs.get("vision") if hasattr(manifest.graphs, "get") else None
        parts.append(getattr(vision, "sha256", "") or "")
        parts.append(str(getattr(manifest.weights, "digest", "") or ""))
    parts.append(str(getattr(runner, "artifact", "")))
    return "|".join(parts)


def image_digest(identity: str, pixel_values: np.ndarray, grid_thw: np.ndarray) -> str:
    """Digest of one preprocessed image (its pixel-value rows and grid) for the runner `identity`."""
    h = hashlib.blake2b(digest_size=20)
    h.update(identity.encode("utf-8", "surrogatepass"))
    grid = np.ascontiguousarray(grid_thw, dtype=np.int64).reshape(-1)
    h.update(grid.tobytes())
    pv = np.ascontiguousarray(pixel_values)
    h.update(str((pv.dtype.str, pv.shape)).encode())
    h.update(memoryview(pv).cast("B"))
    return h.hexdigest()


class ImageCache:
    """Vision features by image digest, least recently used evicted first once over `max_bytes`.

    An entry larger than `max_bytes` on its own is not kept. `max_bytes=0` keeps nothing."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> ImageFeatures | None:
        feats = self._entries.get(key)
        if feats is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return feats

    def put(self, key: str, feats: ImageFeatures) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if feats.nbytes > self.max_bytes:
            return
        self._entries[key] = feats
        self.nbytes += feats.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


# -- the held sequence -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpan:
    """The prompt positions [start, end) of one image's placeholder tokens, and the image's digest."""

    start: int
    end: int
    digest: str


def common_prefix(held_ids: np.ndarray, held_pos: np.ndarray, held_images: list[ImageSpan],
                  ids: np.ndarray, pos: np.ndarray, images: list[ImageSpan]) -> int:
    """Length of the longest prefix on which a held sequence and a new prompt agree: the same token ids, the
    same position ids ([3, L] each) and, for every image span starting inside it, the same image."""
    m = min(len(held_ids), len(ids))
    if m == 0:
        return 0
    same = (held_ids[:m] == ids[:m]) & np.all(held_pos[:, :m] == pos[:, :m], axis=0)
    bad = np.flatnonzero(~same)
    p = int(bad[0]) if bad.size else m
    held_at = {s.start: s for s in held_images}
    for span in images:  # in prompt order
        if span.start >= p:
            break
        h = held_at.get(span.start)
        if h is None or h.end != span.end or h.digest != span.digest:
            p = span.start
            break
    return p


@dataclass
class HeldSequence:
    """A KV cache and what it holds (see the module docstring)."""

    runner: Any
    kv: Any
    ids: np.ndarray  # int64 [L]
    positions: np.ndarray  # int64 [3, L]
    images: list = field(default_factory=list)  # [ImageSpan]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class PrefixCache:
    """One conversation's reusable state: the KV cache of its last generation and its images' vision features.

    Not thread-safe: use one per conversation (per server slot). While a generation runs, the KV cache is checked
    out (`take`); a second generation on the same `PrefixCache` meanwhile starts from scratch."""

    def __init__(self, image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, min_reuse: int = DEFAULT_MIN_REUSE):
        if min_reuse < 1:
            raise ValueError(f"min_reuse must be >= 1, got {min_reuse}")
        self.images = ImageCache(image_cache_bytes)
        self.min_reuse = int(min_reuse)
        self._held: HeldSequence | None = None
        # Totals over this cache's life (GenerationStats has the per-call numbers).
        self.reused_tokens = 0
        self.prefilled_tokens = 0

    @property
    def held_tokens(self) -> int:
        """Positions in the kept KV cache (0 when none is kept)."""
        return 0 if self._held is None else len(self._held)

    def match(self, runner: Any, ids: np.ndarray, positions: np.ndarray, images: list[ImageSpan]) -> int:
        """How many leading positions of a new prompt the kept cache can supply (0: none, or a new conversation).

        `positions` is the full prompt's [3, L] position ids. Never the whole prompt: its last token is prefilled."""
        held = self._held
        if held is None or held.runner is not runner or len(ids) < 2:
            return 0
        p = common_prefix(held.ids, held.positions, held.images, ids, positions, images)
        p = min(p, len(ids) - 1)
        return p if p >= self.min_reuse else 0

    def shared_tokens(self, ids: np.ndarray) -> int:
        """How many leading token ids of `ids` the kept sequence starts with (ids only: a cheap score for choosing
        among several caches, as a server choosing a slot does; `match` decides what is actually reused)."""
        held = self._held
        if held is None:
            return 0
        m = min(len(held.ids), len(ids))
        bad = np.flatnonzero(held.ids[:m] != np.asarray(ids[:m]))
        return int(bad[0]) if bad.size else m

    def take(self, runner: Any) -> Any:
        """Check the kept KV cache out for a generation on `runner` (None when there is none for it). A cache kept
        for another runner is freed."""
        held, self._held = self._held, None
        if held is None:
            return None
        if held.runner is not runner:
            held.runner.free(held.kv)
            return None
        return held.kv

    def keep(self, runner: Any, kv: Any, ids: np.ndarray, positions: np.ndarray, images: list[ImageSpan]) -> None:
        """Keep `kv` (holding exactly `ids`, at `positions`) for the next generation; frees what was kept before."""
        self._drop()
        self._held = HeldSequence(runner, kv, np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                                  list(images))

    def _drop(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.runner.free(held.kv)

    def clear(self) -> None:
        """Free the kept KV cache and empty the image cache (a new conversation; `/reset` in `chat`)."""
        self._drop()
        self.images.clear()

    close = clear

    def __del__(self):  # device buffers (TensorRT) are not garbage collected with their Python objects
        try:
            self._drop()
        except Exception:  # interpreter shutdown: the runner may be half torn down
            pass
