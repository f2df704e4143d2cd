"""`qvl-compile bench`: the artifact through the runtime vs eager PyTorch, on the same inputs, in one go.

Two cases, both forced to decode exactly `new_tokens` tokens (stop ids ignored on both sides):

* **text**: a deterministic prompt trimmed to exactly `text_tokens` tokens *after* the chat template;
* **image**: one `image_size`² image (its visual-token count comes from the artifact's preprocessor)
  plus a question of exactly `question_tokens` tokens.

Each engine runs in its own subprocess (`python -m qvl.toolchain.eval.bench worker SPEC OUT`), so its peak
RSS (`VmHWM`, read by the child itself) is its own, and the runtime child never imports torch. Both use
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

import numpy as np

from qvl.errors import QvlError
from qvl.toolchain.staging import scratch_dir

TEXT_TOKENS = 128
NEW_TOKENS = 64
QUESTION_TOKENS = 32
IMAGE_SIZE = 448
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_SAMPLES = 7  # per phase (before and after the engines)
PROGRESS_TAG = "QVLBENCH "

# Deterministic prompt material (ASCII only, so every prefix re-encodes cleanly).
_TEXT_CORPUS = (
    "The harbour wakes before the town does. Fishing boats slide out past the breakwater while the gulls "
    "argue over the first crates on the quay, and the smell of diesel and salt drifts up the narrow "
    "streets. By seven the bakery has its shutters open, the ferry to the island sounds its horn twice, "
    "and the old man who repairs nets is already at his bench beside the lighthouse steps. Tourists "
    "arrive later, with maps and cameras, asking the way to the castle on the hill, the museum of "
    "maritime history, or the beach on the far side of the headland where the water is calm and green. "
    "In the afternoon the wind turns, the sails in the bay lean over, and the children from the sailing "
    "school race each other around the yellow buoys while their instructors shout from a rubber dinghy. "
)
_QUESTION_CORPUS = (
    "Look carefully at the picture and describe every shape you can see, the colour of each shape, "
    "where it is placed relative to the others, and what the background looks like, then say which "
    "shape is largest and whether any of them overlap or touch the edges of the image."
)

ProgressFn = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------------
# Host facts


def cpu_info(threads: int) -> dict:
    """CPU model, the SIMD flags that decide which kernels run, core counts and the LLC size."""
    from qvl.runtime.engine import physical_cores

    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "llc_bytes": llc_bytes(),
        "flags": {f: f in flags for f in wanted},
        "mlas_isa": isa,
        "note": (
            f"ONNX Runtime's MLAS picks its kernels from CPUID at run time: {isa} kernels on this host; "
            "on the target i5-10210U (Comet Lake: AVX2 + FMA, no AVX-512) it takes the AVX2/FMA3 ones, "
            "so these numbers describe this host, not the laptop."
        ),
    }


def llc_bytes() -> int | None:
    """Size of the largest CPU cache (sysfs), None where unknown."""
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            raw = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
        try:
            size = int(raw.rstrip("KMG")) * mult
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


def measure_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, samples: int = BANDWIDTH_SAMPLES) -> list[float]:
    """Multi-threaded read bandwidth in GB/s (1e9 B/s), one value per full pass over the buffer.

    `threads` Python threads each OR-reduce their slice of a `nbytes` buffer viewed as uint64 (numpy's
    integer reductions are SIMD loops that release the GIL; ~50 GB/s per core from cache, so DRAM is
    the limit). The buffer is written first so every page is backed (an untouched `np.empty` reads
    the shared zero page). Use a buffer far larger than the last-level cache.
    """
    import threading

    threads = max(1, int(threads))
    words = max(threads * 512, int(nbytes) // 8)
    buf = np.empty(words, dtype=np.uint64)
    buf.fill(0x0101010101010101)  # write every page so it is backed (no temporaries)
    parts = np.array_split(buf, threads)
    results: list[float] = []
    for _ in range(max(1, samples) + 1):  # the first pass warms page tables and thread start-up
        barrier = threading.Barrier(threads + 1)
        done = threading.Barrier(threads + 1)

        def work(part):
            barrier.wait()
            np.bitwise_or.reduce(part)
            done.wait()

        workers = [threading.Thread(target=work, args=(p,), daemon=True) for p in parts]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        done.wait()
        dt = time.perf_counter() - t0
        for w in workers:
            w.join()
        results.append(buf.nbytes / dt / 1e9)
    del buf, parts
    return results[1:]


def spread(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


# ---------------------------------------------------------------------------------------------------
# Artifact facts


def decoder_weight_bytes(artifact: Path) -> dict:
    """Bytes of weights one decode step reads: every initializer (and Constant tensor) of the decoder graph.

    External tensors count their external-data `length` (or shape x element size where the length is
    omitted), each (file, offset) once; inline tensors their raw bytes. This includes the lm_head, which
    is the tied `[vocab, hidden]` embedding matrix (the one host-side embedding row per step is not
    counted). The KV cache read per step is reported separately, not included.
    """
    import onnx
    from onnx import numpy_helper

    from qvl.artifacts.manifest import read_manifest

    manifest = read_manifest(Path(artifact), verify_graphs=False)
    path = Path(artifact) / manifest["graphs"]["decoder"]["file"]
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
    from qvl.artifacts.manifest import read_manifest

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
        "target": manifest.get("target"),
        "kv_mode": manifest.get("decoder", {}).get("kv_mode", "concat"),
        "embedding_format": manifest.get("embedding", {}).get("format", "dense"),
        "size_bytes": size,
        "allocated_bytes": allocated,
        "files": files,
        "weights_bytes": manifest["weights"]["bytes"],
    }


# ---------------------------------------------------------------------------------------------------
# Inputs (built torch-free from the artifact's own tokenizer, template and preprocessor)


def bench_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A deterministic size x size test picture: gradients with a red disc and a blue square."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) * 37 % 256], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([size * 0.1, size * 0.1, size * 0.45, size * 0.5], fill=(220, 30, 30))
    d.rectangle([size * 0.55, size * 0.5, size * 0.9, size * 0.9], fill=(30, 30, 220))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _fit(count: Callable[[str], int], tokenizer, corpus: str, target: int, what: str) -> str:
    """The prefix of `corpus` (cut at a token boundary) for which `count(text) == target`."""
    overhead = count("")
    if overhead >= target:
        raise QvlError(f"the {what} cannot be {target} tokens: the chat template alone takes {overhead}")
    ids = tokenizer.encode(corpus, add_special_tokens=False).ids
    while len(ids) < 2 * target + 16:
        corpus = corpus + corpus
        ids = tokenizer.encode(corpus, add_special_tokens=False).ids

    def text(k: int) -> str:
        return tokenizer.decode(ids[:k]).strip()

    k = max(1, target - overhead)
    tried: set[int] = set()
    for _ in range(32):
        if k in tried:
            break
        tried.add(k)
        c = count(text(k))
        if c == target:
            return text(k)
        k = max(1, k + target - c)
    for k in range(max(1, min(tried) - 8), max(tried) + 9):  # non-monotone merges: scan around
        if count(text(k)) == target:
            return text(k)
    raise QvlError(f"could not build a {what} of exactly {target} tokens with this tokenizer")


def build_inputs(
    artifact: Path, work_dir: Path, text_tokens: int = TEXT_TOKENS, question_tokens: int = QUESTION_TOKENS,
    image_size: int = IMAGE_SIZE,
) -> dict:
    """The two cases' chat messages, with their exact prompt and visual token counts."""
    from qvl.runtime.prompt import PromptBuilder

    builder = PromptBuilder.from_dir(artifact)
    tok = builder.tokenizer

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def prompt_len(t: str) -> int:
        return len(builder.build(user({"type": "text", "text": t}), add_generation_prompt=True))

    text = _fit(prompt_len, tok, _TEXT_CORPUS, text_tokens, "text prompt")
    question = _fit(lambda t: len(tok.encode(t, add_special_tokens=False).ids), tok, _QUESTION_CORPUS,
                    question_tokens, "question")
    image = bench_image(Path(work_dir) / f"bench_{image_size}.png", image_size)
    text_msgs = user({"type": "text", "text": text})
    image_msgs = user({"type": "image", "image": str(image)}, {"type": "text", "text": question})
    prepared = builder.build(image_msgs, add_generation_prompt=True)
    visual = int((prepared.input_ids == builder.image_token_id).sum())
    grid = prepared.image_grid_thw[0].tolist()
    return {
        "text": {"messages": text_msgs, "prompt_tokens": prompt_len(text)},
        "image": {
            "messages": image_msgs,
            "prompt_tokens": len(prepared),
            "visual_tokens": visual,
            "question_tokens": len(tok.encode(question, add_special_tokens=False).ids),
            "image_size": [image_size, image_size],
            "grid_thw": [int(g) for g in grid],
            "patch_size": builder.image_config.patch_size,
            "merge_size": builder.image_config.merge_size,
        },
    }


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
        import resource

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
    import onnxruntime as ort

    from qvl.runtime.model import GenerationStats, Model

    threads = spec["threads"]
    _emit("qvl: loading the artifact")
    t = time.perf_counter()
    model = Model(Path(spec["artifact"]), threads=threads)
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

    return _drive(spec, one, {
        "engine": "qvl",
        "load_s": load_s,
        "rss_after_load_bytes": rss_loaded.get("VmRSS"),
        "bytes_per_token": spec["artifact_bytes_per_token"],
        "info": {
            "onnxruntime": ort.__version__,
            "providers": model.engine.decoder.get_providers(),
            "kv_mode": model.engine.kv_mode,
            "intra_op_threads": threads,
            "torch_imported": "torch" in sys.modules,
        },
    })


