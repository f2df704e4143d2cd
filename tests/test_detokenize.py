"""qvl.runtime.detokenize: streaming decode == full decode, no partial UTF-8, stop strings across pieces."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from qvl.runtime.detokenize import REPLACEMENT_CHAR, StopStrings, StreamDecoder, iter_decode

TEXTS = [
    "héllo ✓ 日本語 🙂",
    "plain ascii text, nothing fancy.",
    "Ünïcödé — “quotes” … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧 🇯🇵 ñ",
    "<|im_start|>assistant\n日本語の文章です。🙂<think>x</think><|im_end|><|endoftext|>",
    "a\n\n  b\t🙂🙂🙂 ✓✓",
]
IM_START, IM_END, ENDOFTEXT, IMAGE_PAD = 151644, 151645, 151643, 151655


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


def stream(tok, ids, skip=True, **kw):
    dec = StreamDecoder(tok, skip_special_tokens=skip, **kw)
    pieces = [dec.push(t) for t in ids]
    tail = dec.finish()
    return dec, pieces, tail


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_full_decode(tok, text, skip):
    ids = tok.encode(text).ids
    assert any(len(tok.decode([i])) and tok.decode([i]).endswith(REPLACEMENT_CHAR) for i in ids) or text.isascii()
    dec, pieces, tail = stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) + tail == full == dec.text
    assert tail == ""  # valid text: nothing left to flush
    assert not any(REPLACEMENT_CHAR in p for p in pieces)  # never a partial character
    if skip:
        assert "<|im_end|>" not in dec.text


def test_multibyte_held_until_complete(tok):
    ids = tok.encode("日").ids
    assert len(ids) == 3  # one byte per token in the tiny tokenizer: the worst case
    dec = StreamDecoder(tok)
    assert [dec.push(t) for t in ids] == ["", "", "日"]


def test_random_byte_soup_including_invalid_utf8(tok):
    """Arbitrary ids (invalid byte sequences, specials, merges): the concatenation still equals the decode."""
    rng = np.random.default_rng(0)
    specials = [IM_START, IM_END, ENDOFTEXT, IMAGE_PAD, 151667, 151668]
    for trial in range(40):
        n = int(rng.integers(1, 60))
        ids = rng.integers(0, 600, size=n).tolist()
        for pos in rng.integers(0, n, size=int(rng.integers(0, 4))):
            ids[int(pos)] = int(rng.choice(specials))
        for skip in (True, False):
            dec, pieces, tail = stream(tok, ids, skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), (trial, ids)


def test_iter_decode(tok):
    ids = tok.encode(TEXTS[2]).ids
    pieces = list(iter_decode(tok, ids))
    assert all(pieces) and "".join(pieces) == tok.decode(ids)


def test_trailing_incomplete_character_flushed_by_finish(tok):
    ids = tok.encode("ok 🙂").ids[:-1]  # drop the last byte of the emoji
    dec, pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "ok "
    assert tail == tok.decode(ids)[len("ok ") :] and tail.endswith(REPLACEMENT_CHAR)


# ------------------------------------------------------------------ stop strings


def reference_stop(text: str, stops, include_stop=False) -> str:
    """Brute force: the first position where any stop completes (ties: the longest), cut at its start."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end] if include_stop else text[: end - len(s)]
    return text


STOP_CASES = [
    ("héllo ✓ 日本語 🙂 end", ["日本"]),
    ("héllo ✓ 日本語 🙂 end", ["本語 🙂", "✓ 日"]),
    ("Answer: 42\nObservation: done", ["\nObservation:", "Observation"]),
    ("abcabcabd", ["abd", "cab"]),
    ("abcd", ["abcd", "bc"]),  # "bc" completes first although "abcd" starts earlier
    ("no stop here ✓", ["zzz", "✓✓"]),
    ("🙂🙂 x", ["🙂"]),
]


@pytest.mark.parametrize("text,stops", STOP_CASES)
@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_across_token_pieces(tok, text, stops, include_stop):
    ids = tok.encode(text).ids
    full = tok.decode(ids)
    expected = reference_stop(full, stops, include_stop)
    dec = StreamDecoder(tok, stop_strings=stops, include_stop=include_stop)
    out = []
    for t in ids:
        out.append(dec.push(t))
        if dec.stopped:
            break
    out.append(dec.finish())
    assert "".join(out) == expected == dec.text
    assert dec.stopped == (expected != full or any(s in full for s in stops))
    assert not any(REPLACEMENT_CHAR in p for p in out)
    assert list(iter_decode(tok, ids, stop_strings=stops, include_stop=include_stop)) == [p for p in out if p]


@pytest.mark.parametrize("text,stops", STOP_CASES)
def test_stop_strings_chunking_independent(text, stops):
    rng = np.random.default_rng(len(text))
    expected = reference_stop(text, stops)
    for _ in range(30):
        cuts = sorted(set(rng.integers(0, len(text) + 1, size=int(rng.integers(0, 6))).tolist()))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        m = StopStrings(stops)
        got = "".join(m.feed(c) for c in chunks) + m.flush()
        assert got == expected, chunks
    m = StopStrings(stops)
    for c in text:  # one character at a time: nothing past the stop is ever emitted
        m.feed(c)
    assert m.stopped == (expected != text)


def test_stop_string_holds_back_possible_prefix():
    m = StopStrings(["<|end|>"])
    assert m.feed("hello <|e") == "hello "
    assert m.feed("n") == ""
    assert m.feed("x more") == "<|enx more"
    assert m.feed(" <|end|> tail") == " "
    assert m.stopped and m.matched == "<|end|>"
    assert m.feed("later") == "" and m.flush() == ""
    m2 = StopStrings(["<|end|>"])
    assert m2.feed("ends with <|") == "ends with "
    assert m2.flush() == "<|"


def test_tokens_after_stop_are_ignored(tok):
    ids = tok.encode("one two three four").ids
    dec = StreamDecoder(tok, stop_strings=["two"])
    text = "".join(dec.push(t) for t in ids) + dec.finish()
    assert text == "one " and dec.stopped
    assert dec.push(ids[0]) == ""


def test_runtime_detokenize_imports_no_torch():
    import ast
    import inspect

    from qvl.runtime import detokenize

    tree = ast.parse(inspect.getsource(detokenize))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "transformers"}
