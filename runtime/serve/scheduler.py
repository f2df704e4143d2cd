"""Requests -> KV slots -> generations: a bounded queue, slot choice by shared prefix, one thread per slot.

A slot is one conversation's `PrefixCache` and the model driving it; a request goes to the free slot whose kept
sequence shares the longest prefix with its prompt (at least the cache's `min_reuse` tokens), else to an empty slot,
else to the one used least recently, so a client resending its growing conversation (OpenAI's protocol is
stateless) prefills only the new turn. Vision features are shared by all slots (one `ImageCache`).

Two modes (`Scheduler.batched`):

* batched (`--max-batch N` > 1 on a runner with `batched_decode`: the CPU with the in-place GQA cache): N slots are
  N rows of one preallocated KV pool (`batching.DecodeBatcher`); up to N generations run at once and their
  one-token steps share decoder calls;
* serial (anything else, or `--max-batch 1`): generations run one at a time on the runner itself; N slots still
  keep N conversations' caches.

Each generation is the runtime's own loop (`Model.generate_ids` + the streaming detokenizer and stop strings, as
`Model.stream` does), so greedy answers are `qvl-compile run`'s. Its text pieces and its end go to the request's
asyncio queue (`Job.events`). A request whose client went away (`Job.cancel`) leaves the queue, or stops its
generation at the next token, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from qvl.errors import QvlError
from qvl.runtime.detokenize import StopStrings, StreamDecoder
from qvl.runtime.model import GenerationStats, Model
from qvl.runtime.prefix_cache import DEFAULT_IMAGE_CACHE_BYTES, ImageCache, PrefixCache
from qvl.runtime.prompt import PreparedPrompt
from qvl.runtime.sampling import SamplingConfig
from qvl.runtime.serve.openai_schema import ApiError


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class _LockedImageCache(ImageCache):
    """An ImageCache several slot threads share."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return super().get(key)

    def put(self, key, feats):
        with self._lock:
            super().put(key, feats)


