"""The runner of a partitioned artifact (`qvl-compile partition`): one ONNX Runtime session per decoder part, each
on the device the placement gives it; the values that cross a part boundary (the hidden state; at a fused residual
norm also the block output; the position-only tensors the first part computes) go from part to part, staying in
device memory between two parts on the same GPU and through the host otherwise.

A placement (`PartPlacement` per part, normally from `runtime/placement.make_plan`) says where each part runs and
how it stays loaded:

* `ram` / `vram`: the part's session is created once and kept (its weights in ONNX Runtime's heap on the CPU, in
  device memory on CUDA, where its `vram_limit` is the session's `gpu_mem_limit`).
* `stream`: the part's session is created for each use and dropped right after (arena off, heap trimmed), so its
  weights hold memory only while it runs. That is what bounds RSS under a RAM budget below the model's size: ONNX
  Runtime copies every initializer into its own heap at session creation (a memory-mapped weight file does not bound
  RAM by itself). Decode visits every part once per token in the same order, so an LRU of loaded parts would evict
  exactly the part needed next and reload every part every token; keeping a fixed set loaded and streaming the rest
  through one slot reloads only the streamed ones. The `Prefetcher` reads the next streamed part's pages while the
  current one runs, so its session creation reads from the page cache.
* `prefill_device`: steps of at least `prefill_min_tokens` positions run there (the part's KV cache is copied over
  and back), so a compute-heavy prefill may use the GPU for a part that decodes on the CPU.
* the vision encoder's placement (`vision_placement`): kept, or streamed per image; `exclusive` releases every kept
  part while it encodes (a RAM budget that cannot hold both).

Consecutive parts with one kept placement run as one session (`runtime/part_merge.py`: their graphs joined in
memory, the weights read from the artifact's files as before): a session's run costs a fixed ~0.2 ms on CUDA beyond
its kernels, which a decoder cut after every layer would otherwise pay 29 times a token. `join=False` keeps one
session per part. Part sessions do not spin-wait (`part_session_options`): 29 thread pools spinning took the cores from each other.
The parts' graphs are the compiled decoder's nodes unchanged, so on one device the output equals the unpartitioned
runner's bit for bit (tests/test_partition.py checks logits and tokens). Implements the runner protocol
(`base.py`) for every KV layout (`concat`, `shared`, `scatter`) on the CPU, and `concat` / `scatter` on CUDA.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qvl.artifacts.manifest import read_manifest
from qvl.artifacts.schema import DecoderPart
from qvl.artifacts.weight_store import map_embedding
from qvl.errors import QvlError
from qvl.runtime.backends.ort import _ORT_ERRORS, Engine, session_options
from qvl.runtime.backends.ort_cache import LOGIT_POSITIONS, NEXT_TOKEN, NEXT_TOKENS, _pick, ortvalue, step_feeds
from qvl.runtime.part_merge import EXTERNAL_FOLDER_KEY, group_inputs, group_outputs, merge_part_graphs, part_groups
from qvl.runtime.vision_tables import encode_per_segment

_PAST = re.compile(r"past_(key|value)_(\d+)")
_PRESENT = re.compile(r"present_(key|value)_(\d+)")
RESIDENCIES = ("ram", "vram", "stream")


@dataclass(frozen=True)
class PartPlacement:
    """Where one part runs (`device`: "cpu" | "cuda") and how it stays loaded (`residency`: see the module doc).

    `prefill_device`: where the part runs for steps of at least `PartitionedEngine.prefill_min_tokens` positions
    (prefill, vision-heavy prompts), when that differs from `device` (the decode device): compute-bound steps may use
    the GPU even for a part that does not stay there; the part's KV cache moves with it. `vram_limit`: the bytes its
    CUDA session's arena may take (ORT `gpu_mem_limit`); None: the engine's `vram_limit`, else unlimited.
    `exclusive` (the vision encoder's placement only): the kept parts' sessions are released before it runs and made
    again at the next decoder step, so a RAM budget need not hold the encoder and the decoder at once."""

    device: str = "cpu"
    residency: str = "ram"
    prefill_device: str | None = None
    vram_limit: int | None = None
    exclusive: bool = False  # the vision encoder only: every kept part is released while it runs (a RAM budget)


@dataclass
class PartitionedCache:
    """One sequence's decoder state: per part, its layers' K/V (name -> host array or OrtValue)."""

    length: int = 0
    capacity: int = 0
    batch: int = 1
    parts: list = field(default_factory=list)


class _Part:
    """One session's worth of the decoder: a part graph, or a run of consecutive parts with one placement joined
    into one graph (`part_merge`); its sessions (made on demand, one per device it runs on), its cache tensors'
    names. `members`: the manifest's part specs it runs."""

    def __init__(self, runner: "PartitionedEngine", members: list, placement: PartPlacement, others: list = ()):
        self.runner, self.members, self.placement = runner, list(members), placement
        self.device = placement.device  # the decode device: the part's KV cache lives there between steps
        self.model_bytes = None
        if len(self.members) == 1:
            self.spec = self.members[0]
            self.path = runner.manifest.graph_path(self.spec.graph)
            self.inputs, self.outputs = list(self.spec.inputs), list(self.spec.outputs)
        else:
            first, last = self.members[0], self.members[-1]
            name = f"{first.name}..{last.name}"
            self.inputs, self.outputs = group_inputs(self.members), group_outputs(self.members, list(others))
            self.spec = DecoderPart(name=name, graph="", kind=last.kind, layers=(first.layers[0], last.layers[1]),
                                    weight_bytes=sum(m.weight_bytes for m in self.members), inputs=tuple(self.inputs),
                                    outputs=tuple(self.outputs), ranges=tuple(r for m in self.members for r in m.ranges))
            self.path = runner.artifact
            self.model_bytes = merge_part_graphs([runner.manifest.graph_path(m.graph) for m in self.members],
                                                 self.inputs, self.outputs, name)
        self.past = [n for n in self.inputs if _PAST.fullmatch(n)]
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.loads = 0  # sessions created (a streamed part: once per use)

    @property
    def session(self):
        return self.sessions.get(self.device)

    def keeps(self, device: str) -> bool:
        """Whether the session on `device` stays loaded after a step: only the decode device's, unless streamed."""
        return device == self.device and self.placement.residency != "stream"

    def open(self, device: str | None = None) -> ort.InferenceSession:
        device = device or self.device
        if device not in self.sessions:
            so = part_session_options(self.runner.threads, kept=self.keeps(device))
            providers = self.runner.providers(device, self.placement.vram_limit)
            source = str(self.path)
            if self.model_bytes is not None:  # a joined group: its initializers are in the artifact's weight files
                so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(self.runner.manifest.artifact_dir))
                source = self.model_bytes
            try:
                self.sessions[device] = ort.InferenceSession(source, so, providers=providers)
            except _ORT_ERRORS as exc:
                raise QvlError(f"cannot load part {self.spec.name} of {self.runner.artifact} on {device}: "
                               f"{str(exc).splitlines()[0]}") from None
            self.loads += 1
        return self.sessions[device]

    def close(self, device: str) -> None:
        if self.sessions.pop(device, None) is not None:  # the last reference: ORT frees the session here
            release_freed_memory()

    def new_tensors(self, batch: int, capacity: int, mode: str, dtype) -> dict:
        r = self.runner
        if mode == "concat":
            shape = (batch, r.num_kv_heads, 0, r.head_dim)
            return {n: _on(np.zeros(shape, dtype), self.device) for n in self.past}
        shape = (batch, r.num_kv_heads, capacity, r.head_dim)
        # zero-filled once: positions past the held length are masked out, but 0 * NaN would still be NaN
        return {n: ortvalue(np.zeros(shape, dtype), self.device) for n in self.past}

    def run(self, values: dict, tensors: dict, mode: str, device: str) -> dict:
        """One step of this part on `device`: read its inputs from `values`, bind its cache, return its outputs
        (host arrays). The cache stays on the decode device between steps: a step elsewhere (prefill on the GPU)
        takes a copy there and brings the presents back."""
        session = self.open(device)
        away = device != self.device
        kv = {n: ortvalue(_host(t), device) for n, t in tensors.items()} if away and mode != "concat" else tensors
        io = session.io_binding()
        for name in self.inputs:
            if name in kv:
                t = kv[name]
                io.bind_ortvalue_input(name, t if isinstance(t, ort.OrtValue) and not (away and mode == "concat")
                                       else ortvalue(_host(t), device))
            elif isinstance(values[name], ort.OrtValue) and values[name].device_name().lower() == device:
                io.bind_ortvalue_input(name, values[name])  # from a part on the same device: no host round trip
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(_host(values[name])))
        for name in self.outputs:
            m = _PRESENT.fullmatch(name)
            if m and mode != "concat":
                io.bind_ortvalue_output(name, kv[f"past_{m.group(1)}_{m.group(2)}"])  # written in place
            else:
                io.bind_output(name, device)
        session.run_with_iobinding(io)
        out = {}
        for name, value in zip(self.outputs, io.get_outputs()):
            m = _PRESENT.fullmatch(name)
            if not m:  # crossing values stay on this device; they reach the host only when a CPU part reads them
                out[name] = value.numpy() if device == "cpu" else value
                continue
            key = f"past_{m.group(1)}_{m.group(2)}"
            if mode == "concat":
                tensors[key] = value.numpy() if self.device == "cpu" else (value if not away else ortvalue(value.numpy(), self.device))
            elif away:
                tensors[key].update_inplace(kv[key].numpy())
        if not self.keeps(device):
            self.close(device)
        return out


