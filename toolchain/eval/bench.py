"""`qvl-compile bench`: the artifact through the runtime vs eager PyTorch, on the same inputs, in one go.

Two cases, both forced to decode exactly `new_tokens` tokens (stop ids ignored on both sides):

* **text**: a deterministic prompt trimmed to exactly `text_tokens` tokens *after* the chat template;
* **image**: one `image_size`² image (its visual-token count comes from the artifact's preprocessor)
  plus a question of exactly `question_tokens` tokens.

Each engine runs in its own subprocess (`python -m qvl.toolchain.eval.bench_workers worker SPEC OUT`), so its
peak RSS (`VmHWM`, read by the child itself) is its own, and the runtime child never imports torch. Both use
the same thread count: ORT `intra_op_num_threads` and `torch.set_num_threads`, plus `OMP_NUM_THREADS`
in the child's environment.

Per run, timestamps are taken as each token comes out (the runtime's `generate_ids` iterator; eager
`generate`'s streamer), from the moment the messages are handed over (preprocessing included):

* `ttft_s` = first token time; `vision_s` = the vision encoder alone; `preprocess_s` = chat template,
  tokenization and image preprocessing; `prefill_s = ttft - preprocess - vision`;
* `decode_tok_s = (n - 1) / (t_last - t_first)`: prefill excluded; medians over `repeats` runs.

Decode on CPU is memory-bound: every step streams all decoder weights (and the `[vocab, hidden]`
lm_head) once. `bytes_per_token` is read off the decoder graph's initializers (external-data lengths +
inline bytes), the read bandwidth is measured on the spot (a separate child, `threads` threads OR-ing
64-bit words of a buffer far larger than the LLC), and `roofline = bandwidth / bytes_per_token`.
Bandwidth is sampled before and after the engines run, since it swings run to run on shared hosts.

The parts: `bench_inputs` (the two cases, exact token counts), `bench_workers` (the child processes),
`hardware` (CPU facts, bandwidth), `bench_report` (table, plot); this module runs them and derives the report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from qvl.artifacts.manifest import read_manifest
from qvl.errors import QvlError
from qvl.runtime.backends.ort import physical_cores
from qvl.toolchain.eval.bench_bounds import gemm_shapes, summarise_bounds, vision_flops
from qvl.toolchain.eval.bench_inputs import IMAGE_SIZE, QUESTION_TOKENS, TEXT_TOKENS, build_inputs
from qvl.toolchain.eval.bench_report import format_bench, plot_bench
from qvl.toolchain.eval.bench_workers import run_child
from qvl.toolchain.eval.hardware import BANDWIDTH_BYTES, BANDWIDTH_SAMPLES, cpu_info, llc_bytes, spread
from qvl.toolchain.eval.peer_run import check_peer_names
from qvl.toolchain.eval.peers import peer_ratios, peer_steps, prepare_peers, run_peers
from qvl.toolchain.export.checkpoint_io import validate_checkpoint
from qvl.toolchain.staging import scratch_dir

NEW_TOKENS = 64

ProgressFn = Callable[[str, int, int], None]

# report["ratios"][name] = qvl[key] / eager[key]
RATIOS = {
    "decode": "decode_tok_s",
    "decode_image": "decode_tok_s_image",
    "ttft_text": "ttft_text_s",
    "ttft_image": "ttft_image_s",
    "prefill": "prefill_tok_s",
    "vision": "vision_s",
    "peak_rss": "peak_rss_bytes",
    "load": "load_s",
}


# ---------------------------------------------------------------------------------------------------
# Artifact facts


def decoder_weight_bytes(artifact: Path) -> dict:
    """Bytes of weights one decode step reads: every initializer (and Constant tensor) of the decoder graph.

    External tensors count their external-data `length` (or shape x element size where the length is
    omitted), each (file, offset) once; inline tensors their raw bytes. This includes the lm_head, which
    is the tied `[vocab, hidden]` embedding matrix (the one host-side embedding row per step is not
    counted). The KV cache read per step is reported separately, not included.
    """
    import onnx  # [export] extra, needed only here (sparsity_budget imports this function too)
    from onnx import numpy_helper

    manifest = read_manifest(Path(artifact), verify_graphs=False)
    path = manifest.graph_path("decoder")
    model = onnx.load(str(path), load_external_data=False)
    seen: set[tuple[str, int, int]] = set()
    external = inline = count = 0

    def tensor_bytes(t) -> None:
        nonlocal external, inline, count
        count += 1
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            length = int(info.get("length", 0)) or int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
            key = (info.get("location", ""), int(info.get("offset", 0)), length)
            if key not in seen:
                seen.add(key)
                external += length
        else:
            inline += int(numpy_helper.to_array(t).nbytes)

    def walk(graph) -> None:
        for t in graph.initializer:
            tensor_bytes(t)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensor_bytes(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        walk(g)

    walk(model.graph)
    return {"bytes": external + inline, "external_bytes": external, "inline_bytes": inline, "tensors": count,
            "graph": path.name}


def artifact_info(artifact: Path) -> dict:
    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify_graphs=False)
    size = allocated = files = 0
    for f in artifact.rglob("*"):
        if f.is_file():
            st = f.stat()
            files += 1
            size += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
    return {
        "path": str(artifact),
        "target": manifest.target,
        "kv_mode": manifest.kv_mode,
        "embedding_format": manifest.embedding_format,
        "size_bytes": size,
        "allocated_bytes": allocated,
        "files": files,
        "weights_bytes": manifest.weights.bytes,
    }


# ---------------------------------------------------------------------------------------------------
# The run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _loadavg() -> list[float] | None:
    """/proc/loadavg's 1, 5 and 15 minute averages (the bench host may be shared), None where unavailable."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def run_bench(
    artifact: str | Path,
    checkpoint: str | Path,
    eager_dtype: str = "fp32",
    threads: int | None = None,
    repeats: int = 3,
    progress: ProgressFn | None = None,
    *,
    text_tokens: int = TEXT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    question_tokens: int = QUESTION_TOKENS,
    image_size: int = IMAGE_SIZE,
    eager_attn: str = "sdpa",
    warmup: bool = True,
    bandwidth_bytes: int | None = None,
    bandwidth_samples: int = BANDWIDTH_SAMPLES,
    work_dir: str | Path | None = None,
    device: str = "cpu",
    extra_eager_dtypes: tuple[str, ...] = (),
    eager_cache: str | None = None,
    peers: tuple[str, ...] = (),
    llamacpp_dir: str | Path | None = None,
    peer_cache: str | Path | None = None,
    bounds: bool = True,
    bound_samples: int = 5,
) -> dict:
    """Benchmark `artifact` (runtime) against `checkpoint` (eager transformers) on identical inputs.

    `progress(message, steps_done, steps_total)` is called as each step starts. Returns the JSON-able
    report documented in benchmarks/README.md. `peers=("llama.cpp",)` also runs llama.cpp (built or found, and
    the checkpoint converted to GGUF, by `peers.prepare_peers`) on the same inputs and threads. `bounds` (CPU only)
    also measures the decode compute bound and the phases' GEMM rates in the same run (`bench_bounds`).
    """
    for dt in (eager_dtype, *extra_eager_dtypes):
        if dt not in ("fp32", "bf16"):
            raise QvlError(f"unknown eager dtype {dt!r}", hint="use fp32 or bf16")
    on_gpu = device == "cuda"  # then eager runs on the GPU too, and the roofline is the GPU's
    extra_eager_dtypes = tuple(dt for dt in dict.fromkeys(extra_eager_dtypes) if dt != eager_dtype)
    if repeats < 1 or new_tokens < 2 or text_tokens < 1:
        raise QvlError("repeats must be >= 1 and new tokens >= 2")
    peers = check_peer_names(peers)
    if peers and device != "cpu":
        raise QvlError(f"--peer runs llama.cpp on the CPU, not next to --device {device}", hint="use --device cpu with --peer")
    loadavg = {"before": _loadavg()}
    artifact, checkpoint = Path(artifact), Path(checkpoint)
    read_manifest(artifact)  # one-line errors for a bad artifact / checkpoint before anything runs
    validate_checkpoint(checkpoint)
    threads = int(threads or physical_cores())
    llc = llc_bytes() or (32 << 20)
    bw_bytes = int(bandwidth_bytes or max(BANDWIDTH_BYTES, 8 * llc))

    n_engines = 2 + len(extra_eager_dtypes)
    bounds = bounds and not on_gpu  # the compute-bound workers time ORT CPU kernels
    total = 2 + n_engines * (1 + int(warmup) + 2 * repeats)  # bandwidth x2; per engine: load, warm-up, runs
    total += 2 * int(bounds)
    state = {"done": 0}
    prepared: list = []
    if peers:  # builds / conversions first (cached; minutes the first time): fail before any engine runs
        prepared = prepare_peers(peers, artifact, checkpoint, cpu_info(threads)["flags"], llamacpp_dir, peer_cache,
                                 lambda m: progress and progress(m, 0, total))
        total += peer_steps(prepared, repeats, warmup)

    def step(message: str) -> None:
        if progress:
            progress(message, min(state["done"], total), total)
        state["done"] += 1

    t_start = time.perf_counter()
    with scratch_dir("qvl-bench-") as tmp:
        wd = Path(work_dir) if work_dir else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        inputs = build_inputs(artifact, wd, text_tokens, question_tokens, image_size)
        weights = decoder_weight_bytes(artifact)
        base = {"threads": threads, "repeats": repeats, "new_tokens": new_tokens, "warmup": warmup,
                "cases": {k: {"messages": v["messages"]} for k, v in inputs.items()}}
        bw_spec = {"worker": "membw", "threads": threads, "bytes": bw_bytes, "samples": bandwidth_samples}
        if on_gpu:
            bw_spec = {"worker": "gpubw"}

        step("memory bandwidth (before)")
        probe = run_child(bw_spec, wd, lambda m: None, threads)
        bw = probe["samples_gbs"]
        qvl = run_child({**base, "worker": "qvl", "artifact": str(artifact), "device": device,
                         "artifact_bytes_per_token": weights["bytes"]}, wd, step, threads)
        eager_spec = {**base, "worker": "eager", "checkpoint": str(checkpoint), "eager_attn": eager_attn,
                      "eager_device": "cuda" if on_gpu else "cpu", "eager_cache": eager_cache}
        eager = run_child({**eager_spec, "eager_dtype": eager_dtype}, wd, step, threads)
        others = {dt: run_child({**eager_spec, "eager_dtype": dt}, wd, step, threads) for dt in extra_eager_dtypes}
        image_path = Path(inputs["image"]["messages"][0]["content"][0]["image"])
        peer_results = run_peers(prepared, inputs, image_path, threads, repeats, text_tokens, new_tokens, wd, warmup,
                                 step)
        compute = gemm = vision = None
        if bounds:
            ckpt_cfg = json.loads((checkpoint / "config.json").read_text())
            vision = vision_flops(ckpt_cfg["vision_config"], inputs["image"]["grid_thw"])
            step("decode compute bound")
            compute = run_child({"worker": "decode_bound", "artifact": str(artifact), "threads": threads,
                                 "samples": bound_samples}, wd, lambda m: None, threads)
            step("GEMM rates per phase")
            gemm = run_child({"worker": "gemm_rates", "threads": threads, "samples": bound_samples,
                              "shapes": gemm_shapes(ckpt_cfg["text_config"], vision, text_tokens)},
                             wd, lambda m: None, threads)
        step("memory bandwidth (after)")
        bw += run_child(bw_spec, wd, lambda m: None, threads)["samples_gbs"]
    if progress:
        progress("done", total, total)

    for case in ("text", "image"):
        want = inputs[case]["prompt_tokens"]
        got = (qvl["cases"][case]["prompt_tokens"], eager["cases"][case]["prompt_tokens"],
               *(o["cases"][case]["prompt_tokens"] for o in others.values()))
        if set(got) != {want}:
            raise RuntimeError(f"{case} prompt: runtime {got[0]} / eager {got[1:]} tokens, built for {want}")

    bandwidth = max(bw)
    bpt = weights["bytes"]
    roofline = bandwidth * 1e9 / bpt
    for eng in (qvl, eager, *others.values(), *peer_results.values()):
        eng["roofline_decode_tok_s"] = bandwidth * 1e9 / eng["bytes_per_token"]
        eng["decode_efficiency"] = eng["decode_tok_s"] / eng["roofline_decode_tok_s"]
    mi = read_manifest(artifact, verify_graphs=False).model
    kv_per_pos = 2 * mi.num_layers * mi.num_kv_heads * mi.head_dim * 4  # fp32 K and V
    cpu = cpu_info(threads)
    engines = {"qvl": qvl, "eager": eager, **{f"eager_{dt}": o for dt, o in others.items()}}
    cpu.update(onnxruntime=ort.__version__, ort_available_providers=ort.get_available_providers(),
               ort_providers_used=qvl["info"]["providers"],
               torch=eager["info"]["torch"], torch_cpu_capability=eager["info"]["torch_cpu_capability"])
    return {
        "engines": engines,
        "device": device,
        "gpu": probe.get("gpu") if on_gpu else None,
        "bandwidth_kind": "GPU device-to-device copy (read + write)" if on_gpu else "host memory (read)",
        "bandwidth_gbs": bandwidth,
        "bandwidth_spread_gbs": spread(bw),
        "bandwidth_samples_gbs": bw,
        "bandwidth_buffer_bytes": bw_bytes,
        "bytes_per_token": bpt,
        "bytes_per_token_detail": weights,
        "kv_cache_bytes_per_token_text": kv_per_pos * (inputs["text"]["prompt_tokens"] + new_tokens / 2),
        "roofline_decode_tok_s": roofline,
        "decode_efficiency": qvl["decode_tok_s"] / roofline,
        "bounds": summarise_bounds(qvl["decode_tok_s"], roofline, compute, qvl["vision_s"], vision, gemm),
        "decode_compute_bound": compute,
        "gemm_rates": gemm,
        "ratios": {name: _ratio(qvl[key], eager[key]) for name, key in RATIOS.items()},
        "ratios_vs": {dt: {name: _ratio(qvl[key], o[key]) for name, key in RATIOS.items()}
                      for dt, o in [(eager_dtype, eager), *others.items()]},
        "peers": peer_results,
        "ratios_peers": peer_ratios(qvl, peer_results),
        "loadavg": {**loadavg, "after": _loadavg()},
        "cpu": cpu,
        "artifact": artifact_info(artifact),
        "checkpoint": str(checkpoint),
        "config": {
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "eager_dtype": eager_dtype,
            "extra_eager_dtypes": list(extra_eager_dtypes),
            "eager_device": "cuda" if on_gpu else "cpu",
            "eager_cache": eager_cache or "dynamic",
            "eager_attn": eager_attn,
            "text_prompt_tokens": inputs["text"]["prompt_tokens"],
            "new_tokens": new_tokens,
            "image": {k: v for k, v in inputs["image"].items() if k != "messages"},
            "ignore_stop": True,
            "peers": list(peers),
        },
        "seconds": time.perf_counter() - t_start,
    }


def bench_command(
    artifact: Path,
    checkpoint: Path,
    eager_dtype: str = "fp32",
    threads: int | None = None,
    repeats: int = 3,
    as_json: bool = False,
    plot: Path | None = None,
    **kwargs,
) -> dict:
    """What `qvl-compile bench` does: run, print a table (or JSON) to stdout, optionally write the plot."""
    err = Console(stderr=True)
    if plot:  # fail before a long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise QvlError("--plot needs matplotlib", hint="pip install matplotlib") from None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("bench", total=None)

        def progress(message: str, done: int, total: int) -> None:
            prog.update(task, description=message, completed=done, total=total)

        result = run_bench(artifact, checkpoint, eager_dtype=eager_dtype, threads=threads, repeats=repeats,
                           progress=progress, **kwargs)
    if plot:
        plot_bench(result, plot)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(format_bench(result) + "\n")
    if plot:
        err.print(f"wrote {plot}")
    return result

