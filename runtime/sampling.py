"""Next-token selection from float32 logits with transformers' `generate` semantics, in numpy.

Processor order follows `GenerationMixin._get_logits_processor` (the subset that matters here):

    repetition_penalty (greedy and sampling)
    -- only when sampling: --
    temperature -> top_k -> top_p -> min_p

Each filter reproduces the transformers class of the same role (`RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`, all with
`min_tokens_to_keep=1`, filter value -inf). Greedy is `argmax` (ties -> lowest index, like `torch.argmax`).

Sampling draws from the softmax of the filtered scores with a seeded `numpy.random.Generator`; it is
reproducible for a given seed but does not reproduce torch's `multinomial` RNG stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qvl.errors import QvlError

_NEG_INF = np.float32(-np.inf)


# `GenerationConfig._get_default_generation_params()`: what `generate` uses for a field that neither the
# caller nor the checkpoint's generation_config.json sets (note top_k=50 even when only do_sample is set).
GENERATE_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class SamplingConfig:
    """The generation fields the runtime honours. Defaults are `generate`'s global defaults; a neutral value
    (temperature 1.0, top_k 0/None, top_p 1.0/None, min_p None, repetition_penalty 1.0/None) disables a step."""

    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0

    def __post_init__(self):
        if self.do_sample and self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False)")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, gen: Mapping | None = None, **overrides) -> "SamplingConfig":
        """Resolve like `generate`: `overrides` (None = not given) > `gen` (a generation_config.json dict;
        missing/null = not set) > `GENERATE_DEFAULTS`. Unknown keys in `gen` are ignored."""
        unknown = set(overrides) - set(GENERATE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling fields: {sorted(unknown)}")
        values = dict(GENERATE_DEFAULTS)
        values.update({k: v for k, v in (gen or {}).items() if k in GENERATE_DEFAULTS and v is not None})
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["do_sample"] = bool(values["do_sample"])
        return cls(**values)


# The user-facing generation options and their accepted ranges, shared by the Python API (`Model.stream`,
# `load`) and every CLI command, so both reject the same values with the same message. `None` always means
# "not given" (greedy / the default). Rule: (predicate, accepted range as the message states it).
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


_OPTION_RULES = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = no top-k filter)"),
    "repetition_penalty": (lambda v: _is_real(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "threads": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),  # numpy's default_rng rejects negatives
    # counts of the toolchain commands (parity --steps, bench --repeats, eval --n)
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "repeats": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def check_options(flags: bool = False, **values) -> None:
    """Raise QvlError for the first option outside its accepted range (None = not given, always fine).

    `flags=True` names them as CLI flags (`--max-new-tokens`) instead of keyword arguments."""
    for name, value in values.items():
        ok, accepted = _OPTION_RULES[name]
        if value is not None and not ok(value):
            label = "--" + name.replace("_", "-") if flags else name
            raise QvlError(f"{label} must be {accepted}, got {value!r}")


def apply_repetition_penalty(scores: np.ndarray, token_ids: Sequence[int] | np.ndarray, penalty: float) -> np.ndarray:
    """`RepetitionPenaltyLogitsProcessor`: every id seen (prompt + generated) gets score*p if < 0, else score/p."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.unique(np.asarray(token_ids, dtype=np.int64).reshape(-1))
    ids = ids[(ids >= 0) & (ids < scores.shape[-1])]  # ids beyond the output vocab are ignored, as in transformers
    out = scores.copy()
    s = out[..., ids]
    p = np.float32(penalty)
    out[..., ids] = np.where(s < 0, s * p, s / p)
    return out


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """`TemperatureLogitsWarper`: scores / temperature (float32 division)."""
    return (np.asarray(scores, dtype=np.float32) / np.float32(temperature)).astype(np.float32)


def apply_top_k(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """`TopKLogitsWarper`: drop scores below the k-th largest (ties with the k-th are kept)."""
    scores = np.asarray(scores, dtype=np.float32)
    k = min(max(int(top_k), min_tokens_to_keep), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[..., -k, None]
    return np.where(scores < kth, _NEG_INF, scores).astype(np.float32)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis as float32 (-inf -> probability 0).

    Evaluated in float64 and rounded once, so it is the same on every CPU (numpy's float32 `exp` has
    CPU-specific SIMD paths); it is within a few float32 ULP of torch's softmax.
    """
    x = np.asarray(scores, dtype=np.float32).astype(np.float64)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """`TopPLogitsWarper`: sort ascending, drop the low tail whose cumulative probability is <= 1 - top_p."""
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    # torch's CPU cumsum accumulates float32 in double and rounds each partial sum to float32.
    cum = np.cumsum(softmax(sorted_scores).astype(np.float64), axis=-1).astype(np.float32)
    remove_sorted = cum <= np.float32(1.0 - float(top_p))
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, _NEG_INF, scores).astype(np.float32)


def apply_min_p(scores: np.ndarray, min_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """`MinPLogitsWarper`: drop tokens whose probability < min_p * max probability."""
    scores = np.asarray(scores, dtype=np.float32)
    probs = softmax(scores)
    top = np.max(probs, axis=-1, keepdims=True)
    remove = probs < np.float32(min_p) * top
    k = min(min_tokens_to_keep, probs.shape[-1])
    keep = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    np.put_along_axis(remove, keep, False, axis=-1)
    return np.where(remove, _NEG_INF, scores).astype(np.float32)


def process_logits(
    logits: np.ndarray, config: SamplingConfig, token_ids: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Apply the configured processors in transformers' order; returns float32 scores (-inf = filtered out)."""
    scores = np.asarray(logits, dtype=np.float32)
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0 and token_ids is not None:
        scores = apply_repetition_penalty(scores, token_ids, config.repetition_penalty)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            scores = apply_temperature(scores, config.temperature)
        if config.top_k is not None and config.top_k != 0:
            scores = apply_top_k(scores, config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            scores = apply_top_p(scores, config.top_p)
        if config.min_p is not None:
            scores = apply_min_p(scores, config.min_p)
    return scores


def greedy(logits: np.ndarray) -> int:
    """argmax of a `[V]` vector, first index on ties (torch.argmax semantics; NaN counts as the maximum)."""
    return int(np.argmax(np.asarray(logits).reshape(-1)))


class Sampler:
    """Seeded next-token selector: `Sampler(seed).next_token(logits, config, token_ids)`."""

    def __init__(self, seed: int | None = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def sample(self, scores: np.ndarray) -> int:
        """Draw one id from softmax(scores) (already processed); tokens at -inf are never drawn."""
        probs = softmax(np.asarray(scores, dtype=np.float32).reshape(-1)).astype(np.float64)
        cdf = np.cumsum(probs)
        total = cdf[-1]
        if not np.isfinite(total) or total <= 0:
            raise ValueError("no token has a finite score to sample from")
        u = self.rng.random() * total  # in [0, total)
        idx = int(np.searchsorted(cdf, u, side="right"))
        idx = min(idx, len(cdf) - 1)
        while probs[idx] == 0.0 and idx > 0:  # guard against round-off at the top end
            idx -= 1
        return idx

    def next_token(
        self,
        logits: np.ndarray,
        config: SamplingConfig | None = None,
        token_ids: Sequence[int] | np.ndarray | None = None,
    ) -> int:
        """Pick the next id from `[V]` logits; `token_ids` = prompt + generated so far (for repetition_penalty)."""
        config = config or SamplingConfig()
        scores = process_logits(np.asarray(logits, dtype=np.float32).reshape(-1), config, token_ids)
        if not config.do_sample:
            return greedy(scores)
        return self.sample(scores)
