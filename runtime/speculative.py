"""Exact speculative decoding by prompt lookup: draft tokens from the sequence itself, verify them in one step.

Drafting (no second model): take the last `n` tokens of the sequence (prompt + generated so far), find their most
recent earlier occurrence, and propose the up to `k` tokens that followed it — longest n first (`max_ngram` down to
`min_ngram`). Copy-heavy answers (OCR, extraction, quoting or editing the prompt) repeat long spans, so drafts are
often right; free-form answers rarely match and then nothing is drafted (a plain one-token step).

Verification: one decoder step over `[t, d1, ..., dk]` (t = the token just chosen) returns the greedy choice after
each of those positions, `g0 .. gk`. `d1` is kept iff `g0 == d1`, `d2` iff additionally `g1 == d2`, and so on;
the first mismatch position's `g` is the next token. Every kept token is exactly what one-token greedy decoding
would have produced from the same prefix, so the output is greedy-identical by construction (up to floating-point
differences between a k+1-position step and k+1 one-position steps, which the tests measure). The cache then holds
positions for the rejected drafts too: the caller truncates it back to the accepted length.
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
                    return list(follow)
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
