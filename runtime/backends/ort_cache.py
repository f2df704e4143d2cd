"""KV caches of the ONNX Runtime runner, and how one decoder step is bound to them (I/O binding).

Three decoder layouts (the manifest's `decoder.kv_mode`):

* `concat` (the plain export): `present = concat(past, new)`; each step's presents become the next step's
  pasts. On the CPU these are numpy arrays; on CUDA device OrtValues that never leave the device.
* `shared` (GroupQueryAttention): one `[batch, kv_heads, capacity, head_dim]` buffer per layer and K/V, bound
  as both past and present; the op writes the new positions in place. `attention_mask` is `[batch, total]`.
* `scatter` (TensorScatter + ONNX Attention, the fp32 CUDA form): the same in-place buffers, but
  `attention_mask` is `[batch, capacity]` (ones for the held positions, zeros for the free tail), so a decode
  step's inputs always have the same shapes: on CUDA the decode step's inputs and outputs are preallocated
  device OrtValues updated in place, which is what CUDA graph replay needs.

On CUDA a one-token step of either in-place layout runs on preallocated device I/O with the mask as wide as the
cache (for `shared`, GroupQueryAttention then reads the held length from the mask's sum and the capacity as its
total sequence length, as onnxruntime-genai binds it for graph capture), so both layouts replay CUDA graphs.
Prefill chunks (and the CPU) use the variable-width mask described above.

`CacheBinder.truncate` cuts a cache back to a prefix for the prefix cache (`runtime/prefix_cache.py`): `concat`
arrays are sliced; the in-place layouts just hold fewer positions (the mask decides what is read), or are copied
into a larger cache when the next prompt needs more room.

On CUDA nothing but the new positions' embeddings, their position ids and the mask crosses PCIe per step
(kilobytes); logits stay on the device unless asked for, and greedy decoding reads only the graph's
`next_token` (an on-device ArgMax, added at compile time for CUDA targets) back: 8 bytes per token.

Which positions get logits is the decoder's `logit_positions` input (graphs exported before it existed have
none and return the last position's): a step asks for its last position, a speculative verify step
(`want="tokens"`) for all of them and reads back the argmax after each one -- the graph's `next_tokens`
(`[B, P]`, on the device) when it has it, else the logits, argmax-ed on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import time

import numpy as np
import onnxruntime as ort

from qvl.errors import QvlError

NEXT_TOKEN = "next_token"
NEXT_TOKENS = "next_tokens"  # [B, P]: argmax of every requested position's logits (CUDA targets)
LOGIT_POSITIONS = "logit_positions"  # decoder input [P]: which of the step's positions get logits


@dataclass
class KVCache:
    """Decoder state of one sequence: cached keys/values and how many positions they hold."""

    length: int = 0
    tensors: list = field(default_factory=list)  # concat: arrays / OrtValues; shared, scatter: OrtValues
    capacity: int = 0
    buffers: list = field(default_factory=list)  # host arrays behind CPU OrtValues (kept alive)
    decode: "DecodeBuffers | None" = None  # CUDA scatter: the fixed decode-step I/O
    graph_id: int = -1  # CUDA graph captured for this cache's buffers (-1: none)
    batch: int = 1


@dataclass
class DecodeBuffers:
    """Device OrtValues for a one-token step of a fixed-capacity cache, allocated once per cache."""

    inputs: dict  # name -> OrtValue (inputs_embeds, position_ids, attention_mask, deepstack_embeds[, logit_positions])
    logits: ort.OrtValue
    next_token: ort.OrtValue | None
    next_tokens: ort.OrtValue | None = None


def step_feeds(runner, inputs_embeds, position_ids, deepstack, mask: np.ndarray, has_logit_positions: bool,
               all_positions: bool) -> dict:
    """A decoder step's inputs as host arrays (the whole-decoder `Engine` and the partitioned runner build them the
    same way): DeepStack zeros when the step has none, `logit_positions` for the last position only or all of them
    (a speculative verify step), which a graph without that input cannot give."""
    bsz, seq, _ = inputs_embeds.shape
    if deepstack is None:
        deepstack = np.zeros((runner.num_deepstack, bsz, seq, runner.hidden_size), dtype=np.float32)
    feeds = {
        "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=np.float32),
        "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        "attention_mask": mask,
        "deepstack_embeds": np.ascontiguousarray(deepstack, dtype=np.float32),
    }
    if has_logit_positions:
        feeds[LOGIT_POSITIONS] = np.arange(seq, dtype=np.int64) if all_positions else np.array([seq - 1], np.int64)
    elif all_positions:
        raise QvlError(f"the decoder graph of {runner.artifact} returns the last position's logits only: "
                       "speculative decoding cannot verify drafts with it",
                       hint="re-compile it from the checkpoint with this qvl-compile version")
    return feeds


def ortvalue(arr: np.ndarray, device: str) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, 0)


class CacheBinder:
    """Allocates caches for one decoder session and binds a step to them (see the module docstring)."""

    def __init__(self, session: ort.InferenceSession, engine, device: str):
        self._engine = engine
        self.device = device  # "cpu" | "cuda"
        self.mode = engine.kv_mode
        self.layers = engine.num_layers
        self.kv_heads, self.head_dim = engine.num_kv_heads, engine.head_dim
        self.hidden, self.num_deepstack = engine.hidden_size, engine.num_deepstack
        self.context_length = engine.context_length
        types = {i.name: i.type for i in session.get_inputs()}
        self.kv_dtype = np.float16 if types.get("past_key_0") == "tensor(float16)" else np.float32
        self.outputs = [o.name for o in session.get_outputs()]
        self.has_next_token = NEXT_TOKEN in self.outputs
        self.has_next_tokens = NEXT_TOKENS in self.outputs
        self.has_logit_positions = LOGIT_POSITIONS in types
        self.vocab = engine.vocab_size
        self.cuda_graph = False  # set by the engine when the session was created with graph capture
        self._pool: list[KVCache] = []  # freed device caches, reused (their buffers and captured graph) as-is
        self._graph_ids = 0
        self._options: dict[int, ort.RunOptions] = {}
        # One-token steps: seconds inside ORT's Run (launches + device work + sync) and in the whole step call
        # (plus input updates and the read-back); the bench reports host time per step from these.
        self.decode_timing = {"steps": 0, "run_s": 0.0, "step_s": 0.0}

    @property
    def session(self):
        # Read through the engine: calibration (toolchain/quant/calibration.py) swaps `engine.decoder` for a
        # session wrapper that taps activations, and every step must go through whatever is there now.
        return self._engine.decoder

    # -- caches ----------------------------------------------------------------------------------

    def capacity_for(self, capacity: int) -> int:
        cap = min(self.context_length, int(capacity))
        if self.mode != "concat" and self.device == "cuda":
            # Rounded up so consecutive requests of similar length reuse one buffer set and its CUDA graph.
            cap = min(self.context_length, -(-cap // 64) * 64)
        return cap

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        if self.mode == "concat":
            shape = (batch, self.kv_heads, 0, self.head_dim)
            empty = np.zeros(shape, dtype=self.kv_dtype)
            tensors = [empty if self.device == "cpu" else ortvalue(empty, self.device) for _ in range(2 * self.layers)]
            return KVCache(0, tensors, 0, batch=batch)
        cap = self.capacity_for(capacity)
        for i, cached in enumerate(self._pool):
            if cached.capacity >= cap and cached.batch == batch:
                self._pool.pop(i)
                cached.length = 0
                return cached
        shape = (batch, self.kv_heads, cap, self.head_dim)
        # Zero-filled once: positions past the held length are masked out, but 0 * NaN would still be NaN.
        arrays = [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.layers)]
        values = [ortvalue(a, self.device) for a in arrays]
        cache = KVCache(0, values, cap, arrays if self.device == "cpu" else [], batch=batch)
        if self.device == "cuda":
            cache.buffers = []  # the device copies are the cache; the host zeros can go
            cache.decode = self._decode_buffers(cap, batch)
        return cache

    def _decode_buffers(self, cap: int, batch: int) -> DecodeBuffers:
        d = self.device
        inputs = {
            "inputs_embeds": ortvalue(np.zeros((batch, 1, self.hidden), np.float32), d),
            "position_ids": ortvalue(np.zeros((3, batch, 1), np.int64), d),
            "attention_mask": ortvalue(np.zeros((batch, cap), np.int64), d),
            "deepstack_embeds": ortvalue(np.zeros((self.num_deepstack, batch, 1, self.hidden), np.float32), d),
        }
        if self.has_logit_positions:
            inputs[LOGIT_POSITIONS] = ortvalue(np.zeros((1,), np.int64), d)
        logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, self.vocab), np.float32, d, 0)
        token = ort.OrtValue.ortvalue_from_shape_and_type((batch,), np.int64, d, 0) if self.has_next_token else None
        tokens = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1), np.int64, d, 0) if self.has_next_tokens else None
        return DecodeBuffers(inputs, logits, token, tokens)

    def free(self, cache: KVCache) -> None:
        if self.device == "cuda" and self.mode != "concat" and cache.capacity and not self._pool:
            self._pool.append(KVCache(0, cache.tensors, cache.capacity, [], cache.decode, cache.graph_id, cache.batch))
        self._release(cache)

    @staticmethod
    def _release(cache: KVCache) -> None:
        cache.tensors, cache.buffers, cache.decode = [], [], None
        cache.length = cache.capacity = 0

    def truncate(self, cache: KVCache, length: int, capacity: int) -> KVCache:
        """Keep the first `length` positions of `cache`, with room for `capacity` positions in all.

        * `concat`: the held arrays are sliced to `length` (copies: numpy on the CPU; on CUDA through the host,
          device OrtValues cannot be sliced in place), so the next step's presents grow from there.
        * `shared`, `scatter`: only the held length changes when the buffers have the room: positions past it are
          masked out and written over by the next steps (GroupQueryAttention writes at the mask's held length,
          TensorScatter at the write index the mask gives). Without the room, a cache of the new capacity is
          allocated and the prefix copied into it (numpy on the CPU; on CUDA through the host), the old one is
          released (not pooled: it is too small)."""
        length = int(length)
        if not 0 <= length <= cache.length:
            raise QvlError(f"cannot truncate a KV cache of {cache.length} positions to {length}")
        if self.mode == "concat":
            if length < cache.length:
                cache.tensors = [self._prefix(t, length) for t in cache.tensors]
            cache.length = length
            return cache
        if self.capacity_for(capacity) <= cache.capacity:
            cache.length = length
            return cache
        grown = self.new_cache(capacity, cache.batch)
        try:
            for i, (src, dst) in enumerate(zip(cache.tensors, grown.tensors)):
                if self.device == "cpu":  # the OrtValues wrap these host arrays
                    grown.buffers[i][:, :, :length] = cache.buffers[i][:, :, :length]
                else:
                    host = np.zeros(tuple(dst.shape()), dtype=self.kv_dtype)
                    host[:, :, :length] = src.numpy()[:, :, :length]
                    dst.update_inplace(host)
        except BaseException:
            self._release(grown)
            raise
        self._release(cache)
        grown.length = length
        return grown

    def _prefix(self, tensor, length: int):
        if self.device == "cpu":
            return np.ascontiguousarray(tensor[:, :, :length])
        return ortvalue(tensor.numpy()[:, :, :length], self.device)

    # -- rows of one pool (continuous batching, `runtime/serve/batching.py`) -------------------------

    def row_caches(self, pool: KVCache) -> list[KVCache]:
        """One batch-1 cache per row of a CPU `shared` cache `pool`: its buffers are numpy views of the pool's rows,
        so what a batch-1 step writes into a row cache (prefill) is that row of the pool, and `run_rows` can step
        consecutive rows together. Other layouts / devices: a QvlError (host numpy views are the aliasing used here)."""
        if self.device != "cpu" or self.mode != "shared" or not pool.buffers:
            raise QvlError(f"batched decoding needs the CPU and the in-place GQA cache (this is {self.device}, "
                           f"{self.mode})")
        rows = []
        for b in range(pool.batch):
            arrays = [a[b:b + 1] for a in pool.buffers]  # contiguous views (row-major, axis 0)
            rows.append(KVCache(0, [ortvalue(a, "cpu") for a in arrays], pool.capacity, arrays, batch=1))
        return rows

    def run_rows(self, pool: KVCache, first: int, rows: list[KVCache], feeds: dict) -> np.ndarray:
        """One decoder step over the consecutive rows `first .. first + len(rows)` of `pool` (`rows` are their
        `row_caches`, each at its own length): the last position's logits [R, V]. GroupQueryAttention reads each
        row's held length from its mask row (`seqlens_k`) and writes its new K/V there; lengths are not changed
        (the caller advances the rows it meant to step)."""
        io = self.session.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        io.bind_output("logits", "cpu")
        for name, has in ((NEXT_TOKEN, self.has_next_token), (NEXT_TOKENS, self.has_next_tokens)):
            if has:
                io.bind_output(name, "cpu")
        end = first + len(rows)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                block = ortvalue(pool.buffers[2 * i + j][first:end], "cpu")  # aliases the pool's rows
                io.bind_ortvalue_input(f"past_{kind}_{i}", block)
                io.bind_ortvalue_output(f"present_{kind}_{i}", block)
        self.session.run_with_iobinding(io, None)
        return _pick(io.get_outputs()[0].numpy(), "logits")

    # -- one step --------------------------------------------------------------------------------

    def mask(self, cache: KVCache, bsz: int, total: int, seq: int) -> np.ndarray:
        if self.mode == "scatter" or (cache.decode is not None and seq == 1):
            m = np.zeros((bsz, cache.capacity), dtype=np.int64)
            m[:, :total] = 1
            return m
        return np.ones((bsz, total), dtype=np.int64)

    def run(self, cache: KVCache, feeds: dict, want: str) -> np.ndarray:
        """Run one step with `feeds` (host arrays); return the last position's logits [B, V] (fp32) when
        `want` is "logits", its argmax ids [B] (int64) when "token", the argmax ids [B, P] (int64) of every
        position `feeds["logit_positions"]` names when "tokens" (a speculative verify step)."""
        seq = feeds["inputs_embeds"].shape[1]
        total = cache.length + seq
        if self.mode != "concat" and total > cache.capacity:
            raise QvlError(f"sequence of {total} tokens exceeds the preallocated cache of {cache.capacity}")
        if self.device == "cpu" and self.mode == "concat":
            return self._run_concat_host(cache, feeds, want)
        if cache.decode is not None and seq == 1:
            out = self._run_decode(cache, feeds, want)
        else:
            out = self._run_bound(cache, feeds, want)
        cache.length = total
        return out

    def _run_concat_host(self, cache: KVCache, feeds: dict, want: str) -> np.ndarray:
        for i in range(self.layers):
            feeds[f"past_key_{i}"] = cache.tensors[2 * i]
            feeds[f"past_value_{i}"] = cache.tensors[2 * i + 1]
        names = [n for n in self.outputs if n not in (NEXT_TOKEN, NEXT_TOKENS)]
        outs = dict(zip(names, self.session.run(names, feeds)))
        cache.tensors = [outs[f"present_{kind}_{i}"] for i in range(self.layers) for kind in ("key", "value")]
        cache.length += feeds["inputs_embeds"].shape[1]
        return _pick(outs["logits"], want)

    def _bind_cache(self, io, cache: KVCache) -> None:
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buf = cache.tensors[2 * i + j]
                io.bind_ortvalue_input(f"past_{kind}_{i}", buf)
                if self.mode == "concat":
                    io.bind_output(f"present_{kind}_{i}", self.device)
                else:
                    io.bind_ortvalue_output(f"present_{kind}_{i}", buf)

    def _run_bound(self, cache: KVCache, feeds: dict, want: str) -> np.ndarray:
        """A step of any length with ORT allocating the outputs (prefill; CPU in-place modes; CUDA concat)."""
        io = self.session.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        on_device = (want == "token" and self.has_next_token) or (want == "tokens" and self.has_next_tokens)
        io.bind_output("logits", self.device if on_device else "cpu")
        if self.has_next_token:
            io.bind_output(NEXT_TOKEN, "cpu")
        if self.has_next_tokens:
            io.bind_output(NEXT_TOKENS, "cpu")
        self._bind_cache(io, cache)
        self.session.run_with_iobinding(io, self._run_options(-1))
        outs = dict(zip(self.outputs_bound(), io.get_outputs()))
        if self.mode == "concat":
            cache.tensors = [outs[f"present_{kind}_{i}"] for i in range(self.layers) for kind in ("key", "value")]
        if want == "token" and self.has_next_token:
            return outs[NEXT_TOKEN].numpy()
        if want == "tokens" and self.has_next_tokens:
            return outs[NEXT_TOKENS].numpy()
        return _pick(outs["logits"].numpy(), want)

    def outputs_bound(self) -> list[str]:
        """Output names in the order `_run_bound` binds them (io.get_outputs() follows binding order)."""
        head = ["logits"] + [n for n, has in ((NEXT_TOKEN, self.has_next_token), (NEXT_TOKENS, self.has_next_tokens)) if has]
        return head + [f"present_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    def _run_decode(self, cache: KVCache, feeds: dict, want: str) -> np.ndarray:
        """A one-token CUDA step into the cache's preallocated device buffers (replayed as a CUDA graph when the
        session captures graphs: same buffers, same shapes, every step)."""
        t0 = time.perf_counter()
        dec = cache.decode
        for name, value in dec.inputs.items():
            value.update_inplace(np.ascontiguousarray(feeds[name]))
        io = self.session.io_binding()
        for name, value in dec.inputs.items():
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output("logits", dec.logits)
        if dec.next_token is not None:
            io.bind_ortvalue_output(NEXT_TOKEN, dec.next_token)
        if dec.next_tokens is not None:
            io.bind_ortvalue_output(NEXT_TOKENS, dec.next_tokens)
        self._bind_cache(io, cache)
        if self.cuda_graph and cache.graph_id < 0:
            self._graph_ids += 1
            cache.graph_id = self._graph_ids
        t_run = time.perf_counter()
        self.session.run_with_iobinding(io, self._run_options(cache.graph_id if self.cuda_graph else -1))
        t_ran = time.perf_counter()
        if want == "token" and dec.next_token is not None:
            out = dec.next_token.numpy()
        elif want == "tokens" and dec.next_tokens is not None:
            out = dec.next_tokens.numpy()
        else:
            out = _pick(dec.logits.numpy(), want)
        timing = self.decode_timing
        timing["steps"] += 1
        timing["run_s"] += t_ran - t_run
        timing["step_s"] += time.perf_counter() - t0
        return out

    def _run_options(self, graph_id: int) -> ort.RunOptions | None:
        if not self.cuda_graph:
            return None
        if graph_id not in self._options:
            ro = ort.RunOptions()
            # -1: run without capturing (prefill, odd shapes); n: capture once, then replay graph n.
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._options[graph_id] = ro
        return self._options[graph_id]


def _pick(logits: np.ndarray, want: str) -> np.ndarray:
    """From a step's logits [B, P, V] (host): the last row's logits [B, V] ("logits"), its argmax [B] ("token"),
    or every row's argmax [B, P] ("tokens"). numpy's argmax takes the first index on ties, as ONNX ArgMax does."""
    if want == "tokens":
        return np.argmax(logits, axis=-1)
    last = logits[:, -1, :]
    return last.astype(np.float32, copy=False) if want == "logits" else np.argmax(last, axis=-1)