class PartitionedEngine:
    """Runner protocol over a partitioned artifact; `placement`: part name -> PartPlacement (default: all "cpu",
    "ram"), `vision_placement` for the vision encoder (default cpu, kept loaded)."""

    def __init__(self, artifact: Path, placement: dict | None = None, threads: int | None = None,
                 vision_placement: PartPlacement | None = None, vram_limit: int | None = None, prefetcher=None,
                 prefill_min_tokens: int = 32, max_positions: int | None = None, vision: bool = True,
                 join: bool = True, overlap: bool = False):
        self.artifact = Path(artifact)
        self.integrity: dict = {}
        self.manifest = read_manifest(self.artifact, summary=self.integrity)
        if self.manifest.partition is None:
            raise QvlError(f"{self.artifact} is not partitioned", hint=f"make a partitioned copy with "
                           f"`qvl-compile partition {self.artifact} --out DIR --every 1`")
        m = self.manifest.model
        self.model_info = m
        self.num_layers, self.num_kv_heads, self.head_dim = m.num_layers, m.num_kv_heads, m.head_dim
        self.hidden_size, self.num_deepstack, self.context_length = m.hidden_size, m.num_deepstack, m.context_length
        self.vocab_size = m.vocab_size
        self.kv_mode = self.manifest.kv_mode
        self.threads = threads
        self.vram_limit = vram_limit
        self.prefetcher = prefetcher
        self.prefill_min_tokens = int(prefill_min_tokens)
        # `overlap`: streamed parts are made in pairs, the second on a background thread while the first is made
        # and computes (ORT releases the GIL while it builds a session), so at most two such sessions are alive at
        # once -- the plan must hold two stream slots (`Plan.overlap`). Off: one slot, made when its turn comes.
        self.overlap = bool(overlap)
        self._maker = None  # the one background thread (made on first use)
        self.overlapped = 0  # sessions made in the background ahead of their turn
        self.live_per_use = self.max_live_per_use = 0  # per-use sessions alive now / at most (the plan's slots)
        self._live_lock = threading.Lock()
        self.max_positions = max_positions  # the KV positions a budget was planned for (None: the model's context)
        self.vision_planned = vision  # False: the plan left the vision encoder out (a text-only `run`)
        self.vision_placement = vision_placement or PartPlacement()
        placement = dict(placement or {})
        unknown = set(placement) - {p.name for p in self.manifest.partition.parts}
        if unknown:
            raise QvlError(f"the placement names parts {sorted(unknown)} that {self.artifact} does not have")
        specs = list(self.manifest.partition.parts)
        places = [placement.get(spec.name, PartPlacement()) for spec in specs]
        for name, pl in [(s.name, p) for s, p in zip(specs, places)] + [("vision", self.vision_placement)]:
            if pl.residency not in RESIDENCIES or {pl.device, pl.prefill_device or pl.device} - {"cpu", "cuda"}:
                raise QvlError(f"part {name}: placement {pl} is not one of {RESIDENCIES} on cpu/cuda")
        # `join`: consecutive parts with one placement run as one session (part_merge: the per-run cost is paid
        # once per group, not per part); False keeps a session per part (what the planner's measurement times).
        groups = part_groups(places) if join else [[i] for i in range(len(specs))]
        self.parts = [_Part(self, [specs[i] for i in g], _group_placement([places[i] for i in g]),
                            [s for j, s in enumerate(specs) if j not in g]) for g in groups]
        devices = {d for p in self.parts for d in (p.device, p.placement.prefill_device or p.device)}
        devices.add(self.vision_placement.device)
        self.device = "cuda" if devices == {"cuda"} else ("cpu" if devices == {"cpu"} else "cpu+cuda")
        self.vision_config = self.manifest.source.vision_config
        self._vision_session = None
        self.vision_inputs = [v.name for v in self.manifest.graphs["vision"].inputs]
        if self.vision_placement.residency != "stream":
            self._open_vision()
        emb = self.manifest.embedding
        if emb.quantized:
            from qvl.runtime.quantized_embedding import QuantizedEmbedding

            self.embedding = QuantizedEmbedding.from_manifest(self.artifact, emb)
        else:
            self.embedding = map_embedding(self.manifest)
        decoder_inputs = {v.name: v for v in self.manifest.graphs["decoder"].inputs}
        self.has_logit_positions = LOGIT_POSITIONS in decoder_inputs
        self.kv_dtype = np.float16 if getattr(decoder_inputs.get("past_key_0"), "dtype", None) == "float16" else np.float32
        self.max_verify_positions = self.context_length if self.has_logit_positions else 0
        self.decoder, self.caches, self.cuda_graph_note = None, None, None
        if len(self.parts) == 1 and len(specs) > 1 and self._runs_whole(self.parts[0]):
            self._open_whole(self.parts[0])
        for p in self.parts:  # kept parts load now (a load error surfaces here, not mid-answer)
            if p.placement.residency != "stream":
                p.open()

    # -- one session for every part: the artifact's whole decoder graph -----------------------------

    def _runs_whole(self, group: "_Part") -> bool:
        """Every part in one kept group, prefilling where it decodes, and never released for the vision encoder:
        then the session is the artifact's own decoder graph (the same nodes the parts were cut from) and steps go
        through the unpartitioned runner's cache binder (device-resident decode buffers, CUDA graph capture of the
        in-place caches), which the per-group path has not got: on the lent H200 the 2B all-CUDA plan decoded at
        144 tok/s joined, 295 tok/s as the whole graph."""
        pl = group.placement
        return pl.residency != "stream" and pl.prefill_device in (None, pl.device) and \
            not self.vision_placement.exclusive

    def _open_whole(self, group: "_Part") -> None:
        from qvl.runtime.backends.ort import decoder_session
        from qvl.runtime.backends.ort_cache import CacheBinder

        providers = self.providers(group.device, group.placement.vram_limit)
        try:
            self.decoder, graphed, self.cuda_graph_note = decoder_session(
                self.manifest.graph_path("decoder"), session_options(self.threads), providers, group.device,
                self.kv_mode)
        except _ORT_ERRORS as exc:
            raise QvlError(f"cannot load the decoder of {self.artifact} on {group.device}: "
                           f"{str(exc).splitlines()[0]}") from None
        if group.device == "cuda" and "CUDAExecutionProvider" not in self.decoder.get_providers():
            raise QvlError("onnxruntime's CUDA provider could not start (no usable GPU, driver or CUDA libraries)",
                           hint="check the NVIDIA driver with nvidia-smi, or plan for the CPU")
        group.sessions[group.device] = self.decoder
        group.loads += 1
        self.caches = CacheBinder(self.decoder, self, group.device)
        self.caches.cuda_graph = graphed

    def _whole_step(self, cache, inputs_embeds, position_ids, deepstack, want: str):
        bsz, seq, _ = inputs_embeds.shape
        total = cache.length + seq
        self._check_positions(total * bsz)
        if total > self.context_length:
            raise QvlError(f"sequence of {total} tokens exceeds the model context of {self.context_length}")
        feeds = step_feeds(self, inputs_embeds, position_ids, deepstack, self.caches.mask(cache, bsz, total, seq),
                           self.caches.has_logit_positions, want == "tokens")
        return self.caches.run(cache, feeds, want)

    def providers(self, device: str, vram_limit: int | None = None) -> list:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        providers = Engine._providers("cuda")
        limit = vram_limit if vram_limit is not None else self.vram_limit
        if limit is not None:  # the budget, enforced: the session's CUDA arena fails an allocation beyond it
            name, opts = providers[0]
            providers[0] = (name, {**opts, "gpu_mem_limit": str(int(limit))})
        return providers

    def _open_vision(self) -> ort.InferenceSession:
        if self._vision_session is None:
            pl = self.vision_placement
            so = part_session_options(self.threads, kept=pl.residency != "stream")
            try:
                self._vision_session = ort.InferenceSession(str(self.manifest.graph_path("vision")), so,
                                                            providers=self.providers(pl.device, pl.vram_limit))
            except _ORT_ERRORS as exc:
                raise QvlError(f"cannot load artifact graphs from {self.artifact}: {str(exc).splitlines()[0]}") from None
            if pl.device == "cuda" and "CUDAExecutionProvider" not in self._vision_session.get_providers():
                raise QvlError("onnxruntime's CUDA provider could not start (no usable GPU, driver or CUDA libraries)",
                               hint="check the NVIDIA driver with nvidia-smi, or plan for the CPU")
        return self._vision_session

    # -- embeddings and vision (as the whole-decoder runner) ---------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedding[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray):
        if not self.vision_planned:
            raise QvlError("this runner's memory plan has no room for the vision encoder (it was loaded for text only)",
                           hint="load it with vision=True, or give the image to `run` so the plan includes it")
        if self.vision_placement.exclusive:
            for part in self.parts:
                for device in list(part.sessions):
                    part.close(device)
        session = self._open_vision()
        try:
            return encode_per_segment(lambda feeds: session.run(None, feeds), pixel_values, image_grid_thw,
                                      self.vision_config, self.vision_inputs)
        finally:
            if self.vision_placement.residency == "stream":
                self._vision_session = None
                release_freed_memory()

    # -- caches --------------------------------------------------------------------------------------

    def _check_positions(self, positions: int) -> None:
        if self.max_positions is not None and positions > self.max_positions:
            raise QvlError(f"this conversation needs a KV cache of {positions} positions; the memory plan holds "
                           f"{self.max_positions}", hint=f"raise --context (the budget must then hold its KV cache), "
                           "or shorten the prompt / --max-new-tokens")

    def new_cache(self, capacity: int, batch: int = 1) -> PartitionedCache:
        cap = min(self.context_length, int(capacity))
        self._check_positions(cap * batch)
        if self.caches is not None:
            return self.caches.new_cache(cap, batch)
        return PartitionedCache(0, cap, batch, [p.new_tensors(batch, cap, self.kv_mode, self.kv_dtype) for p in self.parts])

    def free(self, cache: PartitionedCache) -> None:
        if self.caches is not None:
            return self.caches.free(cache)
        cache.parts, cache.length, cache.capacity = [], 0, 0

    def truncate(self, cache: PartitionedCache, length: int, capacity: int) -> PartitionedCache:
        """Keep the first `length` positions (see `ort_cache.CacheBinder.truncate`: concat arrays are sliced; the
        in-place layouts only hold fewer positions, or are copied into a larger cache)."""
        length = int(length)
        if not 0 <= length <= cache.length:
            raise QvlError(f"cannot truncate a KV cache of {cache.length} positions to {length}")
        if self.caches is not None:
            self._check_positions(min(self.context_length, int(capacity)) * cache.batch)
            return self.caches.truncate(cache, length, capacity)
        if self.kv_mode == "concat":
            cache.parts = [{n: _host(t)[:, :, :length].copy() if p.device == "cpu" else
                            ortvalue(_host(t)[:, :, :length], p.device) for n, t in tensors.items()}
                           for p, tensors in zip(self.parts, cache.parts)]
            cache.length = length
            return cache
        cap = min(self.context_length, int(capacity))
        self._check_positions(cap * cache.batch)
        if cap <= cache.capacity:
            cache.length = length
            return cache
        grown = self.new_cache(cap, cache.batch)
        for p, old, new in zip(self.parts, cache.parts, grown.parts):
            for n, t in old.items():
                host = _host(new[n]).copy()
                host[:, :, :length] = _host(t)[:, :, :length]
                new[n].update_inplace(host)
        grown.length = length
        self.free(cache)
        return grown

    # -- steps ---------------------------------------------------------------------------------------

    def _values(self, cache, inputs_embeds, position_ids, deepstack, all_positions: bool) -> dict:
        bsz, seq, _ = inputs_embeds.shape
        total = cache.length + seq
        self._check_positions(total * bsz)
        if total > self.context_length:
            raise QvlError(f"sequence of {total} tokens exceeds the model context of {self.context_length}")
        if self.kv_mode != "concat" and total > cache.capacity:
            raise QvlError(f"sequence of {total} tokens exceeds the preallocated cache of {cache.capacity}")
        if self.kv_mode == "scatter":
            mask = np.zeros((bsz, cache.capacity), dtype=np.int64)
            mask[:, :total] = 1
        else:
            mask = np.ones((bsz, total), dtype=np.int64)
        return step_feeds(self, inputs_embeds, position_ids, deepstack, mask, self.has_logit_positions, all_positions)

    def _device_for(self, part: _Part, seq: int) -> str:
        pre = part.placement.prefill_device
        return pre if pre and seq >= self.prefill_min_tokens else part.device

    def _run(self, cache, values: dict) -> dict:
        seq = values["inputs_embeds"].shape[1]
        devices = [self._device_for(p, seq) for p in self.parts]
        loaded_per_use = [i for i, (p, d) in enumerate(zip(self.parts, devices)) if not p.keeps(d)]
        if self.prefetcher is not None and loaded_per_use:  # the first one's pages while the kept parts compute
            self.prefetcher.prefetch_part(self.artifact, self.parts[loaded_per_use[0]].spec)
        ahead = None  # (index, future) of the per-use session being made on the background thread
        for i, (part, tensors, device) in enumerate(zip(self.parts, cache.parts, devices)):
            later = [j for j in loaded_per_use if j > i]
            if self.prefetcher is not None and later and i in loaded_per_use:  # the next one's, while this one runs
                self.prefetcher.prefetch_part(self.artifact, self.parts[later[0]].spec)
            if ahead is not None and ahead[0] == i:
                ahead[1].result()  # its session is ready (an error in making it is raised here)
                ahead = None
            if self.overlap and later and ahead is None and i in loaded_per_use and device not in part.sessions:
                # Streamed parts are made in pairs: the next one on the background thread while this one is made
                # and runs (two per-use sessions alive at most). A part made ahead starts no new one: its successor
                # would then be made beside a short compute only, and made beside its own successor instead, two
                # loads overlap (a load is ~100x a part's compute on the measured hosts).
                j = later[0]
                ahead = (j, self._background().submit(self._open_per_use, self.parts[j], devices[j]))
                self.overlapped += 1
            if i in loaded_per_use and device not in part.sessions:
                self._open_per_use(part, device)
            try:
                values.update(part.run(values, tensors, self.kv_mode, device))
            except BaseException:
                if ahead is not None:  # leave nothing made behind a failed step
                    ahead[1].result()
                    self.parts[ahead[0]].close(devices[ahead[0]])
                    self._count_live(-1)
                raise
            if i in loaded_per_use:
                self._count_live(-1)  # closed by the part after its step
        cache.length += values["inputs_embeds"].shape[1]
        return values

    def _open_per_use(self, part: "_Part", device: str) -> None:
        part.open(device)
        self._count_live(+1)

    def _count_live(self, change: int) -> None:
        with self._live_lock:
            self.live_per_use += change
            self.max_live_per_use = max(self.max_live_per_use, self.live_per_use)

    def _background(self):
        if self._maker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvl-part-open")
        return self._maker

    def step(self, cache, inputs_embeds, position_ids, deepstack=None) -> np.ndarray:
        if self.caches is not None:
            return self._whole_step(cache, inputs_embeds, position_ids, deepstack, "logits")
        out = self._run(cache, self._values(cache, inputs_embeds, position_ids, deepstack, False))
        return _pick(_host(out["logits"]), "logits")

    def greedy_step(self, cache, inputs_embeds, position_ids, deepstack=None) -> np.ndarray:
        if self.caches is not None:
            return self._whole_step(cache, inputs_embeds, position_ids, deepstack, "token")
        out = self._run(cache, self._values(cache, inputs_embeds, position_ids, deepstack, False))
        return _host(out[NEXT_TOKEN]) if NEXT_TOKEN in out else _pick(_host(out["logits"]), "token")

    def verify_step(self, cache, inputs_embeds, position_ids, deepstack=None) -> np.ndarray:
        if self.caches is not None:
            return self._whole_step(cache, inputs_embeds, position_ids, deepstack, "tokens")
        out = self._run(cache, self._values(cache, inputs_embeds, position_ids, deepstack, True))
        return _host(out[NEXT_TOKENS]) if NEXT_TOKENS in out else _pick(_host(out["logits"]), "tokens")

    # -- what the placement did ------------------------------------------------------------------------

    def residency_report(self) -> list[dict]:
        """Per manifest part: where it runs, whether its session is loaded now, how many times it was made, and
        the session (`group`: the joined parts' name, or the part's own) it runs in."""
        return [{"part": m.name, "group": "decoder" if self.caches is not None else p.spec.name, "device": p.device,
                 "prefill_device": p.placement.prefill_device or p.device, "residency": p.placement.residency,
                 "loaded": sorted(p.sessions), "loads": p.loads, "weight_bytes": m.weight_bytes}
                for p in self.parts for m in p.members]


