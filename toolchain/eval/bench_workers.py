"""The bench's child processes: one per engine (and one for the bandwidth probe), and the parent's launcher.

Each engine runs in its own subprocess (`python -m qvl.toolchain.eval.bench_workers worker SPEC OUT`), so its
peak RSS (`VmHWM`, read by the child itself) is its own, and the runtime child never imports torch. Both use
the same thread count: ORT `intra_op_num_threads` and `torch.set_num_threads`, plus `OMP_NUM_THREADS` in the
child's environment. Progress lines (`QVLBENCH {"step": ...}`) go to the child's stdout; the result (or a
`QvlError`, exit 2) to OUT as JSON.

Per run, timestamps are taken as each token comes out (the runtime's `generate_ids` iterator; eager
`generate`'s streamer), from the moment the messages are handed over (preprocessing included); see
`qvl.toolchain.eval.bench` for what is derived from them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort

from qvl.errors import QvlError
from qvl.runtime.image_preprocess import load_image
from qvl.runtime.model import GenerationStats, Model
from qvl.runtime.prompt import collect_images, normalize_messages
from qvl.toolchain.eval.hardware import measure_bandwidth
from qvl.toolchain.export.hf_compat import image_only_processor

PROGRESS_TAG = "QVLBENCH "


# ---------------------------------------------------------------------------------------------------
# Worker side (runs in the child process)


def _rss() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in out:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        import resource  # Unix only: imported where it is used, after /proc failed

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = r if sys.platform == "darwin" else r * 1024
    return out


def _emit(message: str) -> None:
    sys.stdout.write(PROGRESS_TAG + json.dumps({"step": message}) + "\n")
    sys.stdout.flush()


def _run_record(t0: float, t_prep: float, vision_s: float, times: list[float], prompt_tokens: int) -> dict:
    n = len(times)
    ttft = times[0] - t0
    preprocess = t_prep - t0
    prefill = max(ttft - preprocess - vision_s, 1e-9)
    decode = times[-1] - times[0]
    return {
        "ttft_s": ttft,
        "preprocess_s": preprocess,
        "vision_s": vision_s,
        "prefill_s": prefill,
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_s": decode,
        "decode_tok_s": (n - 1) / decode if n > 1 and decode > 0 else 0.0,
        "generated_tokens": n,
    }


def _summarise(runs: list[dict], prompt_tokens: int, new_tokens: int) -> dict:
    keys = ("ttft_s", "preprocess_s", "vision_s", "prefill_s", "prefill_tok_s", "decode_s", "decode_tok_s")
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    out.update({k: statistics.median(r[k] for r in runs) for k in keys})
    out["runs"] = runs
    return out


def _qvl_worker(spec: dict) -> dict:
    threads = spec["threads"]
    _emit("qvl: loading the artifact")
    on_gpu = spec.get("device", "cpu") in ("cuda", "trt")
    if on_gpu:
        from qvl.toolchain.eval.bench_gpu import DeviceMemory

        device_memory = DeviceMemory()
    t = time.perf_counter()
    model = Model(Path(spec["artifact"]), device=spec.get("device", "cpu"), threads=threads)  # resolved by the parent
    load_s = time.perf_counter() - t
    rss_loaded = _rss()

    def one(messages: list, n_new: int) -> tuple[dict, int]:
        stats = GenerationStats()
        t0 = time.perf_counter()
        prompt = model.prepare(messages)
        t_prep = time.perf_counter()
        times = []
        for _ in model.generate_ids(prompt, n_new, stats=stats, ignore_stop=True):
            times.append(time.perf_counter())
        if len(times) != n_new:
            raise RuntimeError(f"runtime produced {len(times)} tokens, expected {n_new}")
        return _run_record(t0, t_prep, stats.vision_seconds, times, len(prompt)), len(prompt)

    def device_info(result: dict) -> None:
        if on_gpu:
            result["device_memory"] = device_memory.used()
            result["info"]["cuda_graph"] = getattr(model.engine, "caches", None) is not None and model.engine.caches.cuda_graph
            result["info"]["cuda_graph_note"] = getattr(model.engine, "cuda_graph_note", None)
            caches = getattr(model.engine, "caches", None)
            result["info"]["next_token_on_device"] = getattr(caches, "has_next_token", False)
            timing = dict(getattr(caches, "decode_timing", None) or {})
            if timing.get("steps"):
                n = timing["steps"]
                # inside ORT's Run: launches (or one graph replay) + device time + the stream sync; the rest of a
                # step is host work (input updates, the id read-back)
                timing.update(run_ms_per_step=1e3 * timing["run_s"] / n,
                              host_ms_per_step=1e3 * (timing["step_s"] - timing["run_s"]) / n)
            result["decode_step_timing"] = timing

    return _drive(spec, one, {
        "engine": "qvl",
        "load_s": load_s,
        "rss_after_load_bytes": rss_loaded.get("VmRSS"),
        "bytes_per_token": spec["artifact_bytes_per_token"],
        "info": {
            "onnxruntime": ort.__version__,
            "device": model.device,
            "providers": model.engine.decoder.get_providers() if hasattr(model.engine.decoder, "get_providers") else [],
            "kv_mode": model.engine.kv_mode,
            # which kernel ran the decoder's int4 linears (runtime/kernels): qvl's AVX2 op or ORT's MatMulNBits
            "decoder_linear_kernel": getattr(model.engine, "kernel_note", None),
            "intra_op_threads": threads,
            "torch_imported": "torch" in sys.modules,
        },
    }, finish=device_info)


def _eager_worker(spec: dict) -> dict:
    # torch / transformers only inside the eager child: the runtime child (same module) must never import
    # torch, or its RSS and the torch-free claim it reports (`torch_imported`) would be wrong.
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import Qwen3VLForConditionalGeneration, __version__ as tf_version
    from transformers.generation.streamers import BaseStreamer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["eager_dtype"]]
    device = spec.get("eager_device", "cpu")
    _emit(f"eager: loading the checkpoint ({spec['eager_dtype']}, {device})")
    if device == "cuda":
        # fp32 means fp32 on the GPU too (no TF32 rounding), as on the artifact side.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        spec["checkpoint"], dtype=dtype, attn_implementation=spec["eager_attn"]
    ).eval().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    processor = image_only_processor(Path(spec["checkpoint"]))
    load_s = time.perf_counter() - t
    rss_loaded = _rss()
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    vision = {"t": 0.0, "s": 0.0}
    visual = model.model.visual
    visual.register_forward_pre_hook(lambda *a: vision.__setitem__("t", time.perf_counter()))
    visual.register_forward_hook(lambda *a: vision.__setitem__("s", vision["s"] + time.perf_counter() - vision["t"]))

    class Timer(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first streams the prompt ids
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    # Decoder weights one step reads (tied lm_head/embedding counted once).
    params = {p.data_ptr(): p.numel() * p.element_size()
              for mod in (model.model.language_model, model.lm_head) for p in mod.parameters()}

    def one(messages: list, n_new: int) -> tuple[dict, int]:
        vision["s"] = 0.0
        timer = Timer()
        t0 = time.perf_counter()
        images = [load_image(s) for s in collect_images(normalize_messages(messages))]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt").to(device)
        t_prep = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                eos_token_id=eos_ids, pad_token_id=eos_ids[0] if eos_ids else None, streamer=timer,
                **({"cache_implementation": spec["eager_cache"]} if spec.get("eager_cache") else {}),
            )
        sync()
        n_prompt = int(inputs["input_ids"].shape[1])
        if len(timer.times) != n_new or out.shape[1] - n_prompt != n_new:
            raise RuntimeError(f"eager generate produced {len(timer.times)} tokens, expected {n_new}")
        return _run_record(t0, t_prep, vision["s"], timer.times, n_prompt), n_prompt

    def device_info(result: dict) -> None:
        if device == "cuda":
            result["device_memory"] = {"bytes": int(torch.cuda.max_memory_reserved()), "method": "torch max_memory_reserved",
                                       "allocated_peak_bytes": int(torch.cuda.max_memory_allocated())}

    return _drive(spec, one, {
        "engine": "eager",
        "load_s": load_s,
        "rss_after_load_bytes": rss_loaded.get("VmRSS"),
        "bytes_per_token": int(sum(params.values())),
        "info": {
            "torch": torch.__version__,
            "transformers": tf_version,
            "dtype": spec["eager_dtype"],
            "attn_implementation": spec["eager_attn"],
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device,
            "cache_implementation": spec.get("eager_cache") or "dynamic",
        },
    }, finish=device_info)


def _drive(spec: dict, one: Callable, result: dict, finish: Callable[[dict], None] | None = None) -> dict:
    """Warm-up, then `repeats` timed runs of each case; medians per case."""
    name, new, repeats = result["engine"], spec["new_tokens"], spec["repeats"]
    cases = spec["cases"]
    if spec.get("warmup", True):
        _emit(f"{name}: warm-up")
        for case in ("text", "image"):
            one(cases[case]["messages"], min(new, 2))
    runs: dict[str, list[dict]] = {"text": [], "image": []}
    prompt_tokens: dict[str, int] = {}
    for r in range(repeats):
        for case in ("text", "image"):
            _emit(f"{name}: {case} run {r + 1}/{repeats}")
            rec, n_prompt = one(cases[case]["messages"], new)
            runs[case].append(rec)
            prompt_tokens[case] = n_prompt
    summary = {case: _summarise(runs[case], prompt_tokens[case], new) for case in runs}
    rss = _rss()
    result.update(
        threads=spec["threads"],
        decode_tok_s=summary["text"]["decode_tok_s"],
        decode_tok_s_image=summary["image"]["decode_tok_s"],
        ttft_text_s=summary["text"]["ttft_s"],
        ttft_image_s=summary["image"]["ttft_s"],
        prefill_tok_s=summary["text"]["prefill_tok_s"],
        prefill_tok_s_image=summary["image"]["prefill_tok_s"],
        vision_s=summary["image"]["vision_s"],
        peak_rss_bytes=rss["VmHWM"],
        rss_end={k: v for k, v in rss.items() if k != "VmHWM"},
        cases=summary,
    )
    if finish is not None:
        finish(result)
    return result


def _membw_worker(spec: dict) -> dict:
    return {"samples_gbs": measure_bandwidth(spec["threads"], spec["bytes"], spec["samples"])}


def _gpubw_worker(spec: dict) -> dict:
    from qvl.toolchain.eval.bench_gpu import measure_device_bandwidth

    return measure_device_bandwidth()


def _decode_bound_worker(spec: dict) -> dict:
    from qvl.toolchain.eval.decode_bound import decode_compute_bound

    return decode_compute_bound(Path(spec["artifact"]), spec["threads"], samples=spec.get("samples", 5))


def _gemm_rates_worker(spec: dict) -> dict:
    from qvl.toolchain.eval.gemm_rates import gemm_rates

    shapes = {k: tuple(v) for k, v in spec["shapes"].items()} if spec.get("shapes") else None
    return gemm_rates(spec["threads"], shapes=shapes, samples=spec.get("samples", 5))


_WORKERS = {"qvl": _qvl_worker, "eager": _eager_worker, "membw": _membw_worker, "gpubw": _gpubw_worker,
            "decode_bound": _decode_bound_worker, "gemm_rates": _gemm_rates_worker}


def _worker_main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        result = _WORKERS[spec["worker"]](spec)
    except QvlError as exc:
        out_path.write_text(json.dumps({"error": str(exc), "hint": exc.hint}))
        return 2
    out_path.write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------
# Parent side


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_child(spec: dict, work_dir: Path, on_step: Callable[[str], None], threads: int) -> dict:
    """Run one worker (`spec["worker"]`: qvl | eager | membw) in a child process; its JSON result.

    `on_step(message)` is called for each progress line. A `QvlError` in the child is raised again here; any
    other failure is a RuntimeError with the tail of the child's stderr.
    """
    name = spec["worker"]
    spec_path, out_path, log_path = (work_dir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = _child_env(1 if name == "membw" else threads)  # membw threads itself; keep BLAS out of it
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qvl.toolchain.eval.bench_workers", "worker", str(spec_path), str(out_path)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_TAG):
                try:
                    on_step(json.loads(line[len(PROGRESS_TAG):])["step"])
                except (ValueError, KeyError):
                    pass
        rc = proc.wait()
    result = json.loads(out_path.read_text()) if out_path.is_file() else None
    if rc == 2 and result and "error" in result:
        raise QvlError(result["error"], hint=result.get("hint"))
    if rc != 0 or result is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"bench worker {name!r} failed (exit {rc}):\n{tail}")
    return result


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.stderr.write("usage: python -m qvl.toolchain.eval.bench_workers worker SPEC.json OUT.json (internal)\n")
    sys.exit(2)
