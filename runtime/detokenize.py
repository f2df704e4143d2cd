"""Incremental detokenization and stop strings.

`StreamDecoder` turns token ids into text pieces as they arrive. Byte-level BPE tokens can split a
multi-byte UTF-8 character; the decoder then yields U+FFFD for the incomplete tail, so a piece is held
back until the decoded window no longer ends with U+FFFD. The concatenation of all pieces (plus
`finish()`) equals `tokenizer.decode(all_ids, skip_special_tokens=...)`.

Decoding uses a sliding window (`ids[prefix:]` minus `ids[prefix:read]`, the scheme of TGI/vLLM), so each
step costs O(window), not O(total). Offsets only advance at points where the decoded text is complete,
which keeps byte-level decoding compositional there.

`StopStrings` scans the emitted text for stop strings across piece boundaries: text that could be the
start of a stop string is held back, and on a match nothing at or past the stop is emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class StopStrings:
    """Streaming stop-string matcher.

    The stop point is the first place in the stream where any stop string completes (ties: the longest
    one), so the result does not depend on how the text was chunked. `feed()` returns the text that is safe
    to emit; after a match it returns the text before the stop (or through it with `include_stop=True`)
    and then "" forever. `flush()` returns what is still held back once the stream ends without a match.
    """

    def __init__(self, stop_strings: Iterable[str], include_stop: bool = False):
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self.include_stop = include_stop
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + piece
        if not self.stop_strings:
            return buf
        match = None  # (end, -len, start, stop)
        for s in self.stop_strings:
            i = buf.find(s)
            if i >= 0:
                cand = (i + len(s), -len(s), i, s)
                if match is None or cand < match:
                    match = cand
        if match is not None:
            end, _, start, s = match
            self.stopped, self.matched, self._held = True, s, ""
            return buf[: end if self.include_stop else start]
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out


class StreamDecoder:
    """Incremental detokenizer over a `tokenizers.Tokenizer`.

    `push(id)` returns the new text ("" while a character is incomplete or the id decodes to nothing);
    `finish()` returns whatever is still held (e.g. a trailing invalid byte as U+FFFD). With
    `stop_strings`, output is cut at the first stop (see `StopStrings`) and `stopped` turns True.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] | None = None,
        include_stop: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # window start: decoded text before it has been emitted and is complete
        self._read = 0  # ids[prefix:read] decode to text that has been emitted already
        self._emitted: list[str] = []  # raw decoded text emitted so far (before stop-string filtering)
        self._stops = StopStrings(stop_strings or (), include_stop=include_stop) if stop_strings else None
        self._text: list[str] = []  # text returned to the caller

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def stopped(self) -> bool:
        return self._stops is not None and self._stops.stopped

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return "".join(self._text)

    def _out(self, raw: str) -> str:
        if raw:
            self._emitted.append(raw)
        out = self._stops.feed(raw) if self._stops is not None else raw
        if out:
            self._text.append(out)
        return out

    def push(self, token_id: int) -> str:
        if self.stopped:
            self.token_ids.append(int(token_id))
            return ""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.token_ids[self._prefix : self._read])
        new_text = self._decode(self.token_ids[self._prefix :])
        if not new_text or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # incomplete character (or nothing yet): hold
        if new_text.startswith(prefix_text):
            piece = new_text[len(prefix_text) :]
        else:  # a decoder that is not compositional over the window: fall back to a full decode
            full = self._decode(self.token_ids)
            piece = full[len("".join(self._emitted)) :]
        self._prefix, self._read = self._read, len(self.token_ids)
        return self._out(piece)

    def finish(self) -> str:
        """Flush the held tail at end of generation; the total output then equals the full decode."""
        out = ""
        if not self.stopped and self._read < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self._prefix : self._read])
            new_text = self._decode(self.token_ids[self._prefix :])
            if new_text.startswith(prefix_text):
                piece = new_text[len(prefix_text) :]
            else:
                piece = self._decode(self.token_ids)[len("".join(self._emitted)) :]
            self._prefix, self._read = self._read, len(self.token_ids)
            out = self._out(piece)
        if self._stops is not None:
            tail = self._stops.flush()
            if tail:
                self._text.append(tail)
            out += tail
        return out


def iter_decode(
    tokenizer: Tokenizer,
    token_ids: Iterable[int],
    skip_special_tokens: bool = True,
    stop_strings: Sequence[str] | None = None,
    include_stop: bool = False,
) -> Iterator[str]:
    """Yield the non-empty text pieces of `token_ids` as `StreamDecoder` would emit them (stops at a stop string)."""
    dec = StreamDecoder(
        tokenizer, skip_special_tokens=skip_special_tokens, stop_strings=stop_strings, include_stop=include_stop
    )
    for t in token_ids:
        piece = dec.push(t)
        if piece:
            yield piece
        if dec.stopped:
            return
    tail = dec.finish()
    if tail:
        yield tail
