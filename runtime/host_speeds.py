"""What the placement planner's times and fixed RAM come from (`HostSpeeds`): stated constants of the 2019 laptop
(`stated_speeds`), or this machine's, measured in a second or two on real sessions of the artifact's first layer part
and its head (`measure_host`: `qvl-compile plan` and the budgeted loads call it). Every value says whether it was
measured or stated and how. The rules that use them are `runtime/placement.py`'s.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, fields, replace

MB, MIB = 10**6, 2**20
PREFILL_CAP = 128  # positions of the measured prefill step (prefill cost is linear in them here)

# Stated speeds of the 2019 laptop (i5-10210U, DDR4-2666 x2, NVMe, MX250 2 GB on PCIe 3 x4).
CPU_MEMORY_BW, CPU_EFFICIENCY, CPU_FLOPS = 40e9, 0.5, 120e9
GPU_MEMORY_BW, GPU_EFFICIENCY, GPU_FLOPS = 48e9, 0.6, 0.5e12
DISK_BW, H2D_BW, LOAD_BW = 2e9, 3e9, 4e9
CPU_SESSION_S, GPU_SESSION_S, GPU_STEP_S, CROSSING_S, CPU_STEP_S = 0.02, 0.1, 2e-4, 5e-5, 5e-5
PROCESS_BYTES, TOKENIZER_FACTOR = 100 * MB, 10
# The share of a streamed part's load hidden when the overlapped runner makes it beside another: stated 0, not
# measured per host. Two sessions built in isolation overlapped well on the 2-core VM (56 -> 31 ms), but inside the
# runner, beside the kept parts' heap and threads, 2B decode with 8 streamed parts went 158 -> 163 and 159 -> 154 ms
# a token (benchmarks/overlap_streaming.py): no reliable gain to plan on.
LOAD_PAIR = 0.0


@dataclass(frozen=True)
class Speed:
    value: float
    unit: str
    source: str  # "measured" | "stated"
    how: str

    def to_json(self) -> dict:
        return {"value": self.value, "unit": self.unit, "source": self.source, "how": self.how}


@dataclass(frozen=True)
class HostSpeeds:
    """What the plan's times and fixed RAM come from; every field a `Speed` with its source."""

    cpu_decode: Speed  # weight bytes / s of a layer's share of a one-position step on the CPU (beyond cpu_step)
    cpu_head: Speed  # the same for the head (final norm + lm_head)
    cpu_prefill: Speed  # weight bytes x positions / s of a layer part's prefill step on the CPU
    cpu_session: Speed  # s a streamed use costs beyond its bytes at `load` (session made, dropped, heap trimmed)
    load: Speed  # bytes / s ORT reads and copies initializers at session creation
    disk: Speed  # bytes / s a streamed part's weights are read from the disk
    process: Speed  # bytes: RSS of the process with numpy + onnxruntime imported
    tokenizer: Speed  # bytes: RSS the artifact's tokenizer adds
    gpu_decode: Speed
    gpu_prefill: Speed
    gpu_session: Speed
    gpu_step: Speed  # s a CUDA session's step costs beyond its layers' (binding, launches, the run's sync)
    h2d: Speed  # bytes / s host <-> device
    crossing: Speed  # s of latency per device crossing
    heap: Speed | None = None  # RSS a kept CPU session holds per weight byte (ORT's prepacked copies, allocator)
    cpu_step: Speed | None = None  # s a CPU session's step costs beyond its layers' (None: 0)
    # fraction of a streamed part's load hidden when it is made beside another one (two sessions built at once)
    load_pair: Speed | None = None

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name).to_json() for f in fields(self) if getattr(self, f.name) is not None}


# -- measuring this machine --------------------------------------------------------------------------------------

def _rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def _params_per_byte(manifest) -> float:
    """Decoder parameters per weight byte (prefill FLOPs = 2 x parameters x positions): from the precision report's
    fp32 bytes before / after quantization, else the activation dtype's size."""
    layers = (manifest.precision or {}).get("layers") or {}
    before = sum(d.get("bytes_before", 0) for k, d in layers.items() if k.startswith("decoder") and isinstance(d, dict))
    after = sum(d.get("bytes_after", 0) for k, d in layers.items() if k.startswith("decoder") and isinstance(d, dict))
    return before / 4 / after if before and after else 1 / _kv_itemsize(manifest)