def _eager_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import Qwen3VLForConditionalGeneration, __version__ as tf_version
    from transformers.generation.streamers import BaseStreamer

    from qvl.runtime.image_preprocess import load_image
    from qvl.runtime.prompt import collect_images, normalize_messages
    from qvl.toolchain.export.hf_compat import image_only_processor

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["eager_dtype"]]
    _emit(f"eager: loading the checkpoint ({spec['eager_dtype']})")
    t = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        spec["checkpoint"], dtype=dtype, attn_implementation=spec["eager_attn"]
    ).eval()
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
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        t_prep = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                eos_token_id=eos_ids, pad_token_id=eos_ids[0] if eos_ids else None, streamer=timer,
            )
        n_prompt = int(inputs["input_ids"].shape[1])
        if len(timer.times) != n_new or out.shape[1] - n_prompt != n_new:
            raise RuntimeError(f"eager generate produced {len(timer.times)} tokens, expected {n_new}")
        return _run_record(t0, t_prep, vision["s"], timer.times, n_prompt), n_prompt

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
        },
    })


def _drive(spec: dict, one: Callable, result: dict) -> dict:
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
    return result


def _membw_worker(spec: dict) -> dict:
    return {"samples_gbs": measure_bandwidth(spec["threads"], spec["bytes"], spec["samples"])}


