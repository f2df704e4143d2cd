"""TensorRT backend: an engine kit's engines behind the runner protocol (`runtime/backends/base.py`).

UNTESTED ON HARDWARE. This module has never run on a GPU: the development machines have none, and
TensorRT 8.6 (the last TensorRT for Pascal SM 6.1) cannot be installed there. What is tested without a
GPU is the pure logic below the `TrtEngine` class -- profile selection, prefill/decode chunk planning,
host dtype mapping, buffer sizing -- and that engines built for another GPU (TensorRT-RTX proof builds)
are refused. Treat `TrtEngine` as a reviewed sketch until it has been run against `qvl-compile parity`
on an SM 6.1 machine.

Design: the runner protocol (`embed`, `encode_images`, `new_cache`, `step`, `truncate`, `free`), so `runtime.model.Model`
can drive it. The decoder engine is the kit's concat-form graph: `past_*` in, `present_* = concat(past,
new)` out. A cache is two preallocated device buffers of `context_length` positions per layer and K/V;
each step binds one as `past` and the other as `present` and then swaps them (ping-pong), so nothing is
allocated or copied on the host per token. A `[1, kv_heads, L, head_dim]` tensor bound to a buffer
occupies its first `L * kv_heads * head_dim` floats, which is exactly what the previous step's
`present` wrote. Steps are split into chunks that fit the engine's profiles (`plan_step`): the prefill
profile for multi-token chunks, the decode profile for single tokens. Only the v3 execution API is used
(`set_input_shape` / `set_tensor_address` / `execute_async_v3`), which TensorRT 8.6 and 10 share; the
only version difference handled is TensorRT 8.6 turning INT64 inputs into INT32 bindings (the engine's
tensor dtype is queried, host arrays are cast to it). Device memory and copies use cuda-python
(`pip install cuda-python`); tensorrt and cuda-python are imported lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvl.artifacts.manifest import read_manifest
from qvl.artifacts.schema import load_kit
from qvl.artifacts.weight_store import map_embedding
from qvl.errors import QvlError

ENGINES_DIR = "engines"
BUILD_REPORT = "build.json"

_HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                "BOOL": np.bool_, "UINT8": np.uint8}


# -- pure logic (tested without a GPU) ----------------------------------------------------------


def host_dtype(trt_dtype_name: str) -> np.dtype:
    try:
        return np.dtype(_HOST_DTYPES[trt_dtype_name])
    except KeyError:
        raise QvlError(f"engine tensor dtype {trt_dtype_name} has no host equivalent") from None


def to_engine_dtype(arr: np.ndarray, trt_dtype_name: str) -> np.ndarray:
    """Contiguous host array in the engine tensor's dtype (TensorRT 8.6 binds INT64 inputs as INT32)."""
    dt = host_dtype(trt_dtype_name)
    if dt == np.int32 and arr.dtype == np.int64 and arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
        raise QvlError("an int64 input does not fit the engine's int32 binding")
    return np.ascontiguousarray(arr, dtype=dt)


@dataclass(frozen=True)
class DecoderLimits:
    """What the decoder engine's two profiles accept (from the kit's profile dims)."""

    context: int
    prefill_seq: int
    prefill_past: int
    decode_past: int
    # most `logit_positions` of one prefill-profile call (a speculative verify step); 0: kits made before the
    # decoder had that input
    verify_positions: int = 0

    @classmethod
    def from_kit(cls, kit) -> "DecoderLimits":
        """From the manifest's `Kit` (or a raw kit section, validated first)."""
        kit = load_kit(kit)
        profiles = {p["name"]: p["dims"] for p in kit.graphs["decoder"].profiles}
        pre, dec = profiles["prefill"], profiles["decode"]
        verify = int(pre["positions"][2]) if "positions" in pre else 0
        return cls(context=int(kit.context_length), prefill_seq=int(pre["seq"][2]), prefill_past=int(pre["past"][2]),
                   decode_past=int(dec["past"][2]), verify_positions=verify)