def _kv_itemsize(manifest) -> int:
    inputs = {v.name: v for v in manifest.graphs["decoder"].inputs} if "decoder" in manifest.graphs else {}
    return 2 if getattr(inputs.get("past_key_0"), "dtype", None) == "float16" else 4


def stated_speeds(manifest) -> HostSpeeds:
    flops_per_byte = 2 * _params_per_byte(manifest)
    tok = manifest.artifact_dir / "tokenizer.json" if manifest.artifact_dir else None
    tok_bytes = TOKENIZER_FACTOR * tok.stat().st_size if tok is not None and tok.is_file() else 50 * MB
    s = lambda v, unit, how: Speed(float(v), unit, "stated", how)  # noqa: E731
    roofline = f"{CPU_MEMORY_BW / 1e9:g} GB/s DDR4 roofline x {CPU_EFFICIENCY}"
    return HostSpeeds(
        cpu_decode=s(CPU_MEMORY_BW * CPU_EFFICIENCY, "B/s", roofline),
        cpu_head=s(CPU_MEMORY_BW * CPU_EFFICIENCY, "B/s", roofline),
        cpu_prefill=s(CPU_FLOPS / flops_per_byte, "B*pos/s",
                      f"{CPU_FLOPS / 1e9:g} GFLOP/s AVX2, {flops_per_byte:.2f} FLOP per weight byte"),
        cpu_session=s(CPU_SESSION_S, "s", "ORT session creation"),
        load=s(LOAD_BW, "B/s", "initializer copy at session creation"),
        disk=s(DISK_BW, "B/s", "NVMe read"),
        process=s(PROCESS_BYTES, "B", "numpy + onnxruntime + the CLI"),
        tokenizer=s(tok_bytes, "B", f"{TOKENIZER_FACTOR}x tokenizer.json" if tok is not None else "stated"),
        gpu_decode=s(GPU_MEMORY_BW * GPU_EFFICIENCY, "B/s", f"MX250 {GPU_MEMORY_BW / 1e9:g} GB/s x {GPU_EFFICIENCY}"),
        gpu_prefill=s(GPU_FLOPS / flops_per_byte, "B*pos/s", f"MX250 {GPU_FLOPS / 1e12:g} TFLOP/s effective fp32"),
        gpu_session=s(GPU_SESSION_S, "s", "CUDA session creation"),
        gpu_step=s(GPU_STEP_S, "s", "kernel launches per part step"),
        h2d=s(H2D_BW, "B/s", "PCIe 3 x4 (MX250)"),
        crossing=s(CROSSING_S, "s", "per device crossing"),
        heap=s(1.0, "x", "a kept session's RSS = its weight bytes (no packing overhead assumed)"),
        cpu_step=s(CPU_STEP_S, "s", "session run overhead per step"),
        load_pair=s(LOAD_PAIR, "x", "a second session built beside another hides none of its load, as the runner "
                    "showed in benchmarks/overlap_streaming.py"))


def _zero_feeds(session, positions: int, kv_mode: str) -> dict:
    import numpy as np

    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}
    feeds = {}
    for inp in session.get_inputs():
        past = 0 if kv_mode == "concat" else positions  # concat grows from empty; in-place caches hold `positions`
        shape = [d if isinstance(d, int) else 1 if d in ("batch", "positions") else past if "past" in str(d)
                 else positions for d in inp.shape]
        if inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(positions, dtype=np.int64), shape).copy()
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones(shape, np.int64)
        elif inp.name == "logit_positions":
            feeds[inp.name] = np.array([positions - 1], np.int64)
        else:
            feeds[inp.name] = np.zeros(shape, dtypes.get(inp.type, np.float32))
    return feeds