_WORKERS = {"qvl": _qvl_worker, "eager": _eager_worker, "membw": _membw_worker}


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


def _run_child(spec: dict, work_dir: Path, on_step: Callable[[str], None], threads: int) -> dict:
    name = spec["worker"]
    spec_path, out_path, log_path = (work_dir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = _child_env(1 if name == "membw" else threads)  # membw threads itself; keep BLAS out of it
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qvl.toolchain.eval.bench", "worker", str(spec_path), str(out_path)],
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


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
) -> dict:
    """Benchmark `artifact` (runtime) against `checkpoint` (eager transformers) on identical inputs.

    `progress(message, steps_done, steps_total)` is called as each step starts. Returns the JSON-able
    report documented in benchmarks/README.md.
    """
    import onnxruntime as ort

    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.engine import physical_cores
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint

    if eager_dtype not in ("fp32", "bf16"):
        raise QvlError(f"unknown eager dtype {eager_dtype!r}", hint="use fp32 or bf16")
    if repeats < 1 or new_tokens < 2 or text_tokens < 1:
        raise QvlError("repeats must be >= 1 and new tokens >= 2")
    artifact, checkpoint = Path(artifact), Path(checkpoint)
    read_manifest(artifact)  # one-line errors for a bad artifact / checkpoint before anything runs
    validate_checkpoint(checkpoint)
    threads = int(threads or physical_cores())
    llc = llc_bytes() or (32 << 20)
    bw_bytes = int(bandwidth_bytes or max(BANDWIDTH_BYTES, 8 * llc))

    total = 2 + 2 * (1 + int(warmup) + 2 * repeats)  # bandwidth x2; per engine: load, warm-up, runs
    state = {"done": 0}

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

        step("memory bandwidth (before)")
        bw = _run_child(bw_spec, wd, lambda m: None, threads)["samples_gbs"]
        qvl = _run_child({**base, "worker": "qvl", "artifact": str(artifact),
                          "artifact_bytes_per_token": weights["bytes"]}, wd, step, threads)
        eager = _run_child({**base, "worker": "eager", "checkpoint": str(checkpoint), "eager_dtype": eager_dtype,
                            "eager_attn": eager_attn}, wd, step, threads)
        step("memory bandwidth (after)")
        bw += _run_child(bw_spec, wd, lambda m: None, threads)["samples_gbs"]
    if progress:
        progress("done", total, total)

    for case in ("text", "image"):
        want = inputs[case]["prompt_tokens"]
        got = (qvl["cases"][case]["prompt_tokens"], eager["cases"][case]["prompt_tokens"])
        if got != (want, want):
            raise RuntimeError(f"{case} prompt: runtime {got[0]} / eager {got[1]} tokens, built for {want}")

    bandwidth = max(bw)
    bpt = weights["bytes"]
    roofline = bandwidth * 1e9 / bpt
    for eng in (qvl, eager):
        eng["roofline_decode_tok_s"] = bandwidth * 1e9 / eng["bytes_per_token"]
        eng["decode_efficiency"] = eng["decode_tok_s"] / eng["roofline_decode_tok_s"]
    mi = read_manifest(artifact, verify_graphs=False)["model"]
    kv_per_pos = 2 * mi["num_layers"] * mi["num_kv_heads"] * mi["head_dim"] * 4  # fp32 K and V
    cpu = cpu_info(threads)
    cpu.update(onnxruntime=ort.__version__, ort_available_providers=ort.get_available_providers(),
               ort_providers_used=qvl["info"]["providers"],
               torch=eager["info"]["torch"], torch_cpu_capability=eager["info"]["torch_cpu_capability"])
    return {
        "engines": {"qvl": qvl, "eager": eager},
        "bandwidth_gbs": bandwidth,
        "bandwidth_spread_gbs": spread(bw),
        "bandwidth_samples_gbs": bw,
        "bandwidth_buffer_bytes": bw_bytes,
        "bytes_per_token": bpt,
        "bytes_per_token_detail": weights,
        "kv_cache_bytes_per_token_text": kv_per_pos * (inputs["text"]["prompt_tokens"] + new_tokens / 2),
        "roofline_decode_tok_s": roofline,
        "decode_efficiency": qvl["decode_tok_s"] / roofline,
        "ratios": {
            "decode": _ratio(qvl["decode_tok_s"], eager["decode_tok_s"]),
            "decode_image": _ratio(qvl["decode_tok_s_image"], eager["decode_tok_s_image"]),
            "ttft_text": _ratio(qvl["ttft_text_s"], eager["ttft_text_s"]),
            "ttft_image": _ratio(qvl["ttft_image_s"], eager["ttft_image_s"]),
            "prefill": _ratio(qvl["prefill_tok_s"], eager["prefill_tok_s"]),
            "vision": _ratio(qvl["vision_s"], eager["vision_s"]),
            "peak_rss": _ratio(qvl["peak_rss_bytes"], eager["peak_rss_bytes"]),
            "load": _ratio(qvl["load_s"], eager["load_s"]),
        },
        "cpu": cpu,
        "artifact": artifact_info(artifact),
        "checkpoint": str(checkpoint),
        "config": {
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "eager_dtype": eager_dtype,
            "eager_attn": eager_attn,
            "text_prompt_tokens": inputs["text"]["prompt_tokens"],
            "new_tokens": new_tokens,
            "image": {k: v for k, v in inputs["image"].items() if k != "messages"},
            "ignore_stop": True,
        },
        "seconds": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------------
# Reporting


def plot_bench(result: dict, path: str | Path) -> Path:
    """Grouped bars, runtime vs eager: decode tok/s, TTFT text and image, peak RSS (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, e, r = result["engines"]["qvl"], result["engines"]["eager"], result["ratios"]
    panels = [
        ("decode tok/s (higher is better)", q["decode_tok_s"], e["decode_tok_s"], r["decode"]),
        ("TTFT text, s (lower is better)", q["ttft_text_s"], e["ttft_text_s"], r["ttft_text"]),
        ("TTFT image, s (lower is better)", q["ttft_image_s"], e["ttft_image_s"], r["ttft_image"]),
        ("peak RSS, GB (lower is better)", q["peak_rss_bytes"] / 1e9, e["peak_rss_bytes"] / 1e9, r["peak_rss"]),
    ]
    colors = ("#1f77b4", "#ff7f0e")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, a, b, ratio) in zip(axes, panels):
        bars = ax.bar(["qvl runtime", "eager"], [a, b], color=colors)
        for bar, v in zip(bars, (a, b)):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(title + ("" if ratio is None else f"\nqvl/eager = {ratio:.2f}x"), fontsize=10)
        ax.margins(y=0.15)
    roof = result.get("roofline_decode_tok_s")
    if roof and roof < 4 * max(q["decode_tok_s"], e["decode_tok_s"]):
        axes[0].axhline(roof, ls="--", c="gray", lw=1)
        axes[0].annotate(f"roofline {roof:.1f}", (0.5, roof), xycoords=("axes fraction", "data"),
                         ha="center", va="bottom", fontsize=8, color="gray")
    cfg, cpu = result.get("config", {}), result.get("cpu", {})
    fig.suptitle(
        f"{cpu.get('model', 'CPU')} ({cpu.get('mlas_isa', '')}), threads={cfg.get('threads')}; eager "
        f"{cfg.get('eager_dtype')}; bandwidth {result['bandwidth_gbs']:.1f} GB/s", fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def format_bench(result: dict) -> str:
    """A plain-text summary table."""
    q, e, r = result["engines"]["qvl"], result["engines"]["eager"], result["ratios"]
    cfg = result["config"]

    def row(label, a, b, ratio, fmt):
        rs = "-" if ratio is None else f"{ratio:.2f}x"
        return f"{label:<26}{fmt.format(a):>14}{fmt.format(b):>14}{rs:>10}"

    img = cfg["image"]
    lines = [
        f"threads {cfg['threads']}, repeats {cfg['repeats']}, eager {cfg['eager_dtype']} ({cfg['eager_attn']}); "
        f"text prompt {cfg['text_prompt_tokens']} tokens, image {img['image_size'][0]}x{img['image_size'][1]} "
        f"= {img['visual_tokens']} visual tokens ({img['prompt_tokens']} prompt tokens); {cfg['new_tokens']} new tokens",
        f"{'':<26}{'qvl runtime':>14}{'eager':>14}{'qvl/eager':>10}",
        row("decode tok/s (text)", q["decode_tok_s"], e["decode_tok_s"], r["decode"], "{:.2f}"),
        row("decode tok/s (image)", q["decode_tok_s_image"], e["decode_tok_s_image"], r["decode_image"], "{:.2f}"),
        row("TTFT text s", q["ttft_text_s"], e["ttft_text_s"], r["ttft_text"], "{:.3f}"),
        row("TTFT image s", q["ttft_image_s"], e["ttft_image_s"], r["ttft_image"], "{:.3f}"),
        row("prefill tok/s (text)", q["prefill_tok_s"], e["prefill_tok_s"], r["prefill"], "{:.1f}"),
        row("vision encoder s", q["vision_s"], e["vision_s"], r["vision"], "{:.3f}"),
        row("peak RSS GB", q["peak_rss_bytes"] / 1e9, e["peak_rss_bytes"] / 1e9, r["peak_rss"], "{:.3f}"),
        row("load s", q["load_s"], e["load_s"], r["load"], "{:.2f}"),
        row("weights read/token MB", q["bytes_per_token"] / 1e6, e["bytes_per_token"] / 1e6, None, "{:.1f}"),
        row("decode roofline tok/s", q["roofline_decode_tok_s"], e["roofline_decode_tok_s"], None, "{:.2f}"),
        row("decode efficiency", q["decode_efficiency"], e["decode_efficiency"], None, "{:.1%}"),
        f"memory bandwidth {result['bandwidth_gbs']:.1f} GB/s best "
        f"(min/median/max {' / '.join(f'{v:.1f}' for v in result['bandwidth_spread_gbs'])}); "
        f"artifact {result['artifact']['size_bytes'] / 1e9:.3f} GB on disk",
        result["cpu"]["note"],
    ]
    return "\n".join(lines)


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
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.stderr.write("usage: python -m qvl.toolchain.eval.bench worker SPEC.json OUT.json (internal)\n")
    sys.exit(2)
