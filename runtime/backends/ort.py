"""ONNX Runtime backend (provider "cpu" or "cuda"): vision encoder, embedding lookup, KV-cached decoder.

`Engine` implements the runner protocol of `runtime/backends/base.py`; `select.py` decides when it is built.
The decoder's KV layouts (`concat`, `shared`, `scatter`) and the I/O binding of a step live in `ort_cache.py`.

On CUDA the caches, the decode step's inputs and its logits are device OrtValues; a `scatter` artifact (the
`cuda-sm61` target) additionally gets its session created with CUDA graph capture, falling back to plain
launches (with the reason kept in `Engine.cuda_graph_note`) when ORT refuses it for this graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qvl.artifacts.manifest import read_manifest
from qvl.artifacts.weight_store import map_embedding
from qvl.errors import QvlError
from qvl.runtime.backends.ort_cache import LOGIT_POSITIONS, CacheBinder, KVCache, step_feeds
from qvl.runtime.vision_tables import encode_per_segment

_ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
               ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, ort.capi.onnxruntime_pybind11_state.NotImplemented,
               ort.capi.onnxruntime_pybind11_state.RuntimeException)


def physical_cores() -> int:
    """Physical core count (hyper-threads don't help these memory-bound kernels)."""
    try:
        siblings = set()
        cpus = sorted(int(c[3:]) for c in os.listdir("/sys/devices/system/cpu") if c[3:].isdigit())
        for c in cpus:
            p = f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"
            with open(p) as f:
                siblings.add(f.read().strip())
        return max(1, len(siblings))
    except OSError:
        return max(1, (os.cpu_count() or 2) // 2)


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def cpu_decoder_source(path: Path, so: ort.SessionOptions, choice) -> tuple[str | bytes, str]:
    """What to open the CPU decoder session from, and which int4 kernel it runs (`runtime/kernels`): the graph file
    itself (ORT's MatMulNBits), or, when qvl's kernel library is active, the graph proto with its eligible
    MatMulNBits swapped to `qvl.kernels::MatMulNBitsAvx2` and the layers' glue fused (`kernels/fuse.py`), as bytes
    whose external weights ORT reads from the graph's own folder (nothing is written). `so` gets the library
    registered in that case."""
    if not choice.active:
        return str(path), choice.note
    import onnx

    from qvl.runtime import kernels
    from qvl.runtime.kernels import fuse
    from qvl.runtime.part_merge import EXTERNAL_FOLDER_KEY

    model = onnx.load(str(path), load_external_data=False)
    swapped = kernels.rewrite(model)
    if swapped == 0:
        return str(path), "ORT MatMulNBits (no symmetric accuracy-level-4 MatMulNBits the kernel takes in this decoder)"
    left = sum(1 for n in kernels.all_nodes(model.graph) if n.op_type == "MatMulNBits")
    note = f"{choice.note}: {swapped} linears" + (f", {left} on ORT MatMulNBits" if left else "")
    if fuse.enabled():
        note += f"; {fuse.fuse(model).summary()}"
    so.register_custom_ops_library(str(choice.library))
    so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(path).parent))
    return model.SerializeToString(), note


def decoder_session(path: Path, so: ort.SessionOptions, providers: list, device: str, kv_mode: str):
    """(session, captures CUDA graphs, why not or None). Graph capture is asked for on CUDA for in-place-cache
    artifacts (`scatter`, `shared`), whose decode steps have fixed shapes and bound buffers; ORT refuses it when any
    node of the graph would run on the CPU, and then the session is made again without it."""
    note = None
    if device == "cuda" and kv_mode != "concat" and os.environ.get("QVL_CUDA_GRAPH", "1") != "0":
        name, opts = providers[0]
        try:
            graphed = [(name, {**opts, "enable_cuda_graph": "1"}), *providers[1:]]
            return ort.InferenceSession(str(path), so, providers=graphed), True, None
        except _ORT_ERRORS as exc:
            note = f"CUDA graphs off: {str(exc).splitlines()[0][:200]}"
    elif device == "cuda":
        note = f"CUDA graphs off: the {kv_mode} KV layout has no fixed-shape decode step"
    return ort.InferenceSession(str(path), so, providers=providers), False, note