def _time_part(manifest, spec, providers, threads, positions: tuple, cycles: int = 1, model: bytes | None = None):
    """(best s of one streamed use, {positions: median step s}, RSS bytes the kept session added) for one part (or,
    `model`, the serialized graph of joined parts), on real zero inputs. A streamed use is what `PartitionedEngine`
    does per use: a session with the arena off, dropped, the heap trimmed."""
    import onnxruntime as ort

    from qvl.runtime.backends.partitioned import part_session_options, release_freed_memory
    from qvl.runtime.part_merge import EXTERNAL_FOLDER_KEY

    source, best = model if model is not None else str(manifest.graph_path(spec.graph)), math.inf

    def options(kept: bool):
        so = part_session_options(threads, kept=kept)
        if model is not None:
            so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(manifest.artifact_dir))
        return so

    for _ in range(cycles):
        start = time.perf_counter()
        session = ort.InferenceSession(source, options(False), providers=providers)
        session = None
        release_freed_memory()
        best = min(best, time.perf_counter() - start)
    before = _rss()
    session = ort.InferenceSession(source, options(True), providers=providers)
    after = _rss()
    grown = (after - before) if before is not None and after is not None else None
    steps = {}
    on_gpu = providers[0] != "CPUExecutionProvider"
    for n in positions:
        feeds = _zero_feeds(session, n, manifest.kv_mode)
        if on_gpu:  # as the engine binds a CUDA part: its KV and outputs stay in device memory (no copies timed)
            from qvl.runtime.backends.ort_cache import ortvalue

            io = session.io_binding()
            for name, value in feeds.items():
                if name.startswith("past_"):
                    io.bind_ortvalue_input(name, ortvalue(value, "cuda"))
                else:
                    io.bind_cpu_input(name, value)
            for o in session.get_outputs():
                io.bind_output(o.name, "cuda")
            run = lambda: session.run_with_iobinding(io)  # noqa: E731
        else:
            run = lambda: session.run(None, feeds)  # noqa: E731
        run()  # warm-up
        times, until = [], time.perf_counter() + 1.0
        while len(times) < 5 and (len(times) < 2 or time.perf_counter() < until):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        steps[n] = statistics.median(times)
    return best, steps, grown


def measure_host(manifest, threads: int | None = None, device: str = "cpu", measure: bool = True,
                 prompt_tokens: int = 256) -> HostSpeeds:
    """This machine's `HostSpeeds`: stated constants, with `measure` the CPU's (and, with device "cuda", the GPU's)
    replaced by timings of the artifact's first layer part and its head (a few seconds at 2B size)."""
    from qvl.runtime.placement import require_cuda, require_partition

    require_partition(manifest)
    speeds = stated_speeds(manifest)
    if not measure:
        return speeds
    import numpy  # noqa: F401  (the baseline is this process with both imported)
    import onnxruntime  # noqa: F401

    got = {}
    rss = _rss()
    if rss is not None:
        got["process"] = Speed(float(rss), "B", "measured", "RSS of this process with numpy + onnxruntime imported")
        tok = manifest.artifact_dir / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            loaded = Tokenizer.from_file(str(tok))
            grown = (_rss() or rss) - rss
            del loaded
            if grown > 0:
                got["tokenizer"] = Speed(float(grown), "B", "measured", "RSS growth loading tokenizer.json")
    from qvl.runtime.backends.select import cuda_blocker

    got.update(_measure_parts(manifest, "cpu", ["CPUExecutionProvider"], threads, prompt_tokens))
    if device == "cuda" and not cuda_blocker(manifest):  # a blocked artifact's parts stay on the CPU anyway
        require_cuda()
        from qvl.runtime.backends.ort import _ORT_ERRORS, Engine

        try:
            got.update(_measure_parts(manifest, "gpu", Engine._providers("cuda"), threads, prompt_tokens))
            got["h2d"] = _measure_h2d()
        except _ORT_ERRORS as exc:  # no device, driver too old: the stated GPU speeds stay, saying why
            why = str(exc).splitlines()[0][:120]
            got.update({f.name: replace(getattr(speeds, f.name), how=f"{getattr(speeds, f.name).how} (measuring "
                                        f"failed: {why})") for f in fields(speeds) if f.name.startswith("gpu")})
    return replace(speeds, **got)


