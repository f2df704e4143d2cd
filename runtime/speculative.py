"""Exact speculative decoding by prompt lookup: draft tokens from the sequence itself, verify them in one step.

Drafting (no second model): take the last `n` tokens of the sequence (prompt + generated so far), find their most
recent earlier occurrence, and propose the up to `k` tokens that followed it — longest n first (`max_ngram` down to
`min_ngram`). Copy-heavy answers (OCR, extraction, quoting or editing the prompt) repeat long spans, so drafts are
often right; free-form answers rarely match and then nothing is drafted (a plain one-token step). When the
occurrence overlaps the tail (the sequence ends in a repeating pattern of period p: a loop, a run of one token, a
table's separators), what followed it is only p tokens long; the draft continues the period up to `k` tokens.

Verification: one decoder step over `[t, d1, ..., dk]` (t = the token just chosen) returns the greedy choice after
each of those positions, `g0 .. gk`. `d1` is kept iff `g0 == d1`, `d2` iff additionally `g1 == d2`, and so on;
the first mismatch position's `g` is the next token. Every kept token is exactly what one-token greedy decoding
would have produced from the same prefix, so the output is greedy-identical by construction (up to floating-point
differences between a k+1-position step and k+1 one-position steps, which the tests measure). The cache then holds
positions for the rejected drafts too: the caller truncates it back to the accepted length.

`propose` scans the window on every call (the reference); `PromptLookup` keeps an index of every n-gram's most
recent occurrence and drafts exactly what `propose` drafts in O(max_ngram) per token (what `runtime/model.py` uses).

Where it helps: a verify step costs one read of the weights like a one-token step, plus the compute of k+1
positions, and on a memory-bound device (a GPU, the 2B model on the CPU at low thread counts) produces 1 + accepted
tokens for about the price of one -- copy-heavy answers (OCR, extraction, quoting or editing the prompt, repeating
an earlier answer) gain most. Where it does not: free-form answers draft rarely (no draft: a plain one-token step,
no cost but the lookup) and, when they do, mostly wrongly, so a step pays for k+1 positions and keeps one token; on
a compute-bound device (ORT CPU's int8/int4 kernels at M > 1 cost more than at M = 1) a rejected draft is a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DraftConfig:
    max_draft: int = 8  # k: most tokens verified per step (one decoder step runs k + 1 positions)
    max_ngram: int = 4
    min_ngram: int = 2  # a 1-token match drafts too often in ordinary text
    window: int = 4096  # search only the last `window` tokens (bounded work per step)

    def __post_init__(self):
        if self.max_draft < 1 or self.min_ngram < 1 or self.max_ngram < self.min_ngram or self.window < 2:
            raise ValueError(f"invalid draft config {self}")


def propose(tokens: list[int], config: DraftConfig = DraftConfig()) -> list[int]:
    """Up to `max_draft` tokens that followed the most recent earlier occurrence of the sequence's last n-gram."""
    seq = tokens[-config.window:]
    n_max = min(config.max_ngram, len(seq) - 1)
    for n in range(n_max, config.min_ngram - 1, -1):
        tail = seq[-n:]
        # most recent occurrence that ends before the tail itself and has at least one token after it
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                follow = seq[start + n:start + n + config.max_draft]
                if follow:
                    return _periodic(follow, config.max_draft)
    return []


def _periodic(follow: list[int], k: int) -> list[int]:
    """`follow` (shorter than k only when it runs to the sequence's end: the last `len(follow)` tokens repeat with
    that period) continued periodically to k tokens."""
    return list(follow) if len(follow) >= k else (list(follow) * (k // len(follow) + 1))[:k]


class PromptLookup:
    """`propose` over a growing sequence, incrementally: `extend(tokens)` as they arrive, `propose()` drafts.

    For each n in [min_ngram, max_ngram] a map n-gram -> start of its most recent occurrence that has a follower
    (every n-gram but the sequence's own tail), updated once per appended token; a query looks the tail up per n,
    longest first, and accepts an occurrence that starts inside the last `window` tokens -- the occurrences
    `propose` would find (when the most recent one lies outside the window, so do all older ones)."""

    def __init__(self, config: DraftConfig = DraftConfig(), tokens: list[int] | None = None):
        self.config = config
        self.tokens: list[int] = []
        self._last: dict[int, dict[tuple, int]] = {n: {} for n in range(config.min_ngram, config.max_ngram + 1)}
        if tokens:
            self.extend(tokens)

    def extend(self, tokens) -> None:
        seq = self.tokens
        for tok in tokens:
            i = len(seq)  # the new token's index: the n-grams ending at i - 1 now have a follower
            for n, last in self._last.items():
                if i >= n:
                    last[tuple(seq[i - n:i])] = i - n
            seq.append(int(tok))

    def propose(self, max_draft: int | None = None) -> list[int]:
        """Up to `min(max_draft, config.max_draft)` drafted tokens (what `propose(self.tokens, config)` returns)."""
        cfg, seq = self.config, self.tokens
        k = cfg.max_draft if max_draft is None else min(cfg.max_draft, max_draft)
        if k < 1:
            return []
        lo = max(0, len(seq) - cfg.window)
        for n in range(min(cfg.max_ngram, len(seq) - 1), cfg.min_ngram - 1, -1):
            start = self._last[n].get(tuple(seq[-n:]))
            if start is not None and start >= lo:
                return _periodic(seq[start + n:start + n + k], k)
        return []


def accept(draft: list[int], greedy: list[int]) -> tuple[list[int], int]:
    """(tokens produced by this step, drafts accepted). `greedy[i]` is the argmax after position i of the verify step
    (position 0 = the token fed before the drafts); len(greedy) == len(draft) + 1."""
    if len(greedy) != len(draft) + 1:
        raise ValueError(f"{len(greedy)} greedy ids for {len(draft)} drafts")
    n = 0
    while n < len(draft) and greedy[n] == draft[n]:
        n += 1
    return list(draft[:n]) + [greedy[n]], n


@dataclass
class SpeculationStats:
    steps: int = 0  # verify steps run (each one decoder call)
    drafted: int = 0
    accepted: int = 0
    per_step: list[int] = field(default_factory=list)  # tokens produced by each step

    @property
    def tokens_per_step(self) -> float:
        return sum(self.per_step) / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None,
                "tokens_per_step": self.tokens_per_step}