class Engine:
    """The ONNX Runtime runner: `device` "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider)."""

    def __init__(self, artifact: Path, device: str = "cpu", threads: int | None = None):
        self.artifact = Path(artifact)
        self.device = device
        self.threads = threads
        # Schema, paths, graph and side-file hashes, and the weight store's chunk digests (skipped when this
        # machine's verified record for the store matches); `integrity["weights"]` is 'cached' or 'verified'.
        self.integrity: dict = {}
        self.manifest = read_manifest(self.artifact, summary=self.integrity)
        m = self.manifest.model
        self.model_info = m
        self.num_layers = m.num_layers
        self.num_kv_heads = m.num_kv_heads
        self.head_dim = m.head_dim
        self.hidden_size = m.hidden_size
        self.num_deepstack = m.num_deepstack
        self.context_length = m.context_length
        self.kv_mode = self.manifest.kv_mode
        self.vision_config = self.manifest.source.vision_config
        providers = self._providers(device)
        files, so, self.optimized_graphs = self._graph_files(device, threads)
        self.cuda_graph_note: str | None = None
        try:
            self.vision = ort.InferenceSession(str(self.artifact / files["vision"]), so, providers=providers)
            # One call per image / video frame; a previous (packed) graph also takes `segment_ids`.
            self.vision_inputs = [i.name for i in self.vision.get_inputs()]
            self.decoder, cuda_graph = self._decoder_session(self.artifact / files["decoder"], so, providers)
        except _ORT_ERRORS as exc:
            raise QvlError(f"cannot load artifact graphs from {self.artifact}: {str(exc).splitlines()[0]}") from None
        if device == "cuda" and "CUDAExecutionProvider" not in self.decoder.get_providers():
            # ORT falls back to the CPU silently when the CUDA provider cannot start (no GPU, driver, CUDA libs).
            raise QvlError("onnxruntime's CUDA provider could not start (no usable GPU, driver or CUDA libraries)",
                           hint="check the NVIDIA driver with nvidia-smi, or use --device cpu")
        emb = self.manifest.embedding
        # [precision pass] a quantized tied lm_head leaves no fp32 matrix: embed from its MatMulNBits rows.
        if emb.quantized:
            from qvl.runtime.quantized_embedding import QuantizedEmbedding

            self.embedding = QuantizedEmbedding.from_manifest(self.artifact, emb)
        else:
            self.embedding = map_embedding(self.manifest)
        self.vocab_size = m.vocab_size
        self._decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        self._decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        self.caches = CacheBinder(self.decoder, self, device)
        self.caches.cuda_graph = cuda_graph
        # Speculative decoding needs logits of several positions per step: graphs with `logit_positions` (0: an
        # artifact exported before that input existed, which returns the last position's logits only).
        self.max_verify_positions = self.context_length if self.caches.has_logit_positions else 0

    def _decoder_session(self, path: Path, so: ort.SessionOptions, providers: list):
        if self.device == "cpu":
            from qvl.runtime import kernels

            dso = self._options(self.threads)
            dso.graph_optimization_level = so.graph_optimization_level
            source, self.kernel_note = cpu_decoder_source(path, dso, kernels.choose())
            return ort.InferenceSession(source, dso, providers=providers), False
        self.kernel_note = "ORT CUDA MatMulNBits"
        session, graphed, self.cuda_graph_note = decoder_session(path, so, providers, self.device, self.kv_mode)
        return session, graphed

    def _graph_files(self, device: str, threads: int | None) -> tuple[dict, ort.SessionOptions, bool]:
        """The graphs to load: ORT's saved optimized graphs when this ORT wrote them for this provider
        (then optimization is off at load: it already ran), else the plain graphs, optimized at load."""
        so = self._options(threads)
        plain = self.manifest.graph_files()
        opt = self.manifest.ort_optimized
        if device == "cpu" and opt is not None and opt.usable(ort.__version__, plain):
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return {name: g.file for name, g in opt.graphs.items()}, so, True
        return plain, so, False

    def _options(self, threads: int | None) -> ort.SessionOptions:
        so = session_options(threads)
        if self.manifest.int8_kit:
            # An INT8 engine kit's explicit Q/DQ graphs are TensorRT's to run (int8 GEMMs accumulating in
            # int32). ORT's CPU would fuse them into its U8S8 integer kernels, which can saturate on AVX2 and
            # then differ from the quantized model by far more than quantization does; computing Q/DQ as
            # written (fp32 fake quantization) is what TensorRT's result should match.
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        return so

    @staticmethod
    def _providers(device: str) -> list:
        available = ort.get_available_providers()
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise QvlError("device 'cuda' needs onnxruntime-gpu: this onnxruntime has no CUDA provider",
                               hint="pip install onnxruntime-gpu (and check the NVIDIA driver with nvidia-smi)")
            # TF32 off: fp32 artifacts must compute in fp32 (parity), Ampere+ would otherwise round to TF32.
            # The arena grows by what is asked, not by doubling: on a 2 GB card the slack matters.
            opts = {"use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}
            return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        raise QvlError(f"unknown ONNX Runtime device {device!r}", hint="use cpu or cuda")

    # -- embeddings and vision --------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings gathered from the memory-mapped store (the lm_head's own matrix)."""
        return np.asarray(self.embedding[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """One vision call per attention segment (image / video frame), outputs concatenated in order."""
        return encode_per_segment(lambda feeds: self.vision.run(None, feeds), pixel_values, image_grid_thw,
                                  self.vision_config, self.vision_inputs)

    # -- decoder ---------------------------------------------------------------------------------

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """An empty cache able to hold `capacity` positions (prompt + new tokens), on this engine's device."""
        return self.caches.new_cache(capacity, batch)

    def _feeds(self, cache: KVCache, inputs_embeds, position_ids, deepstack, all_positions: bool = False) -> dict:
        bsz, seq, _ = inputs_embeds.shape
        total = cache.length + seq
        if total > self.context_length:
            raise QvlError(f"sequence of {total} tokens exceeds the model context of {self.context_length}")
        return step_feeds(self, inputs_embeds, position_ids, deepstack, self.caches.mask(cache, bsz, total, seq),
                          self.caches.has_logit_positions, all_positions)

    def step(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,  # [B, S, H]
        position_ids: np.ndarray,  # [3, B, S]
        deepstack: np.ndarray | None = None,  # [n_ds, B, S, H]
    ) -> np.ndarray:
        """Run S new positions through the decoder, extend `cache`; return last-position logits [B, V]."""
        return self.caches.run(cache, self._feeds(cache, inputs_embeds, position_ids, deepstack), "logits")

    def greedy_step(self, cache: KVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step`, returning the argmax ids [B] of the last position (on the device when the graph has it)."""
        return self.caches.run(cache, self._feeds(cache, inputs_embeds, position_ids, deepstack), "token")

    def verify_step(self, cache: KVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step`, returning the argmax ids [B, S] after every one of the S positions (speculative verification;
        on the device when the graph has `next_tokens`)."""
        feeds = self._feeds(cache, inputs_embeds, position_ids, deepstack, all_positions=True)
        return self.caches.run(cache, feeds, "tokens")

    # -- several sequences per step (continuous batching; not part of the runner protocol) ----------

    @property
    def batched_decode(self) -> bool:
        """Whether `row_pool` / `batched_step` work: the CPU with the in-place GQA cache, whose `seqlens_k` (from the
        mask's row sums) lets every row of a batch hold a different length. Other layouts cannot: `concat` caches of
        one batch share one length, and the CUDA caches' row blocks would have to be bound by device pointer (not written)."""
        return self.device == "cpu" and self.kv_mode == "shared"

    def row_pool(self, capacity: int, rows: int) -> tuple[KVCache, list[KVCache]]:
        """A preallocated cache of `rows` sequences of `capacity` positions each, and one batch-1 cache per row (views
        into it: `step`, `greedy_step`, `truncate` work on them as on any cache; `truncate` must keep within
        `capacity`, and `free` on a row releases nothing)."""
        pool = self.caches.new_cache(capacity, rows)
        return pool, self.caches.row_caches(pool)

    def batched_step(self, pool: KVCache, first: int, rows: list[KVCache], inputs_embeds: np.ndarray,
                     position_ids: np.ndarray) -> np.ndarray:
        """One new position for each of the consecutive rows of `pool` from `first` (`rows`: their row caches, any
        lengths < capacity; inputs_embeds [R, 1, H], position_ids [3, R, 1]): the logits [R, V]. Each row's K/V go
        to its own length; row lengths are left as they were (the caller advances the ones it stepped). A row's
        numbers are the ones a batch-1 step of it gives (the kernels work row by row; tests/test_serve.py checks
        the tokens)."""
        lengths = [r.length for r in rows]
        if max(lengths) + 1 > pool.capacity:
            raise QvlError(f"sequence of {max(lengths) + 1} tokens exceeds the preallocated cache of {pool.capacity}")
        mask = np.zeros((len(rows), max(lengths) + 1), dtype=np.int64)
        for r, n in enumerate(lengths):
            mask[r, :n + 1] = 1
        feeds = {
            "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=np.float32),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "attention_mask": mask,
            "deepstack_embeds": np.zeros((self.num_deepstack, len(rows), 1, self.hidden_size), dtype=np.float32),
        }
        if self.caches.has_logit_positions:
            feeds[LOGIT_POSITIONS] = np.array([0], np.int64)
        return self.caches.run_rows(pool, first, rows, feeds)

    def truncate(self, cache: KVCache, length: int, capacity: int) -> KVCache:
        """Keep the first `length` positions, with room for `capacity` (see `ort_cache.CacheBinder.truncate`)."""
        return self.caches.truncate(cache, length, capacity)

    def free(self, cache: KVCache) -> None:
        """Release a cache's buffers; the cache is empty after. On CUDA the last freed in-place cache is kept
        for the next `new_cache` of at most its capacity (its device buffers and captured graph reused)."""
        self.caches.free(cache)
