"""Continuous batching: concurrent generations share decoder steps, each in its own row of one preallocated cache.

`DecodeBatcher` owns a pool of `rows` KV slots (`Engine.row_pool`: one `[rows, kv_heads, capacity, head_dim]`
buffer per layer, a batch-1 view cache per row). Every generation runs the ordinary `Model.generate_ids` loop in its
own thread on a `SlotRunner`: the runner protocol over one row. Prefill chunks (and anything with DeepStack
features) run as batch-1 steps on the row, as they would alone; a one-token step is handed to the batcher
(`SlotRunner.step` / `greedy_step` -> `DecodeBatcher.decode`), which runs the one-token steps of every sequence
that is decoding as ONE decoder call over the consecutive rows they occupy (`Engine.batched_step`), then hands each
its logits. A sequence joins at its first one-token step and leaves when its generation ends; nothing waits for a
batch to fill: a step runs as soon as every decoding sequence has asked for its next one (or after
`gather_timeout_s`, so one slow thread cannot stall the rest).

Rows between the lowest and highest row stepped that are not decoding are stepped too (a decoder call takes one
contiguous block of rows): a zero embedding whose K/V lands at the row's first free position, which is past what
the row holds and is written over by whatever that row runs next; its logits are dropped. Lengths stay < capacity
because every generation on a row asks for at most `capacity` positions (prompt + max_new_tokens) and holds at most
`capacity - 1` afterwards (the last token is never fed back).

Exactness: on fp32 artifacts GroupQueryAttention on the CPU computes every row with its own length (`seqlens_k`)
and the fp32 GEMMs reduce each row along the same K order whatever the batch, so a row's logits are bit-identical
to running it alone (tests/test_serve.py compares the tokens of interleaved arrivals with solo runs). Where qvl's
kernel library runs the int4/int8 decoder (runtime/kernels) every node computes a row alone: the linears per row,
attention row by row (`RowwiseGroupQueryAttention`), so batched rows are bit-identical too. ORT's own MatMulNBits
(the fallback) uses another kernel at M > 1, so batched logits can differ in the last bits there (measured on the
tiny int4 model: up to 1.1e-5 on logits of magnitude ~10), like a different prefill chunk: a greedy token can
flip only at a near-tie.

One engine lock serialises every decoder/vision call (batched steps and other sequences' prefills), so the CPU
threads of one ORT run are never shared with another run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from qvl.errors import QvlError


@dataclass
class _Pending:
    embeds: np.ndarray  # [1, 1, H]
    position_ids: np.ndarray  # [3, 1, 1]
    logits: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class DecodeBatcher:
    """The shared decoder steps of up to `rows` sequences (see the module docstring)."""

    def __init__(self, engine, capacity: int, rows: int, lock: threading.Lock | None = None,
                 gather_timeout_s: float = 0.02, on_step=None):
        if not getattr(engine, "batched_decode", False):
            raise QvlError(f"batched decoding is not available on this runner ({engine.device}, {engine.kv_mode})")
        self.engine = engine
        self.capacity = int(capacity)
        self.pool, self.rows = engine.row_pool(self.capacity, int(rows))
        self.lock = lock or threading.Lock()  # the engine lock: one ORT run at a time
        self.gather_timeout_s = float(gather_timeout_s)
        self.on_step = on_step  # called with the number of sequences of each batched step (metrics)
        self._cv = threading.Condition()
        self._active: set[int] = set()  # rows decoding: each will ask for its next step
        self._pending: dict[int, _Pending] = {}
        self._stepping = False
        self._step_end = 0.0
        self.steps = 0
        self.sequences_stepped = 0

    @property
    def pool_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.pool.buffers))

    def runner(self, row: int) -> "SlotRunner":
        return SlotRunner(self, row)

    # -- the rendezvous --------------------------------------------------------------------------

    def decode(self, row: int, embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """The logits [1, V] of one new position of `row` (stepped together with the other decoding rows)."""
        item = _Pending(embeds, position_ids)
        with self._cv:
            self._active.add(row)
            self._pending[row] = item
            self._cv.notify_all()
            submitted = time.monotonic()
            while not item.done:
                if self._stepping or row not in self._pending:
                    self._cv.wait()  # a step is running (ours or not): it notifies when it ends
                    continue
                # the others get gather_timeout_s from when they could last ask (the end of the previous step)
                wait = max(submitted, self._step_end) + self.gather_timeout_s - time.monotonic()
                if self._active <= self._pending.keys() or wait <= 0:
                    batch, self._pending = self._pending, {}
                    self._stepping = True
                    break
                self._cv.wait(timeout=wait)
            else:
                return self._result(item)
        try:  # this thread leads the step for everyone in `batch`
            self._step(batch)
        finally:
            with self._cv:
                self._stepping = False
                self._step_end = time.monotonic()
                for p in batch.values():
                    p.done = True
                self._cv.notify_all()
        return self._result(item)

    def leave(self, row: int) -> None:
        """`row`'s generation ended: no later step waits for it."""
        with self._cv:
            self._active.discard(row)
            self._cv.notify_all()

    @staticmethod
    def _result(item: _Pending) -> np.ndarray:
        if item.error is not None:
            raise item.error
        return item.logits

    def _step(self, batch: dict[int, _Pending]) -> None:
        first, last = min(batch), max(batch)
        rows = self.rows[first:last + 1]
        hidden = next(iter(batch.values())).embeds.shape[-1]
        embeds = np.zeros((len(rows), 1, hidden), dtype=np.float32)
        positions = np.zeros((3, len(rows), 1), dtype=np.int64)
        for r, cache in enumerate(rows):
            item = batch.get(first + r)
            if item is None:  # filler row: its first free position, a plain text position
                positions[:, r, 0] = cache.length
            else:
                embeds[r] = item.embeds[0]
                positions[:, r] = item.position_ids[:, 0]
        try:
            with self.lock:
                logits = self.engine.batched_step(self.pool, first, rows, embeds, positions)
        except BaseException as exc:
            for item in batch.values():
                item.error = exc
            return
        for row, item in batch.items():
            self.rows[row].length += 1
            item.logits = logits[row - first][None]
        self.steps += 1
        self.sequences_stepped += len(batch)
        if self.on_step is not None:
            self.on_step(len(batch))