def _group_placement(places: list) -> PartPlacement:
    """The placement of a group of parts with one placement: theirs, with the VRAM caps added up (one session)."""
    if len(places) == 1:
        return places[0]
    limits = [p.vram_limit for p in places]
    return replace(places[0], vram_limit=None if None in limits else sum(limits))


def part_session_options(threads: int | None, kept: bool = True) -> ort.SessionOptions:
    """A part's session options (the planner measures with the same): no spin-waiting, and no CPU arena for a
    session made per use, so what it allocated goes back to the OS when it is dropped."""
    so = session_options(threads)
    # One thread pool per part session: a pool that spin-waits after its part's kernels would take the cores from
    # the next part's pool (measured at 2B, 2 threads, 29 parts: decode 11x slower with spinning).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not kept:
        so.enable_cpu_mem_arena = False
    return so


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): their allocators return large frees on their own
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`). A dropped session's weights are many
    allocations below glibc's (dynamic, up to 32 MB) mmap threshold, so they were carved from the heap, and freeing
    them leaves the pages resident unless trimmed: without this, streaming does not lower RSS."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _on(arr: np.ndarray, device: str):
    """A host array where a part on `device` binds it: the array itself on the CPU, a device OrtValue on CUDA."""
    return arr if device == "cpu" else ortvalue(arr, device)


def _host(t) -> np.ndarray:
    return t.numpy() if isinstance(t, ort.OrtValue) else t