def _measure_parts(manifest, dev: str, providers: list, threads: int | None, prompt_tokens: int) -> dict:
    """Measured `HostSpeeds` fields of one device from the first layer part and the head."""
    parts = manifest.partition.parts
    layer = next((p for p in parts if p.kind == "layers"), None)
    head = next((p for p in parts if p.kind == "head"), None)
    n = max(1, min(prompt_tokens, PREFILL_CAP))
    m = lambda v, unit, how: Speed(float(v), unit, "measured", how)  # noqa: E731
    got = {}
    if layer is not None:
        cycle, steps, _ = _time_part(manifest, layer, providers, threads, (1, n), cycles=2)
        w = layer.weight_bytes
        got.update(_split_step(manifest, parts, layer, steps[1], dev, providers, threads))
        got[f"{dev}_prefill"] = m(w * n / steps[n], "B*pos/s", f"{layer.name}: {n} positions, {steps[n] * 1e3:.2f} ms")
        got[f"{dev}_session"] = m(cycle, "s", f"{layer.name}: session created, dropped, heap trimmed")
    if head is not None and dev == "cpu":
        _, head_steps, grown = _time_part(manifest, head, providers, threads, (1,))
        hw = head.weight_bytes
        if grown and hw >= MIB:
            got["heap"] = m(max(1.0, grown / hw), "x", f"head: RSS grew {grown / MB:.1f} MB for {hw / MB:.1f} MB of "
                            "weights at session creation")
        # its session's step cost is charged once per session (`cpu_step`), so the head's rate is for the rest
        step = got["cpu_step"].value if "cpu_step" in got else 0.0
        head_s = head_steps[1] - step if head_steps[1] > 2 * step else head_steps[1]
        got["cpu_head"] = m(hw / head_s, "B/s", f"head: {hw / MB:.2f} MB in {head_steps[1] * 1e3:.3f} ms a step"
                            + (f", {step * 1e3:.3f} ms of it cpu_step" if head_s != head_steps[1] else ""))
        if layer is not None and cycle > 0:
            # A streamed use of a layer-sized part costs what one layer part's whole cycle costs, scaled by bytes:
            # fitting a fixed + per-byte split between the layer and the head mispredicted 2B streaming by ~2x (the
            # lm_head's prepacking is slower per byte than a layer's), and layers are what a budget streams.
            w = layer.weight_bytes
            got["load"] = m(w / cycle, "B/s", f"{layer.name}: {w / MB:.1f} MB in a {cycle * 1e3:.1f} ms streamed cycle")
            got["cpu_session"] = m(0.0, "s", f"included in load ({layer.name}'s whole cycle)")
    return got


def _split_step(manifest, parts, layer, one: float, dev: str, providers, threads) -> dict:
    """`{dev}_decode` and `{dev}_step` from a one-position step of the first layer part alone (`one` s) and of the
    first k layer parts joined into one session (as the engine joins parts with one placement; k = 2 on the CPU,
    up to 8 on a GPU, whose per-layer time is small beside its per-run cost): the k - 1 more layers cost their work
    only, the rest of the single part's step is the per-session step cost. When the joined step is not slower
    (timing noise beside a large per-run cost), each layer is charged the joined step / k and the step nothing."""
    from qvl.runtime.part_merge import group_inputs, group_outputs, merge_part_graphs

    m = lambda v, unit, how: Speed(float(v), unit, "measured", how)  # noqa: E731
    w = layer.weight_bytes
    layers = [p for p in parts if p.kind == "layers"]
    joined = [p for p in layers[:2 if dev == "cpu" else 8] if p.weight_bytes == w]
    if len(joined) < 2 or joined != layers[:len(joined)]:
        return {f"{dev}_decode": m(w / one, "B/s", f"{layer.name}: {w / MB:.2f} MB, {one * 1e3:.3f} ms a step"),
                f"{dev}_step": m(0.0, "s", f"included in {dev}_decode (one layer part)")}
    k = len(joined)
    others = [p for p in parts if p not in joined]
    model = merge_part_graphs([manifest.graph_path(p.graph) for p in joined], group_inputs(joined),
                              group_outputs(joined, others), f"first {k} layer parts")
    _, steps, _ = _time_part(manifest, None, providers, threads, (1,), model=model)
    many = steps[1]
    how = f"{layer.name} alone {one * 1e3:.3f} ms, the first {k} layer parts joined {many * 1e3:.3f} ms a step"
    if many <= one:
        return {f"{dev}_decode": m(w * k / many, "B/s", f"{w / MB:.2f} MB a layer part: {how} (not slower: "
                                   f"{many / k * 1e3:.3f} ms a layer)"),
                f"{dev}_step": m(0.0, "s", f"included in {dev}_decode: {how}")}
    layer_s = (many - one) / (k - 1)
    return {f"{dev}_decode": m(w / layer_s, "B/s", f"{w / MB:.2f} MB a layer part: {how}"),
            f"{dev}_step": m(max(0.0, one - layer_s), "s", how)}


def _measure_h2d() -> Speed:
    import numpy as np
    import onnxruntime as ort

    host = np.ones(16 * MIB // 4, np.float32)
    ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)  # warm-up
    start = time.perf_counter()
    ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0).numpy()
    return Speed(2 * host.nbytes / (time.perf_counter() - start), "B/s", "measured", "16 MiB host -> device -> host")


def gpu_total_memory() -> int | None:
    """GPU 0's memory from NVML (nvidia-ml-py), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    except Exception:  # no nvidia-ml-py, no driver, no GPU
        return None