class SlotRunner:
    """The runner protocol (`runtime/backends/base.Runner`) over one row of a `DecodeBatcher`'s pool.

    `new_cache` hands out the row (empty), `truncate` keeps a prefix of it, `free` empties it (its buffers belong to
    the pool); one-token steps go through the batcher, every other call straight to the engine (under its lock)."""

    def __init__(self, batcher: DecodeBatcher, row: int):
        self._batcher = batcher
        self._engine = batcher.engine
        self.row = row
        self.cache = batcher.rows[row]
        e = self._engine
        self.artifact, self.manifest, self.model_info = e.artifact, e.manifest, e.model_info
        self.kv_mode, self.device = e.kv_mode, e.device
        self.context_length = batcher.capacity
        self.max_verify_positions = 0  # the server does not speculate

    def embed(self, ids):
        return self._engine.embed(ids)

    def encode_images(self, pixel_values, image_grid_thw):
        with self._batcher.lock:
            return self._engine.encode_images(pixel_values, image_grid_thw)

    def _own(self, cache) -> None:
        if cache is not self.cache:
            raise QvlError("a slot runner steps only its own row of the pool")

    def new_cache(self, capacity: int, batch: int = 1):
        if batch != 1 or capacity > self._batcher.capacity:
            raise QvlError(f"{capacity} positions do not fit a slot of {self._batcher.capacity}")
        self.cache.length = 0
        return self.cache

    def truncate(self, cache, length: int, capacity: int):
        self._own(cache)
        if capacity > self._batcher.capacity:
            raise QvlError(f"{capacity} positions do not fit a slot of {self._batcher.capacity}")
        if not 0 <= length <= cache.length:
            raise QvlError(f"cannot truncate a KV cache of {cache.length} positions to {length}")
        cache.length = int(length)
        return cache

    def free(self, cache) -> None:
        cache.length = 0  # the buffers stay the pool's

    def _one_token(self, inputs_embeds, deepstack) -> bool:
        return inputs_embeds.shape[0] == 1 and inputs_embeds.shape[1] == 1 and deepstack is None

    def step(self, cache, inputs_embeds, position_ids, deepstack=None):
        self._own(cache)
        if self._one_token(inputs_embeds, deepstack):
            return self._batcher.decode(self.row, inputs_embeds, position_ids)
        with self._batcher.lock:
            return self._engine.step(cache, inputs_embeds, position_ids, deepstack)

    def greedy_step(self, cache, inputs_embeds, position_ids, deepstack=None):
        # The CPU engine's greedy_step is the host argmax of step's logits (first index on ties): the same here.
        return np.argmax(self.step(cache, inputs_embeds, position_ids, deepstack), axis=-1)

    def verify_step(self, cache, inputs_embeds, position_ids, deepstack=None):
        raise QvlError("the server does not decode speculatively")

    def leave(self) -> None:
        self._batcher.leave(self.row)
