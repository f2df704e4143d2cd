"""Prompt-lookup drafting and greedy acceptance (runtime/speculative.py), exact cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from qvl.runtime.speculative import DraftConfig, accept, propose


def test_drafts_what_followed_the_most_recent_longest_match():
    #        0  1  2  3  4  5  6  7  8  9  10 11
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # tail (6, 7) occurs at 6..7 (followed by 2, 3, 6, 7) and at 1..2; the most recent wins.
    assert propose(seq, DraftConfig(max_draft=3, max_ngram=2, min_ngram=2)) == [2, 3, 6]
    # a longer n-gram beats a more recent shorter one: (1, 6, 7) never recurs, (x, 6, 7)... only 2-grams here
    seq2 = [1, 2, 3, 4, 9, 9, 2, 3, 5, 1, 2, 3]
    assert propose(seq2, DraftConfig(max_draft=2, max_ngram=3, min_ngram=2)) == [4, 9]  # 3-gram (1, 2, 3) at 0
    assert propose(seq2, DraftConfig(max_draft=2, max_ngram=2, min_ngram=2)) == [5, 1]  # 2-gram (2, 3) at 6


def test_no_match_no_draft_and_window_bounds_the_search():
    assert propose([1, 2, 3, 4, 5]) == []
    assert propose([7]) == [] and propose([]) == []
    seq = [1, 2, 3] + [0] * 50 + [1, 2]
    assert propose(seq, DraftConfig(max_draft=1, min_ngram=2)) == [3]
    assert propose(seq, DraftConfig(max_draft=1, min_ngram=2, window=20)) == []


def test_accept_keeps_the_matching_prefix_and_adds_the_correction():
    assert accept([4, 5, 6], [4, 5, 6, 7]) == ([4, 5, 6, 7], 3)  # all accepted + the bonus token
    assert accept([4, 5, 6], [4, 9, 6, 7]) == ([4, 9], 1)  # d2 rejected: the model's own choice replaces it
    assert accept([4, 5, 6], [8, 5, 6, 7]) == ([8], 0)
    assert accept([], [3]) == ([3], 0)
    with pytest.raises(ValueError):
        accept([1, 2], [1, 2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=8), st.lists(st.integers(0, 5), min_size=1, max_size=9))
def test_accepted_tokens_are_what_one_token_greedy_would_emit(draft, greedy):
    """Whatever the drafts, the produced tokens are a prefix of the verify step's own greedy choices."""
    greedy = (greedy * 9)[: len(draft) + 1]
    out, n = accept(draft, greedy)
    assert out == greedy[: n + 1] and out[:n] == draft[:n] and 1 <= len(out) <= len(draft) + 1


def test_config_validation():
    for bad in (dict(max_draft=0), dict(min_ngram=0), dict(max_ngram=1, min_ngram=2), dict(window=1)):
        with pytest.raises(ValueError):
            DraftConfig(**bad)