@dataclass
class GenerationJob:
    prompt: PreparedPrompt
    max_tokens: int
    sampling: SamplingConfig
    seed: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    received: float = field(default_factory=time.perf_counter)  # when the request arrived (TTFT counts from here)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    slot: int = -1

    def emit(self, kind: str, value=None) -> None:
        """From a slot thread: ("delta", text) | ("done", finish_reason) | ("error", ApiError)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass


@dataclass
class _Slot:
    index: int
    model: Model
    cache: PrefixCache
    runner: object  # SlotRunner (batched) or the engine (serial)
    job: GenerationJob | None = None
    last_used: float = 0.0
    thread: threading.Thread | None = None


class Scheduler:
    def __init__(self, model: Model, max_batch: int, capacity: int, max_queue: int, metrics=None,
                 gather_timeout_s: float = 0.02, image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.model = model
        self.capacity = int(capacity)
        self.max_queue = int(max_queue)
        self.metrics = metrics
        self.batched = max_batch > 1 and bool(getattr(model.engine, "batched_decode", False))
        self.max_running = max_batch if self.batched else 1
        images = _LockedImageCache(image_cache_bytes)
        self.batcher = None
        if self.batched:
            from qvl.runtime.serve.batching import DecodeBatcher

            on_step = metrics.batch_size.observe if metrics is not None else None
            self.batcher = DecodeBatcher(model.engine, self.capacity, max_batch, gather_timeout_s=gather_timeout_s,
                                         on_step=on_step)
        self.slots: list[_Slot] = []
        for i in range(max_batch):
            cache = PrefixCache(image_cache_bytes=0)
            cache.images = images
            if self.batched:
                runner = self.batcher.runner(i)
                slot_model = copy.copy(model)  # same tokenizer, template and config; its own runner (one row)
                slot_model.runner = slot_model.engine = runner
            else:
                runner, slot_model = model.engine, model
            self.slots.append(_Slot(i, slot_model, cache, runner))
        self._cv = threading.Condition()
        self._waiting: deque[GenerationJob] = deque()
        self._running = 0
        self._closing = False
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._work, args=(slot,), name=f"qvl-slot-{slot.index}", daemon=True)
            slot.thread.start()
        if metrics is not None:
            metrics.slots.set(len(self.slots))

    # -- the queue -------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: GenerationJob) -> None:
        with self._cv:
            if self._closing:
                raise ShuttingDown()
            self._waiting.append(job)
            self._dispatch()
            if len(self._waiting) > self.max_queue:  # not taken by a free slot, and no room to wait
                self._waiting.pop()
                raise QueueFull()
            self._gauges()

    def cancel(self, job: GenerationJob) -> None:
        """The client left: drop the job if it is still waiting, else stop its generation at the next token."""
        job.cancelled.set()
        with self._cv:
            with contextlib.suppress(ValueError):
                self._waiting.remove(job)
            self._gauges()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: waiting jobs get a 503, running generations stop at their next token; the slots are freed."""
        with self._cv:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
            for slot in self.slots:
                if slot.job is not None:
                    slot.job.cancelled.set()
            self._cv.notify_all()
        for job in waiting:
            job.emit("error", ApiError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self.slots:
            if not slot.thread.is_alive():
                slot.cache.clear()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(self._running)

    def _dispatch(self) -> None:
        """Under the lock: give waiting jobs (first come, first served) to free slots."""
        while self._waiting and self._running < self.max_running:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            job.slot = self._choose(free, job).index
            self.slots[job.slot].job = job
            self._running += 1
            self._cv.notify_all()

    def _choose(self, free: list[_Slot], job: GenerationJob) -> _Slot:
        ids = job.prompt.input_ids
        shared = [(s.cache.shared_tokens(ids), s) for s in free]
        best, slot = max(shared, key=lambda t: (t[0], -t[1].index))
        if best >= slot.cache.min_reuse:
            return slot
        empty = [s for s in free if s.cache.held_tokens == 0]
        if empty:
            return empty[0]  # the lowest row: keeps a batched step's block of rows short
        return min(free, key=lambda s: (s.last_used, s.index))

    # -- the slot threads ------------------------------------------------------------------------

    def _work(self, slot: _Slot) -> None:
        while True:
            with self._cv:
                while slot.job is None and not self._closing:
                    self._cv.wait()
                if slot.job is None:
                    return
                job = slot.job
            try:
                self._generate(slot, job)
            finally:
                with self._cv:
                    slot.job = None
                    slot.last_used = time.monotonic()
                    self._running -= 1
                    if not self._closing:
                        self._dispatch()
                    self._gauges()

    def _generate(self, slot: _Slot, job: GenerationJob) -> None:
        model, stats = slot.model, job.stats
        if job.cancelled.is_set():
            job.emit("done", "cancelled")
            return
        decoder = StreamDecoder(model.prompts.tokenizer, skip_special_tokens=True)
        stops = StopStrings(job.stop)
        finish = None
        try:
            tokens = model.generate_ids(job.prompt, job.max_tokens, job.sampling, job.seed, stats=stats,
                                        cache=slot.cache)
            with contextlib.closing(tokens):
                for k, (token, _) in enumerate(tokens):
                    if k == 0 and self.metrics is not None:
                        self.metrics.ttft.observe(time.perf_counter() - job.received)
                    if job.cancelled.is_set():
                        finish = "cancelled"
                        break
                    if token in model.stop_ids:
                        break
                    piece = stops.feed(decoder.push(token))
                    if piece:
                        job.emit("delta", piece)
                    if stops.stopped:
                        finish = "stop"
                        break
            if finish is None:  # a stop id or the token limit: the held-back text is the answer's tail
                tail = stops.feed(decoder.finish()) + stops.flush()
                if tail:
                    job.emit("delta", tail)
                finish = "length" if stats.stop_reason == "max_new_tokens" else "stop"
        except QvlError as exc:
            job.emit("error", ApiError(400, str(exc), code="invalid_request"))
            return
        except Exception as exc:  # a bug: the client gets a 500, the log the traceback
            traceback.print_exc(file=sys.stderr)
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                       code="internal_error"))
            return
        finally:
            leave = getattr(slot.runner, "leave", None)
            if leave is not None:
                leave()
        if self.metrics is not None:
            self.metrics.finished(stats)
            if finish == "cancelled":
                self.metrics.cancelled.inc()
        job.emit("done", finish)