def plan_step(past: int, seq: int, limits: DecoderLimits) -> list[tuple[str, int, int]]:
    """Split `seq` new positions after `past` cached ones into (profile, offset, length) engine calls."""
    if seq < 1:
        raise QvlError("a decoder step needs at least one new position")
    if past + seq > limits.context:
        raise QvlError(f"sequence of {past + seq} tokens exceeds the engine's context of {limits.context}",
                       hint="re-make the kit for a card with more memory, or shorten the prompt")
    plan, off = [], 0
    while off < seq:
        p, n = past + off, seq - off
        if n > 1 and p <= limits.prefill_past:
            take = min(n, limits.prefill_seq)
            plan.append(("prefill", off, take))
        else:  # one position: the decode profile (also the tail a prefill profile cannot take)
            if p > limits.decode_past:
                raise QvlError(f"position {p} is beyond the decode profile (max past {limits.decode_past})")
            take = 1
            plan.append(("decode", off, 1))
        off += take
    return plan


@dataclass(frozen=True)
class Copy2D:
    """One `cudaMemcpy2D`: `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` bytes apart."""

    width: int
    height: int
    src_pitch: int
    dst_pitch: int


def truncation_copy(heads: int, head_dim: int, itemsize: int, held: int, keep: int) -> Copy2D | None:
    """The copy that turns a ping-pong buffer holding `[1, heads, held, head_dim]` (contiguous: the layout depends on
    the held length) into one holding its first `keep` positions as `[1, heads, keep, head_dim]`: one row per head,
    `keep * head_dim` elements of every `held * head_dim`. None when nothing needs to move (keep is 0, or all)."""
    if not 0 <= keep <= held:
        raise QvlError(f"cannot truncate a KV cache of {held} positions to {keep}")
    if keep == 0 or keep == held:
        return None
    row = head_dim * itemsize
    return Copy2D(width=keep * row, height=heads, src_pitch=held * row, dst_pitch=keep * row)


def select_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose min..max box holds every given input shape."""
    for i, p in enumerate(profiles):
        ok = True
        for name, shape in shapes.items():
            s = p["shapes"].get(name)
            if s is None or len(s["min"]) != len(shape) or any(
                not (lo <= d <= hi) for d, lo, hi in zip(shape, s["min"], s["max"])
            ):
                ok = False
                break
        if ok:
            return i
    desc = "; ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    ranges = "; ".join(f"{p['name']}: " + ", ".join(f"{k} {v[0]}..{v[2]}" for k, v in p["dims"].items()) for p in profiles)
    raise QvlError(f"input shapes ({desc}) fit no optimization profile of the engine ({ranges})",
                   hint="use smaller images or shorter chunks, or re-make the kit")


def max_bytes(profiles: list[dict], name: str, itemsize: int) -> int:
    """Largest byte size of input `name` over all profiles (staging buffers are sized once)."""
    return max(int(np.prod(p["shapes"][name]["max"])) * itemsize for p in profiles if name in p["shapes"])


# -- device helpers ---------------------------------------------------------------------------------


class _Cuda:
    """The few CUDA runtime calls the runner needs, through cuda-python."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise QvlError("the TensorRT runner needs cuda-python for device memory", hint="pip install cuda-python") from None
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.handle = int(self.stream)  # TensorRT takes the raw cudaStream_t value

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise QvlError(f"CUDA error: {self.rt.cudaGetErrorName(err)[1].decode()}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(int(nbytes), 256))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, dst: int, arr: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, self.stream))

    def d2d_2d(self, dst: int, src: int, copy: "Copy2D") -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._ok(self.rt.cudaMemcpy2DAsync(dst, copy.dst_pitch, src, copy.src_pitch, copy.width, copy.height, kind,
                                           self.stream))

    def d2h(self, arr: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))


def _import_tensorrt():
    for module in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"):
        try:
            return __import__(module)
        except ImportError:
            continue
    raise QvlError("TensorRT is not installed: cannot run engines", hint="pip install 'tensorrt==8.6.1' on the Pascal machine")


@dataclass
class TrtKVCache:
    """Ping-pong device buffers: `buffers[i][current]` holds the cache of tensor i (K/V per layer)."""

    length: int = 0
    capacity: int = 0
    buffers: list = field(default_factory=list)  # [(ptr_a, ptr_b)] in decoder I/O order
    current: int = 0


class _EngineIO:
    """One deserialized engine + one execution context + staging buffers for its inputs."""

    def __init__(self, trt, runtime, path: Path, profiles: list[dict], cuda: _Cuda):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise QvlError(f"TensorRT could not load {path.name} (built by another TensorRT version or for another GPU)",
                           hint="rebuild with `qvl-compile build-engine` on this machine")
        self.context = self.engine.create_execution_context()
        self.profiles = profiles
        self.cuda = cuda
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtypes = {n: self.engine.get_tensor_dtype(n).name for n in self.names}
        self.staging = {}
        self.active_profile = None

    def stage(self, name: str, arr: np.ndarray) -> int:
        arr = to_engine_dtype(arr, self.dtypes[name])
        if name not in self.staging:
            self.staging[name] = self.cuda.malloc(max_bytes(self.profiles, name, arr.itemsize))
        self.cuda.h2d(self.staging[name], arr)
        self.context.set_input_shape(name, arr.shape)
        self.context.set_tensor_address(name, self.staging[name])
        return self.staging[name]

    def use_profile(self, index: int) -> None:
        if self.active_profile != index:
            self.context.set_optimization_profile_async(index, self.cuda.handle)
            self.active_profile = index

    def run(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise QvlError("TensorRT execution failed")


def _read_build_report(build_path: Path, engines: Path) -> dict:
    """The engines' build report, with every engine file inside `engines` and matching its recorded sha256
    (hashed once per file and machine: the verified record in the user cache skips it on warm starts)."""
    from qvl.artifacts import integrity

    try:
        build = json.loads(build_path.read_text("utf-8"))
        entries = build["engines"]
        files = {name: (e["file"], e["sha256"]) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QvlError(f"corrupt engine build report {build_path}: {exc}",
                       hint="rebuild the engines with `qvl-compile build-engine`") from None
    for name, (file, sha) in files.items():
        path = integrity.contained(engines, file, f"{name} engine")
        if not path.is_file():
            raise QvlError(f"engine file missing: {path}", hint="rebuild the engines with `qvl-compile build-engine`")
        integrity.verify_sha256(path, str(sha), f"TensorRT {name} engine")
    return build


class TrtEngine:
    """The kit's engines behind the runner protocol (see the module docstring: untested on hardware)."""

    def __init__(self, kit_dir: Path, engines_dir: Path | None = None, vision: str = "auto", threads: int | None = None):
        self.artifact = Path(kit_dir)
        self.device = "trt"
        self.integrity: dict = {}
        self.manifest = read_manifest(self.artifact, summary=self.integrity)
        self.kit = self.manifest.kit
        if self.kit is None:
            raise QvlError(f"{kit_dir} is not a TensorRT engine kit")
        engines = Path(engines_dir) if engines_dir else self.artifact / ENGINES_DIR
        build_path = engines / BUILD_REPORT
        if not build_path.is_file():
            raise QvlError(f"no engines in {engines}", hint=f"build them with `qvl-compile build-engine {kit_dir}`")
        build = _read_build_report(build_path, engines)
        if build.get("target_mismatch"):
            raise QvlError(f"the engines in {engines} cannot run on {self.kit.target}: {build['target_mismatch']}",
                           hint="rebuild them on the target machine with `qvl-compile build-engine`")
        m = self.manifest.model
        self.model_info = m
        self.num_layers, self.num_kv_heads, self.head_dim = m.num_layers, m.num_kv_heads, m.head_dim
        self.hidden_size, self.num_deepstack = m.hidden_size, m.num_deepstack
        self.limits = DecoderLimits.from_kit(self.kit)
        self.context_length = self.limits.context
        self.kv_mode = "trt-pingpong"
        self.vision_config = self.manifest.source.vision_config
        self.embedding = map_embedding(self.manifest)

        trt = _import_tensorrt()
        self._trt = trt
        self.cuda = _Cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        graphs = self.kit.graphs
        self.decoder = _EngineIO(trt, runtime, engines / build["engines"]["decoder"]["file"], list(graphs["decoder"].profiles), self.cuda)
        self._profile_index = {p["name"]: i for i, p in enumerate(graphs["decoder"].profiles)}
        on_cpu = " ".join(self.kit.memory_fit.on_cpu)
        vision_cpu = vision == "cpu" or (vision == "auto" and ("vision" in on_cpu or "vision" not in build["engines"]))
        if vision_cpu:  # the kit's vision graph is a valid ONNX Runtime graph too
            from qvl.runtime.backends.ort import session_options
            import onnxruntime as ort

            self._vision_ort = ort.InferenceSession(str(self.artifact / graphs["vision"].file), session_options(threads),
                                                    providers=["CPUExecutionProvider"])
            self.vision = None
        else:
            self._vision_ort = None
            self.vision = _EngineIO(trt, runtime, engines / build["engines"]["vision"]["file"], list(graphs["vision"].profiles), self.cuda)
        vocab = m.vocab_size
        # Speculative verify steps: one call of up to `verify_positions` positions returns that many logits rows.
        self._logit_positions = "logit_positions" in self.decoder.inputs
        self.max_verify_positions = self.limits.verify_positions if self._logit_positions else 0
        self._logits = np.empty((1, max(1, self.max_verify_positions), vocab), dtype=np.float32)
        self._logits_dev = self.cuda.malloc(self._logits.nbytes)

    # -- runner protocol ---------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedding[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """One vision call per attention segment (image / video frame), outputs concatenated in order."""
        from qvl.runtime.vision_tables import encode_per_segment

        names = self.manifest.graphs["vision"].input_names
        return encode_per_segment(self._run_vision, pixel_values, image_grid_thw, self.vision_config, names)

    def _run_vision(self, feeds: dict) -> list[np.ndarray]:
        """[image_embeds, deepstack_0, ...] of one vision call."""
        if self._vision_ort is not None:
            return self._vision_ort.run(None, feeds)
        v = self.vision
        v.use_profile(select_profile(v.profiles, {k: a.shape for k, a in feeds.items()}))
        for name, arr in feeds.items():
            v.stage(name, arr)
        outs, ptrs = [], []
        for name in v.outputs:
            shape = tuple(v.context.get_tensor_shape(name))
            host = np.empty(shape, dtype=host_dtype(v.dtypes[name]))
            ptr = self.cuda.malloc(host.nbytes)
            v.context.set_tensor_address(name, ptr)
            outs.append(host)
            ptrs.append(ptr)
        try:
            v.run()
            for host, ptr in zip(outs, ptrs):
                self.cuda.d2h(host, ptr)
            self.cuda.sync()
        finally:
            for ptr in ptrs:
                self.cuda.free(ptr)
        by_name = dict(zip(v.outputs, outs))
        return [by_name["image_embeds"], *(by_name[f"deepstack_{k}"] for k in range(self.num_deepstack))]

    def new_cache(self, capacity: int, batch: int = 1) -> TrtKVCache:
        if batch != 1:
            raise QvlError("the TensorRT decoder engine is built for batch 1")
        cap = min(int(capacity), self.context_length)
        nbytes = self.num_kv_heads * cap * self.head_dim * 4
        bufs = [(self.cuda.malloc(nbytes), self.cuda.malloc(nbytes)) for _ in range(2 * self.num_layers)]
        return TrtKVCache(0, cap, bufs, 0)

    def truncate(self, cache: TrtKVCache, length: int, capacity: int) -> TrtKVCache:
        """Keep the first `length` positions, with room for `capacity`. The held `[1, kv_heads, L, head_dim]` tensors'
        layout depends on L, so each is compacted (`truncation_copy`, one device-to-device 2D copy per layer and
        K/V) into the other ping-pong buffer, or into a new cache's buffers when more room is needed."""
        length = int(length)
        copy = truncation_copy(self.num_kv_heads, self.head_dim, 4, cache.length, length)
        cap = min(int(capacity), self.context_length)
        if cap <= cache.capacity:
            if copy is not None:
                for bufs in cache.buffers:
                    self.cuda.d2d_2d(bufs[1 - cache.current], bufs[cache.current], copy)
                cache.current = 1 - cache.current
                self.cuda.sync()
            cache.length = length
            return cache
        grown = self.new_cache(cap)
        try:
            if length:
                whole = Copy2D(width=length * self.head_dim * 4, height=self.num_kv_heads,
                               src_pitch=cache.length * self.head_dim * 4, dst_pitch=length * self.head_dim * 4)
                for old, new in zip(cache.buffers, grown.buffers):
                    self.cuda.d2d_2d(new[grown.current], old[cache.current], whole)
                self.cuda.sync()
        except BaseException:
            self.free(grown)
            raise
        self.free(cache)
        grown.length = length
        return grown

    def free(self, cache: TrtKVCache) -> None:
        """Release a cache's device buffers (`Model` calls it when a generation is done)."""
        for a, b in cache.buffers:
            self.cuda.free(a)
            self.cuda.free(b)
        cache.buffers = []
        cache.length = 0

    free_cache = free  # the name before the runner protocol

    def step(self, cache: TrtKVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             deepstack: np.ndarray | None = None) -> np.ndarray:
        """Run the new positions through the decoder engine, extend `cache`; return last-position logits [1, V]."""
        return self._run_decoder(cache, inputs_embeds, position_ids, deepstack, every=False)

    def verify_step(self, cache: TrtKVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step`, returning the argmax ids [1, S] after every position (each engine call's logits rows are read
        back and argmax-ed on the host, as `greedy_step` does)."""
        return self._run_decoder(cache, inputs_embeds, position_ids, deepstack, every=True)

    def _run_decoder(self, cache: TrtKVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                     deepstack: np.ndarray | None, every: bool) -> np.ndarray:
        bsz, seq, _ = inputs_embeds.shape
        if bsz != 1:
            raise QvlError("the TensorRT decoder engine is built for batch 1")
        if every and seq > self.max_verify_positions:
            if not self.max_verify_positions:
                raise QvlError(f"the engine kit {self.artifact} returns the last position's logits only: "
                               "speculative decoding cannot verify drafts with it",
                               hint="re-make the kit from the checkpoint (and its engines) with this qvl-compile version")
            raise QvlError(f"a verify step of {seq} positions exceeds the engine's {self.max_verify_positions}")
        if cache.length + seq > cache.capacity:
            raise QvlError(f"sequence of {cache.length + seq} tokens exceeds the preallocated cache of {cache.capacity}")
        if deepstack is None:
            deepstack = np.zeros((self.num_deepstack, 1, seq, self.hidden_size), dtype=np.float32)
        d = self.decoder
        ids: list[np.ndarray] = []
        for profile, off, n in plan_step(cache.length, seq, self.limits):
            past = cache.length
            d.use_profile(self._profile_index[profile])
            d.stage("inputs_embeds", inputs_embeds[:, off:off + n])
            d.stage("position_ids", position_ids[:, :, off:off + n])
            d.stage("attention_mask", np.ones((1, past + n), dtype=np.int64))
            d.stage("deepstack_embeds", deepstack[:, :, off:off + n])
            if self._logit_positions:  # every position of a verify step, else the call's last
                d.stage("logit_positions", np.arange(n, dtype=np.int64) if every else np.array([n - 1], np.int64))
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    bufs = cache.buffers[2 * i + j]
                    d.context.set_input_shape(f"past_{kind}_{i}", (1, self.num_kv_heads, past, self.head_dim))
                    d.context.set_tensor_address(f"past_{kind}_{i}", bufs[cache.current])
                    d.context.set_tensor_address(f"present_{kind}_{i}", bufs[1 - cache.current])
            d.context.set_tensor_address("logits", self._logits_dev)
            d.run()
            cache.current = 1 - cache.current
            cache.length = past + n
            if every:
                rows = self._logits[:, :n]  # [1, n, V], contiguous
                self.cuda.d2h(rows, self._logits_dev)
                self.cuda.sync()
                ids.append(np.argmax(rows, axis=-1))
        if every:
            return np.concatenate(ids, axis=1)
        last = self._logits[:, :1]
        self.cuda.d2h(last, self._logits_dev)
        self.cuda.sync()
        return last[:, -1, :].copy()

    def greedy_step(self, cache: TrtKVCache, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step` + argmax on the host (the kit's engines have no argmax output; 600 KB of logits per token)."""
        return np.argmax(self.step(cache, inputs_embeds, position_ids, deepstack), axis=-1)
