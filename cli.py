"""`qvl-compile`: the command-line front end.

Commands import their heavy dependencies lazily, so `qvl-compile run` on a laptop with only the base
install never imports torch. A `QvlError` (bad user input) or a usage error (unknown flag, missing or
unparsable option) prints one `error:` line and a hint and exits 2; a failed check (parity) exits 1;
Ctrl-C exits 130 with `aborted`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from qvl.errors import QvlError

app = typer.Typer(
    name="qvl-compile",
    help="Compile Qwen3-VL checkpoints into artifacts for AVX2 laptops and Pascal GPUs, and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=err, transient=True,
    )


def _check_options(**values) -> None:
    """Range-check numeric options before any work starts (exit 2, the accepted range in the message).
    The rules live in the runtime (`check_options`) so the Python API rejects exactly the same values."""
    from qvl.runtime.sampling import check_options

    check_options(flags=True, **values)


def _check_text(flag: str, *values: str) -> None:
    """Text options must be UTF-8: non-UTF-8 argv bytes reach Python as lone surrogates."""
    from qvl.runtime.prompt import check_utf8

    for value in values:
        check_utf8(value, flag)


def _device_note(note: str | None) -> None:
    """`--device auto` ended on the CPU: say why, once, on stderr."""
    if note:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


RAM_BUDGET_HELP = ("run a partitioned artifact within this much process RAM (e.g. 1.5GiB): parts that do not fit are "
                   "streamed from disk per use (slower, same output); `qvl-compile plan` shows the placement")
VRAM_BUDGET_HELP = ("put decoder parts on the GPU up to this much device memory (e.g. 2GiB; enforced through the CUDA "
                    "arena limit), the rest on the CPU; needs a partitioned artifact")
CONTEXT_HELP = ("with --ram-budget / --vram-budget: positions (prompt + answer) the plan holds a KV cache for "
                "(default 4096); a longer conversation is refused with the numbers")
WARM_HELP = ("read the artifact's files into the page cache in parallel sequential reads while the sessions load "
             "(benchmarks/README.md \"Cold start\" says when that helps)")


def _budgets(ram_budget: Optional[str], vram_budget: Optional[str]) -> tuple[int | None, int | None]:
    """--ram-budget / --vram-budget -> bytes, checked before any work."""
    if ram_budget is None and vram_budget is None:
        return None, None
    from qvl.runtime.placement import parse_size

    return (None if ram_budget is None else parse_size(ram_budget, "--ram-budget"),
            None if vram_budget is None else parse_size(vram_budget, "--vram-budget"))


def _load(artifact: Path, device: str, threads: int | None, ram_budget: int | None = None,
          vram_budget: int | None = None, warm: bool = False, context: int | None = None, vision: bool = True):
    from qvl.runtime import load

    model = load(artifact, device=device, threads=threads, ram_budget=ram_budget, vram_budget=vram_budget, warm=warm,
                 context=context, vision=vision)
    _device_note(model.device_note)
    if model.plan is not None:
        from qvl.runtime.backends.select import plan_note

        _device_note(plan_note(model.plan))
    return model


MAX_IMAGE_TOKENS_HELP = ("image tokens one image may become (default 4096, runtime/image_preprocess.DEFAULT_MAX_IMAGE_TOKENS): "
                         "a larger image is refused with the numbers, not shrunk (see --max-pixels); vision memory "
                         "grows with it (~0.13 MB per patch, 4 patches per token, at 2B size)")
MIN_PIXELS_HELP = "resize bound: an image smaller than this many pixels is scaled up (default: the artifact's preprocessor_config.json)"
MAX_PIXELS_HELP = "resize bound: an image larger than this many pixels is scaled down (default: the artifact's preprocessor_config.json)"


def _check_image_limits(max_image_tokens, min_pixels, max_pixels) -> None:
    """--max-image-tokens / --min-pixels / --max-pixels: integers >= 1, min <= max; checked before any work."""
    from qvl.runtime.image_preprocess import check_image_limits

    check_image_limits(flags=True, max_image_tokens=max_image_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise QvlError(f"--min-pixels ({min_pixels}) is larger than --max-pixels ({max_pixels})",
                       hint="give --min-pixels <= --max-pixels")


def _messages(images: list[Path], prompt: str, videos: list[Path] = ()) -> list[dict]:
    content = [{"type": "image", "image": str(p)} for p in images]
    content += [{"type": "video", "video": str(p)} for p in videos]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


VIDEO_HELP = "video file (repeatable; mp4, mkv, webm, ... decoded with PyAV, the `video` extra)"
FPS_HELP = "frames sampled per second of video (default: the artifact's video processor, 2)"
VIDEO_MAX_FRAMES_HELP = "at most this many frames sampled from one video (default: the video processor's, 768)"
VIDEO_TOTAL_PIXELS_HELP = ("pixel budget of one video over all its sampled frames: frames are resized so that "
                           "frames x width x height stays under it (default: the video processor's size.longest_edge)")
MAX_VIDEO_TOKENS_HELP = ("video tokens one video may become (default 16384, runtime/video.DEFAULT_MAX_VIDEO_TOKENS): "
                         "a larger video is refused with the numbers before any frame is decoded")


@app.command("make-checkpoint")
def make_checkpoint_cmd(
    preset: str = typer.Option(..., help="tiny | 2b | 4b | 8b (the published Qwen3-VL-{2B,4B,8B}-Instruct configs, random bf16 weights; 8b is untied) | sentinel (trained on synthetic VQA, ~15-20 min on 2 cores)"),
    out: Path = typer.Option(..., help="output directory (written atomically)"),
    seed: int = typer.Option(0, help="weight seed"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    untied: bool = typer.Option(False, "--untied", help="untied lm_head: tie_word_embeddings false and a separate lm_head.weight"),
    vocab_size: Optional[int] = typer.Option(None, help="a smaller vocabulary (>= 64): the tokenizer and every token id follow"),
):
    """Write a synthetic Qwen3-VL checkpoint in real Hugging Face format."""
    from qvl.toolchain.checkpoints.presets import MIN_VOCAB, PRESETS

    if preset == "sentinel" and (untied or vocab_size is not None):
        raise QvlError("--untied / --vocab-size do not apply to the sentinel (a trained, tied model)",
                       hint="use them with --preset tiny | 2b | 4b | 8b")
    if vocab_size is not None and vocab_size < MIN_VOCAB:
        raise QvlError(f"--vocab-size must be at least {MIN_VOCAB} (the 26 Qwen special tokens and a learned alphabet), "
                       f"got {vocab_size}")
    if preset == "sentinel":
        from qvl.toolchain.eval.sentinel_training import train_sentinel

        with _progress() as prog:
            task = prog.add_task("training the sentinel", total=1.0)
            report = train_sentinel(out, seed=seed, overwrite=overwrite,
                                    progress=lambda step, steps, loss: prog.update(task, completed=step / steps))
        err.print(report.summary())
        return
    if preset not in PRESETS:
        raise QvlError(f"unknown preset {preset!r}", hint=f"choose one of: {', '.join([*PRESETS, 'sentinel'])}")
    from qvl.toolchain.checkpoints.synthetic import make_checkpoint

    with _progress() as prog:
        task = prog.add_task(f"writing {preset} checkpoint", total=1.0)
        report = make_checkpoint(
            preset, out, seed=seed, overwrite=overwrite, untied=untied, vocab_size=vocab_size,
            progress=lambda done, total: prog.update(task, completed=done / total),
        )
    err.print(
        f"wrote {report.out} ({report.num_parameters:,} parameters, {report.num_bytes / 1e9:.2f} GB "
        f"in {report.num_shards} file(s), {report.seconds:.1f} s)"
    )
    typer.echo(f"parameters: {report.num_parameters}")


@app.command("reference")
def reference_cmd(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    image: List[Path] = typer.Option([], "--image", help="image file (repeatable)"),
    prompt: str = typer.Option(..., help="question / instruction text"),
    max_new_tokens: int = typer.Option(32, help="tokens to generate"),
    as_json: bool = typer.Option(False, "--json", help="print token ids and text as JSON"),
):
    """Answer an image prompt with eager PyTorch (fp32, greedy): the parity oracle."""
    _check_options(max_new_tokens=max_new_tokens)
    _check_text("--prompt", prompt)
    from qvl.toolchain.eval.reference import EagerReference

    ref = EagerReference(checkpoint)
    res = ref.answer(_messages(image, prompt), max_new_tokens=max_new_tokens, keep_logits=False)
    if as_json:
        typer.echo(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": int(len(res.prompt_ids))}))
    else:
        typer.echo(res.text)


CACHE_HELP = ("write the weights into the content-addressed weight cache: artifacts from one checkpoint share every "
              "identical tensor through hard links (`qvl-compile cache ls`); the artifact stays a self-contained "
              "directory (`qvl-compile pack` makes a format-1 copy)")
CACHE_DIR_HELP = "weight cache directory (implies --cache; default $QVL_CACHE/weights, else ~/.cache/qvl-compile/weights)"


def _open_weight_cache(cache: bool, cache_dir: Optional[Path], create: bool = True):
    """The weight cache a command writes into (None without --cache / --cache-dir); checked before any work."""
    if not cache and cache_dir is None:
        return None
    from qvl.artifacts.content_store import WeightCache

    return WeightCache.open(cache_dir, create=create)


def _into_weight_cache(out: Path, weight_cache) -> None:
    if weight_cache is None:
        return
    from qvl.artifacts.content_store import intern

    with err.status("weight cache") as status:
        report = intern(out, weight_cache, step=lambda m: status.update(m))
    err.print(report.summary(), markup=False, highlight=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Hugging Face Qwen3-VL checkpoint directory"),
    out: Path = typer.Option(..., help="artifact directory to write (atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    cache: bool = typer.Option(False, "--cache", help=CACHE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
):
    """Export a checkpoint to an fp32 ONNX artifact (vision encoder + KV-cached decoder)."""
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint
    from qvl.toolchain.fsutil import check_output_target

    # A bad checkpoint or --out is refused before the exporter's imports (onnx, onnx-ir: ~1.5 s); the exporter
    # checks both again under its output lock.
    check_output_target(out, overwrite, (checkpoint,))
    validate_checkpoint(checkpoint)
    from qvl.toolchain.export.exporter import export_artifact

    weight_cache = _open_weight_cache(cache, cache_dir)
    with err.status("exporting") as status:
        report = export_artifact(checkpoint, out, overwrite=overwrite, step=lambda m: status.update(m))
    err.print(
        f"wrote {report.out}: {report.weight_bytes / 1e9:.3f} GB of weights "
        f"({report.dedup_bytes / 1e6:.1f} MB deduplicated), {report.seconds:.1f} s"
    )
    _into_weight_cache(out, weight_cache)


def _print_parity(report) -> None:
    from rich.table import Table

    lora = report.adapter
    table = Table(title=f"parity: {report.artifact} vs eager fp32" + (
        "" if lora is None else f" + LoRA {lora['name']} (peft, scale {lora['scale']:g})"))
    for col in ("case", "prompt", "steps", "max |Δlogit|", "vision max |Δ|", "greedy identical", "ok"):
        table.add_column(col)
    for c in report.cases:
        table.add_row(
            c.name, str(c.prompt_tokens), str(len(c.step_max_abs_diff)), f"{c.max_abs_logit_diff:.2e}",
            "-" if c.vision_max_abs_diff is None else f"{c.vision_max_abs_diff:.2e}",
            "yes" if c.greedy_identical else "NO", "✓" if c.passed else "✗",
        )
    Console().print(table)
    Console().print(f"tolerances: logits {report.logit_tolerance:g}, vision {report.vision_tolerance:g}; "
                    f"{'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f} s")


@app.command("compile")
def compile_cmd(
    source: Path = typer.Argument(..., help="checkpoint directory (exported first) or fp32 artifact"),
    target: str = typer.Option("cpu", help="cpu (= cpu-avx2) | cpu-avx512 | sm61 | sm75+"),
    out: Path = typer.Option(..., help="artifact directory to write (atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    dump_after: Optional[str] = typer.Option(None, help="also write the graphs after this pass into OUT/dump/"),
    weights: str = typer.Option("fp32", help="fp32 | int8 | int4 (weight-only MatMulNBits, accuracy-budgeted)"),
    block_size: Optional[int] = typer.Option(None, help="quantization block size (default: int4 128 where K allows, else 32)"),
    budget_kl: Optional[float] = typer.Option(0.01, help="max mean KL vs the fp32 artifact; layers over it stay fp32"),
    min_agreement: Optional[float] = typer.Option(0.9, help="min greedy agreement vs the fp32 artifact"),
    no_budget: bool = typer.Option(False, "--no-budget", help="quantize every eligible layer without measuring"),
    threads: Optional[int] = typer.Option(None, help="threads for the budget measurements"),
    sparsity: Optional[float] = typer.Option(None, help="opt-in MLP channel sparsity: fraction of SwiGLU channels to remove per layer (budgeted)"),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="int8/int4 with per-block zero points (refused for int4 on cpu-avx2: onnxruntime #29853)"),
    cache: bool = typer.Option(False, "--cache", help=CACHE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    lora: Optional[Path] = typer.Option(None, "--lora", help="merge this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors: text and vision linears, any rank) into the checkpoint's weights before export"),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale", help="multiply the adapter's alpha/r scaling (default 1.0; 0: the base model)"),
):
    """Export (if needed), run the target's pass pipeline and write a compiled artifact (or, for the
    TensorRT targets sm61 / sm75+, an engine kit to build on the user's GPU with `build-engine`)."""
    _check_options(threads=threads)
    from qvl.toolchain.compile.pipeline import compile_artifact, compile_with_precision
    from qvl.toolchain.compile.targets import get_target

    weight_cache = _open_weight_cache(cache, cache_dir)
    adapter = None
    if lora is not None or lora_scale is not None:
        from qvl.toolchain.export.lora import adapter_option

        adapter = adapter_option(source, lora, lora_scale)  # every adapter problem before any work
        err.print(adapter.summary(), markup=False, highlight=False)

    if not get_target(target).ort_contrib_ops:
        if weights not in ("fp32", "int8"):
            raise QvlError(f"target {get_target(target).name} has no {weights} path",
                           hint="TensorRT kits are FP32, or INT8 through explicit Q/DQ: use --weights fp32 or int8")
        if sparsity is not None:
            raise QvlError("--sparsity is not available for TensorRT engine kits", hint="compile for --target cpu")
        if asymmetric:
            raise QvlError("--asymmetric is not available for TensorRT engine kits",
                           hint="TensorRT 8.6 takes symmetric INT8 Q/DQ only: drop --asymmetric")
        from qvl.toolchain.tensorrt.command import kit_command

        budget = None
        if weights == "int8" and not no_budget:
            from qvl.toolchain.quant.accuracy_budget import AccuracyBudget

            budget = AccuracyBudget(max_mean_kl=budget_kl, min_greedy_agreement=min_agreement)
        from qvl.toolchain.export.lora import merged_source

        with err.status("building engine kit") as status, \
                merged_source(source, adapter, out, overwrite, step=lambda m: status.update(m)) as kit_source:
            kit_command(kit_source, target, out, overwrite=overwrite, echo=lambda m: err.print(m, highlight=False),
                        step=lambda m: status.update(m), weights=weights, budget=budget, threads=threads)
        _into_weight_cache(out, weight_cache)
        return

    from qvl.toolchain.compile.pipeline import post_stages

    if asymmetric and weights == "fp32":
        raise QvlError("--asymmetric needs --weights int8 or int4", hint="add --weights int4 (or drop --asymmetric)")
    if weights != "fp32" or sparsity is not None or post_stages(get_target(target)):
        from qvl.toolchain.quant.accuracy_budget import AccuracyBudget

        budget = None if no_budget else AccuracyBudget(max_mean_kl=budget_kl, min_greedy_agreement=min_agreement)
        with err.status("compiling") as status:
            compile_with_precision(source, target, out, weights=weights, block_size=block_size,
                                             budget=budget, overwrite=overwrite, threads=threads,
                                             step=lambda m: status.update(m), sparsity=sparsity,
                                             symmetric=not asymmetric, lora=adapter)
        from qvl.artifacts.manifest import read_manifest

        written = read_manifest(out, verify_graphs=False)
        for kind in ("sparsity", "precision"):
            rec = (getattr(written, kind) or {}).get("budget_search")
            if rec:
                meas = rec["measured"]
                back = rec.get("rolled_back") or []
                err.print(f"{kind}: accuracy budget {'met' if rec['within_budget'] else 'NOT met'}: mean KL "
                          f"{meas['mean_kl']:.4g}, greedy agreement {meas['greedy_agreement']:.3f}, max |Δlogit| "
                          f"{meas['max_abs_logit_diff']:.3g}; layers rolled back: {', '.join(back) or 'none'}")
        gain = (written.sparsity or {}).get("gain")
        if gain:
            err.print(f"sparsity: {gain['statement']}")
        err.print(f"wrote {out} ({weights} weights{'' if sparsity is None else f', MLP sparsity {sparsity:g}'})")
        _into_weight_cache(out, weight_cache)
        return
    with err.status("compiling") as status:
        report = compile_artifact(source, target, out, overwrite=overwrite, dump_after=dump_after,
                                  step=lambda m: status.update(m), lora=adapter)
    for r in report.pass_reports:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if v) or "no change"
        err.print(f"  {r['name']:<24} {r['graph']:<8} {counts}" + (f"  ({len(r['skipped'])} skipped)" if r["skipped"] else ""))
    err.print(f"wrote {report.out} for {report.target} in {report.seconds:.1f} s")
    _into_weight_cache(out, weight_cache)


@app.command("bench")
def bench_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    checkpoint: Path = typer.Option(..., help="the checkpoint it came from (eager baseline)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG bar chart here"),
    eager_dtype: str = typer.Option("fp32", help="fp32 | bf16, or several: bf16,fp32 (one eager run each; the first is the ratio baseline)"),
    threads: Optional[int] = typer.Option(None, help="threads for both engines (default: physical cores)"),
    repeats: int = typer.Option(3, help="timed runs per case (medians reported)"),
    device: str = typer.Option("auto", help="auto (CUDA if usable, else CPU with a note) | cpu | cuda | trt (engine kit); with cuda eager runs on the GPU too"),
    eager_cache: Optional[str] = typer.Option(None, help="eager KV cache: dynamic (default) | static"),
    peer: List[str] = typer.Option([], "--peer", help="also run this CPU runtime on the same inputs and threads: llama.cpp (built once and cached, the checkpoint converted to GGUF; see benchmarks/README.md)"),
    llamacpp_dir: Optional[Path] = typer.Option(None, "--llamacpp-dir", envvar="QVL_LLAMACPP_DIR", help="an existing llama.cpp build (llama-bench, llama-mtmd-cli, llama-quantize) instead of building one"),
):
    """Artifact (runtime) vs eager PyTorch (and --peer llama.cpp) on the same inputs: decode tok/s, TTFT, RSS, roofline."""
    _check_options(threads=threads, repeats=repeats)
    from qvl.toolchain.eval.peer_run import check_peer_names

    peers = check_peer_names(peer)
    if peers and llamacpp_dir:
        from qvl.toolchain.eval.peer_llamacpp import existing_build

        existing_build(llamacpp_dir)  # a wrong --llamacpp-dir / QVL_LLAMACPP_DIR is a one-line error before any work
    from qvl.runtime.backends.select import resolve
    from qvl.toolchain.eval.bench import bench_command

    dtypes = [d.strip() for d in eager_dtype.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        raise QvlError(f"unknown --eager-dtype {eager_dtype!r}", hint="fp32 | bf16 | bf16,fp32")
    if eager_cache not in (None, "dynamic", "static"):
        raise QvlError(f"unknown --eager-cache {eager_cache!r}", hint="dynamic | static")
    if peers and device not in ("auto", "cpu"):
        raise QvlError(f"--peer runs llama.cpp on the CPU, not next to --device {device}", hint="use --device cpu with --peer")
    sel = resolve(artifact, "cpu" if peers else device)  # the runtime worker loads the artifact on the resolved device
    _device_note(sel.note)
    bench_command(artifact, checkpoint, dtypes[0], threads, repeats, as_json, plot, device=sel.device,
                  extra_eager_dtypes=tuple(dtypes[1:]), eager_cache=None if eager_cache == "dynamic" else eager_cache,
                  peers=peers, llamacpp_dir=llamacpp_dir)


@app.command("build-engine")
def build_engine_cmd(
    kit: Path = typer.Argument(..., help="engine kit from `compile --target sm61|sm75+`"),
    out: Optional[Path] = typer.Option(None, help="engine directory (default: KIT/engines)"),
    allow_target_mismatch: bool = typer.Option(False, help="build even if the library/GPU cannot run the kit's target (proves parsing only)"),
):
    """Build TensorRT engines from a kit with whichever of tensorrt (>= 8.6) or tensorrt_rtx is installed."""
    from qvl.toolchain.tensorrt.build import build_engine_command

    build_engine_command(kit, out, allow_target_mismatch=allow_target_mismatch, echo=lambda m: err.print(m, highlight=False))


@app.command("eval")
def eval_cmd(
    source: Path = typer.Argument(..., help="artifact (runtime) or checkpoint (eager PyTorch)"),
    set_: str = typer.Option("synthetic-vqa", "--set", help="synthetic-vqa or a JSONL file of {images, question, answer}"),
    n: int = typer.Option(200, "--n", help="questions from the held-out synthetic split"),
    checkpoint: Optional[Path] = typer.Option(None, help="with an artifact: also answer with eager PyTorch and report agreement"),
    max_new_tokens: int = typer.Option(8),
    threads: Optional[int] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
    device: str = typer.Option("auto", help="artifact only: auto (CUDA if usable, else CPU with a note) | cpu | cuda | trt (engine kit)"),
):
    """Exact-match accuracy on a VQA set (and agreement with eager answers)."""
    _check_options(n=n, max_new_tokens=max_new_tokens, threads=threads)
    from qvl.runtime.backends.select import check_device

    check_device(device)
    from qvl.toolchain.eval.evaluate import agreement, eager_answer_fn, evaluate
    from qvl.toolchain.eval.synthetic_vqa import load_jsonl, make_samples

    samples = make_samples("test", n) if set_ == "synthetic-vqa" else load_jsonl(Path(set_))
    model = None
    if (source / "manifest.json").is_file():
        model = _load(source, device, threads)
        answer = lambda messages, images: model.generate(messages, images=images, max_new_tokens=max_new_tokens)  # noqa: E731
    else:
        answer = eager_answer_fn(source, max_new_tokens=max_new_tokens, threads=threads)
    with _progress() as prog:
        task = prog.add_task("answering", total=len(samples))
        report = evaluate(answer, samples, progress=lambda i, total: prog.update(task, completed=i))
    out = {"source": str(source), "set": set_, "accuracy": report.accuracy, "correct": report.correct,
           "total": report.total, "by_kind": report.by_kind, "seconds": round(report.seconds, 1)}
    out.update(_linear_kernel(model))
    if checkpoint is not None:
        ref = evaluate(eager_answer_fn(checkpoint, max_new_tokens=max_new_tokens, threads=threads), samples)
        out["eager_accuracy"] = ref.accuracy
        out["agreement_with_eager"] = agreement(report, ref)
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(report.summary() + (f"; eager {out['eager_accuracy']:.4f}, agreement {out['agreement_with_eager']:.4f}"
                                       if checkpoint is not None else ""))


@app.command("parity")
def parity_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    checkpoint: Path = typer.Option(..., help="the checkpoint it came from (eager reference)"),
    steps: int = typer.Option(32, help="greedy decode steps per case"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    device: str = typer.Option("cpu", help="where the artifact runs: cpu | cuda | trt (eager stays fp32 on the CPU)"),
    logit_tol: Optional[float] = typer.Option(None, help="max |logit difference| allowed (default 1e-4: fp32)"),
    vision_tol: Optional[float] = typer.Option(None, help="max |vision feature difference| allowed (default 1e-4)"),
    lora: Optional[Path] = typer.Option(None, "--lora", help="an artifact compiled with --lora: its adapter directory (default: the path its manifest records; the digest must match), applied to eager through peft"),
):
    """Compare an artifact with eager PyTorch on the parity suite; exit 0 only if every threshold holds."""
    _check_options(steps=steps)
    import tempfile

    from qvl.runtime.backends.select import check_device, resolve
    from qvl.toolchain.eval.parity import LOGIT_TOL, VISION_TOL, run_parity

    if check_device(device) == "auto":
        raise QvlError("parity needs an explicit --device", hint="cpu | cuda | trt")
    for flag, tol in (("--logit-tol", logit_tol), ("--vision-tol", vision_tol)):
        if tol is not None and not (tol > 0 and tol < float("inf")):
            raise QvlError(f"{flag} must be a positive number, got {tol}")
    sel = resolve(artifact, device)
    with tempfile.TemporaryDirectory() as tmp, err.status("parity") as status:
        report = run_parity(artifact, checkpoint, Path(tmp), steps=steps, device=sel.device,
                            logit_tol=LOGIT_TOL if logit_tol is None else logit_tol,
                            vision_tol=VISION_TOL if vision_tol is None else vision_tol, lora=lora,
                            progress=lambda name, i, n: status.update(f"parity case {i + 1}/{n}: {name}"))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_parity(report)
    raise typer.Exit(0 if report.passed else 1)


@app.command("inspect-precision")
def inspect_precision_cmd(
    artifact: Path = typer.Argument(..., help="quantized engine kit or artifact (e.g. `compile --target sm61 --weights int8`)"),
    against: Optional[Path] = typer.Option(None, help="reference kit/artifact, e.g. the fp32 kit it was made from "
                                                      "(default: the one its manifest records; INT8 kits record none)"),
    tolerance: Optional[float] = typer.Option(None, help="max |Δ| above which a layer is reported as over (default 0.05)"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads (default 1: reproducible)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Mark every tensor of the decoder (and vision) graph as an output with Polygraphy, run the artifact and a
    reference on the same inputs (ONNX Runtime CPU) and report the error per layer (exit 0 either way)."""
    _check_options(threads=threads)
    from qvl.toolchain.eval.inspect_precision import DEFAULT_TOLERANCE, inspect_precision

    with err.status("inspecting precision") as status:
        report = inspect_precision(artifact, against, DEFAULT_TOLERANCE if tolerance is None else tolerance, threads,
                                   progress=lambda m: status.update(m))
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


@app.command("verify")
def verify_cmd(artifact: Path = typer.Argument(..., help="artifact directory")):
    """Check every graph, side file and weight-store chunk of an artifact against its manifest (and that every
    path stays inside it), regardless of this machine's verified record; exit 0 only if all match."""
    from qvl.artifacts.integrity import verify_artifact

    r = verify_artifact(artifact)
    weights = (f"weights: {r['objects']} blake3-named payloads" if r["format_version"] == 2
               else f"weight store: {r['chunks']} blake3 chunks")
    typer.echo(f"OK {artifact}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB verified in {r['seconds']:.2f} s "
               f"({weights}, digest {r['digest'][:16]})")
    from qvl.artifacts.manifest import read_manifest

    lora = read_manifest(artifact, verify_graphs=False).adapter
    if lora is not None:
        towers = ", ".join(f"{n} {k}" for k, n in lora.modules.items() if n)
        typer.echo(f"  merged LoRA adapter {lora.name}: digest {lora.digest[:16]}, scale {lora.scale:g}, rank "
                   f"{'/'.join(map(str, lora.ranks))}, {towers or 'no'} modules")


@app.command("pack")
def pack_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory (format 1, or format 2 from --cache)"),
    out: Path = typer.Option(..., help="directory to write (atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
):
    """Write a standalone copy of an artifact for another machine: verified, format 1 (one weights.bin), real
    copies of every file, nothing linked to the weight cache. Engines (machine-specific) are not copied."""
    from qvl.artifacts.content_store import pack

    with err.status("packing") as status:
        report = pack(artifact, out, overwrite=overwrite, step=lambda m: status.update(m))
    err.print(report.summary(), markup=False, highlight=False, soft_wrap=True)


@app.command("partition")
def partition_cmd(
    artifact: Path = typer.Argument(..., help="compiled ONNX Runtime artifact directory"),
    out: Path = typer.Option(..., help="partitioned artifact directory to write (atomically)"),
    every: Optional[int] = typer.Option(None, help="a new part every N decoder layers (1: one part per layer)"),
    at: Optional[str] = typer.Option(None, help="comma-separated layer indices where a new part starts, e.g. 7,14,21"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
):
    """Cut the decoder into layer-range parts (plus the final norm + lm_head as its own part) that share the
    artifact's weights, so `run --ram-budget / --vram-budget` can place, stream and split them. Same output as the
    unpartitioned artifact, bit for bit on the same device; weight files are hard-linked, not copied."""
    from qvl.toolchain.compile.partition import partition_artifact

    with err.status("partitioning") as status:
        report = partition_artifact(artifact, out, every=every, at=at, overwrite=overwrite,
                                    step=lambda m: status.update(m))
    typer.echo(f"wrote {out}: {report.summary()}")
    for p in report.parts:
        start, stop = p["layers"]
        what = f"layers {start}..{stop - 1}" if stop > start else "final norm + lm_head"
        typer.echo(f"  {p['name']:<14} {what:<22} {p['weight_bytes'] / 1e6:9.2f} MB")


@app.command("plan")
def plan_cmd(
    artifact: Path = typer.Argument(..., help="partitioned artifact directory (`qvl-compile partition`)"),
    vram: Optional[str] = typer.Option(None, help="VRAM the parts may use, e.g. 2GiB (default: the GPU's, from NVML)"),
    ram: Optional[str] = typer.Option(None, help="RAM budget, e.g. 1.5GiB or 8GB: parts past it are streamed"),
    device: str = typer.Option("auto", help="auto (CUDA if usable, else CPU) | cpu | cuda"),
    context: Optional[int] = typer.Option(None, help="positions the KV cache is sized for (default: min(model, 4096))"),
    prompt_tokens: int = typer.Option(256, help="text tokens of the prompt the TTFT is predicted for (no image)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the measurement sessions"),
    no_measure: bool = typer.Option(False, "--no-measure", help="stated speeds only (no timing on this machine)"),
    as_json: bool = typer.Option(False, "--json", help="print Plan.to_json()"),
    text_only: bool = typer.Option(False, "--text-only", help="plan no room for the vision encoder (what `run` "
                                                               "does for a prompt without --image / --video)"),
):
    """Where each decoder part and the vision encoder run under a RAM / VRAM budget, why, and the predicted time to
    first token and decode tok/s (measured on this machine in a few seconds, or stated with --no-measure)."""
    _check_options(threads=threads)
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.placement import describe, make_plan, measure_host, parse_size, require_partition, resolve_device

    ram_budget = parse_size(ram, "--ram") if ram is not None else None
    vram_budget = parse_size(vram, "--vram") if vram is not None else None
    manifest = read_manifest(artifact, verify_graphs=False)
    require_partition(manifest)
    resolved, _ = resolve_device(manifest, device)
    speeds = measure_host(manifest, threads=threads, device=resolved, measure=not no_measure, prompt_tokens=prompt_tokens)
    plan = make_plan(manifest, ram_budget=ram_budget, vram_budget=vram_budget, device=device, context=context,
                     prompt_tokens=prompt_tokens, speeds=speeds, vision=not text_only)
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=1))
        return
    for line in describe(plan):
        typer.echo(line)


cache_app = typer.Typer(help="The content-addressed weight cache that `export` / `compile --cache` write into.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@cache_app.command("ls")
def cache_ls_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="print everything (every payload, its size, links and users) as JSON"),
    objects: bool = typer.Option(False, "--objects", help="also list every payload"),
):
    """List the cached payloads: sizes, and which registered artifacts reference what."""
    from qvl.artifacts.content_store import WeightCache, listing

    info = listing(WeightCache.open(cache_dir))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    t = info["totals"]
    typer.echo(f"weight cache {info['cache']}: {t['objects']} payloads, {_mb(t['bytes'])} "
               f"({_mb(t['disk_bytes'])} on disk), {t['artifacts']} artifacts")
    for a in info["artifacts"]:
        state = "" if a["state"] == "ok" else f"  [{a['state']}]"
        missing = f", {a['not_in_cache']} payloads only in the artifact" if a["not_in_cache"] else ""
        typer.echo(f"  {a['path']}  {a['target'] or '?'}: {a['objects']} payloads, {_mb(a['bytes'])}: "
                   f"{_mb(a['unique_bytes'])} unique, {_mb(a['shared_bytes'])} shared{missing}{state}")
    typer.echo(f"unreferenced: {t['unreferenced_objects']} payloads, {_mb(t['unreferenced_bytes'])} "
               f"(`qvl-compile cache gc` deletes them)")
    if t["linked_elsewhere_objects"]:
        typer.echo(f"linked from unregistered paths (moved artifacts?): {t['linked_elsewhere_objects']} payloads, "
                   f"{_mb(t['linked_elsewhere_bytes'])} (kept by gc)")
    if objects:
        for o in info["objects"]:
            users = ", ".join(o["artifacts"]) or ("-" if o["links"] == 1 else f"{o['links'] - 1} unregistered link(s)")
            typer.echo(f"  {o['digest'][:16]}  {o['bytes']:>12}  {users}")


@cache_app.command("verify")
def cache_verify_cmd(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP)):
    """Re-hash every cached payload against its name (blake3), regardless of any verified record."""
    from qvl.artifacts.content_store import WeightCache, verify_cache

    r = verify_cache(WeightCache.open(cache_dir))
    typer.echo(f"OK {r['cache']}: {r['objects']} payloads, {_mb(r['bytes'])} verified in {r['seconds']:.2f} s")


@cache_app.command("gc")
def cache_gc_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be deleted, delete nothing"),
):
    """Delete the payloads that no registered, still-existing artifact needs (and nothing else links)."""
    from qvl.artifacts.content_store import WeightCache, gc

    r = gc(WeightCache.open(cache_dir), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {r['deleted_objects']} payloads ({_mb(r['freed_bytes'])}), kept {r['kept_objects']} "
               f"({_mb(r['kept_bytes'])}); {'would forget' if dry_run else 'forgot'} {len(r['pruned_artifacts'])} "
               f"deleted or uncached artifacts")


@cache_app.command("add")
def cache_add_cmd(
    artifacts: List[Path] = typer.Argument(..., help="artifact directories to move into the cache"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
):
    """Move existing artifacts' weights into the cache (format 2, hard links), so they share identical payloads."""
    from qvl.artifacts.content_store import WeightCache

    weight_cache = WeightCache.open(cache_dir, create=True)
    for art in artifacts:
        _into_weight_cache(art, weight_cache)


SPECULATIVE_HELP = ("exact speculative decoding (greedy only): tokens drafted from the prompt and the answer so far "
                    "are verified in one decoder step; same output, fewer steps on copy-heavy answers")
DRAFT_TOKENS_HELP = "tokens drafted per step with --speculative, 1-64 (default 8; implies --speculative)"


def _draft_config(speculative: bool, draft_tokens: Optional[int], temperature: Optional[float]):
    """--speculative / --draft-tokens -> a DraftConfig or None, checked before any work."""
    if draft_tokens is None and not speculative:
        return None
    if draft_tokens is not None and not 1 <= draft_tokens <= 64:
        raise QvlError(f"--draft-tokens must be an integer in [1, 64], got {draft_tokens!r}")
    if temperature is not None and temperature > 0:
        raise QvlError("--speculative is greedy only: it cannot be combined with --temperature > 0",
                       hint="drop --temperature, or --speculative")
    from qvl.runtime.speculative import DraftConfig

    return DraftConfig() if draft_tokens is None else DraftConfig(max_draft=draft_tokens)


GREEDY_HELP = ("decode greedily (argmax: the reproducible answer, the one parity and eval check) instead of the "
               "artifact's generation_config.json defaults (Qwen3-VL-Instruct samples: temperature 0.7, top-p 0.8, "
               "top-k 20)")
TEMPERATURE_HELP = "sample at this temperature; 0 = greedy (default: the artifact's generation_config.json)"
TOP_P_HELP = "nucleus sampling threshold when sampling (default: generation_config.json, else 1.0)"
TOP_K_HELP = "sample among the k most likely tokens; 0 = no limit (default: generation_config.json, else 50)"


def _decoding(model, greedy: bool, temperature: Optional[float], top_p: Optional[float], top_k: Optional[int],
              speculative: bool):
    """What run / chat decode with (`generation_defaults.resolve_decoding`); `model=None` checks the flags only."""
    from qvl.runtime.generation_defaults import GenerationDefaults, resolve_decoding

    defaults = model.generation_defaults if model is not None else GenerationDefaults()
    return resolve_decoding(defaults, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                            speculative=speculative)


DRAW_BOXES_HELP = ("draw the answer's boxes and points (with labels) on the original image and write it to this "
                   "file (atomically; .png, .jpg, ...); needs exactly one --image")


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    image: List[Path] = typer.Option([], "--image", help="image file (repeatable)"),
    prompt: str = typer.Option(..., help="question / instruction text"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate at most"),
    greedy: bool = typer.Option(False, "--greedy", help=GREEDY_HELP),
    temperature: Optional[float] = typer.Option(None, help=TEMPERATURE_HELP),
    top_p: Optional[float] = typer.Option(None, help=TOP_P_HELP),
    top_k: Optional[int] = typer.Option(None, help=TOP_K_HELP),
    seed: int = typer.Option(0, help="sampling seed"),
    stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: physical cores)"),
    device: str = typer.Option("auto", help="auto (CUDA if usable, else CPU with a note) | cpu | cuda | trt (engine kit)"),
    ram_budget: Optional[str] = typer.Option(None, "--ram-budget", help=RAM_BUDGET_HELP),
    vram_budget: Optional[str] = typer.Option(None, "--vram-budget", help=VRAM_BUDGET_HELP),
    warm: bool = typer.Option(False, "--warm", help=WARM_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=CONTEXT_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming"),
    max_image_tokens: Optional[int] = typer.Option(None, help=MAX_IMAGE_TOKENS_HELP),
    min_pixels: Optional[int] = typer.Option(None, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    speculative: bool = typer.Option(False, "--speculative", help=SPECULATIVE_HELP),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help=DRAFT_TOKENS_HELP),
    draw_boxes: Optional[Path] = typer.Option(None, "--draw-boxes", help=DRAW_BOXES_HELP),
    video: List[Path] = typer.Option([], "--video", help=VIDEO_HELP),
    fps: Optional[float] = typer.Option(None, "--fps", help=FPS_HELP),
    video_max_frames: Optional[int] = typer.Option(None, "--video-max-frames", help=VIDEO_MAX_FRAMES_HELP),
    video_total_pixels: Optional[int] = typer.Option(None, "--video-total-pixels", help=VIDEO_TOTAL_PIXELS_HELP),
    max_video_tokens: Optional[int] = typer.Option(None, "--max-video-tokens", help=MAX_VIDEO_TOKENS_HELP),
):
    """Answer an image/video + text prompt from an artifact (torch-free), streaming the answer.

    Boxes and points in the answer (Qwen3-VL's `bbox_2d` / `point_2d`, 0..1000 relative) are mapped to the
    original image's pixels: `--json` adds them, `--draw-boxes OUT.png` draws them."""
    _check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, threads=threads)
    draft = _draft_config(speculative, draft_tokens, temperature)
    _decoding(None, greedy, temperature, top_p, top_k, draft is not None)  # flag conflicts, before any work
    _check_image_limits(max_image_tokens, min_pixels, max_pixels)
    from qvl.runtime.video import check_video_options

    check_video_options(flags=True, fps=fps, max_frames=video_max_frames, total_pixels=video_total_pixels,
                        max_video_tokens=max_video_tokens)
    _check_text("--prompt", prompt)
    _check_text("--stop", *stop)
    budgets = _budgets(ram_budget, vram_budget)
    if draw_boxes is not None:
        from qvl.runtime.grounding import check_draw_target

        if len(image) != 1:
            raise QvlError(f"--draw-boxes needs exactly one --image, got {len(image)}",
                           hint="boxes are drawn on the one image the prompt is about")
        check_draw_target(draw_boxes)
    from qvl.runtime import GenerationStats

    # a text-only run under a budget plans no room for the vision encoder
    model = _load(artifact, device, threads, *budgets, warm=warm, context=context, vision=bool(image or video))
    model.prompts.set_image_limits(max_image_tokens, min_pixels, max_pixels, flags=True)
    model.prompts.set_video_limits(max_video_tokens, fps, video_max_frames, video_total_pixels, flags=True)
    stats = GenerationStats()
    decoding = _decoding(model, greedy, temperature, top_p, top_k, draft is not None)
    kwargs = dict(max_new_tokens=max_new_tokens, **decoding.stream_kwargs(),
                  seed=seed, stop=list(stop) or None, stats=stats, speculative=draft)
    messages = _messages(image, prompt, video)
    if as_json:
        text = "".join(model.stream(messages, **kwargs))
        grounding, extra = _answer_grounding(text, image, model, draw_boxes)
        typer.echo(json.dumps({"text": text, **extra, **_stats_dict(stats), "decoding": decoding.to_json(seed),
                               **_linear_kernel(model)}))
        if draw_boxes is not None:  # stdout stays one JSON object; what could not be read is in it
            _grounding_note(grounding, draw_boxes, unparsed=False)
        return
    pieces = []
    for piece in model.stream(messages, **kwargs):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    grounding, _ = _answer_grounding("".join(pieces), image, model, draw_boxes)
    if stats.speculation_note:
        err.print(f"note: {stats.speculation_note}", highlight=False, soft_wrap=True)
    if draw_boxes is not None or grounding.unparsed:
        _grounding_note(grounding, draw_boxes)
    err.print(_stats_line(stats)[:-1] + f"; {decoding.describe()}]", highlight=False, soft_wrap=True)


def _answer_grounding(text: str, images: list[Path], model, draw_boxes: Optional[Path]):
    """The answer's boxes/points and their `--json` keys; draws them when --draw-boxes was given."""
    from qvl.runtime.grounding import answer_grounding, draw_grounding, parse_grounding
    from qvl.runtime.image_preprocess import load_image

    # The original image is decoded again only when there is something to map or draw.
    needs_image = len(images) == 1 and (draw_boxes is not None or bool(parse_grounding(text)))
    originals = [load_image(images[0])] if needs_image else [None] * len(images)
    grounding, extra = answer_grounding(text, originals, model.prompts.image_config)
    if draw_boxes is not None:
        draw_grounding(originals[0], grounding, draw_boxes)
    return grounding, extra


def _grounding_note(grounding, draw_boxes: Optional[Path], unparsed: bool = True) -> None:
    if draw_boxes is not None:
        err.print(f"drew {len(grounding.boxes)} boxes and {len(grounding.points)} points on {draw_boxes}",
                  markup=False, highlight=False, soft_wrap=True)
    for line in grounding.unparsed if unparsed else ():
        err.print(f"note: grounding not read: {line}", markup=False, highlight=False, soft_wrap=True)


def _linear_kernel(model) -> dict:
    """`--json`'s `decoder_linear_kernel`: which kernel ran the decoder's quantized linears (runtime/kernels); empty
    for runners that do not say (TensorRT, the partitioned runner) or no model (eager)."""
    kernel = getattr(getattr(model, "engine", None), "kernel_note", None)
    return {"decoder_linear_kernel": kernel} if kernel else {}


def _stats_dict(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "time_to_first_token_s": round(stats.time_to_first_token, 4),
        "decode_tokens_per_s": round(stats.decode_tokens_per_second, 3),
        "vision_s": round(stats.vision_seconds, 4),
        "prefill_s": round(stats.prefill_seconds, 4),
        "stop_reason": stats.stop_reason,
        **({"speculation": stats.speculation.to_dict()} if stats.speculation is not None else {}),
        **({"speculation_note": stats.speculation_note} if stats.speculation_note else {}),
    }


def _stats_line(stats) -> str:
    line = (f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; "
            f"time to first token {stats.time_to_first_token:.3f} s, decode {stats.decode_tokens_per_second:.1f} tok/s]")
    spec = stats.speculation
    if spec is not None:  # decode steps after the prefill, drafted tokens the verify steps accepted
        line = line[:-1] + (f"; speculative: {spec.steps} steps, {spec.accepted} of {spec.drafted} drafted tokens "
                            f"accepted, {spec.tokens_per_step:.2f} tokens/step]")
    return line


def _chat_stats_line(stats) -> str:
    """`_stats_line` plus what the session's caches saved: reused prompt tokens, images not encoded again."""
    extra = f"{stats.reused_tokens} of {stats.prompt_tokens} prompt tokens reused from the prefix cache"
    if stats.images_encoded or stats.image_cache_hits:
        extra += f", images: {stats.images_encoded} encoded, {stats.image_cache_hits} from the image cache"
    return _stats_line(stats)[:-1] + f"; {extra}]"


@app.command("chat")
def chat_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    max_new_tokens: int = typer.Option(256),
    threads: Optional[int] = typer.Option(None),
    device: str = typer.Option("auto", help="auto (CUDA if usable, else CPU with a note) | cpu | cuda | trt (engine kit)"),
    ram_budget: Optional[str] = typer.Option(None, "--ram-budget", help=RAM_BUDGET_HELP),
    vram_budget: Optional[str] = typer.Option(None, "--vram-budget", help=VRAM_BUDGET_HELP),
    warm: bool = typer.Option(False, "--warm", help=WARM_HELP),
    context: Optional[int] = typer.Option(None, "--context", help=CONTEXT_HELP),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                                      help="keep the conversation's KV cache and encoded images between turns"),
    max_image_tokens: Optional[int] = typer.Option(None, help=MAX_IMAGE_TOKENS_HELP),
    min_pixels: Optional[int] = typer.Option(None, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    speculative: bool = typer.Option(False, "--speculative", help=SPECULATIVE_HELP),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help=DRAFT_TOKENS_HELP),
    greedy: bool = typer.Option(False, "--greedy", help=GREEDY_HELP),
    temperature: Optional[float] = typer.Option(None, help=TEMPERATURE_HELP),
    top_p: Optional[float] = typer.Option(None, help=TOP_P_HELP),
    top_k: Optional[int] = typer.Option(None, help=TOP_K_HELP),
    seed: int = typer.Option(0, help="sampling seed (every turn starts from it)"),
):
    """Interactive multi-turn chat. Attach an image with `/image PATH`, a video with `/video PATH`; `/reset`
    clears; Ctrl-D quits.

    Each turn prefills only what the previous turns have not (the prefix cache); `--no-prefix-cache` re-runs
    the whole conversation every turn."""
    _check_options(max_new_tokens=max_new_tokens, threads=threads, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=seed)
    draft = _draft_config(speculative, draft_tokens, temperature)
    _decoding(None, greedy, temperature, top_p, top_k, draft is not None)  # flag conflicts, before any work
    _check_image_limits(max_image_tokens, min_pixels, max_pixels)
    budgets = _budgets(ram_budget, vram_budget)
    from qvl.runtime import GenerationStats

    model = _load(artifact, device, threads, *budgets, warm=warm, context=context)
    model.prompts.set_image_limits(max_image_tokens, min_pixels, max_pixels, flags=True)
    decoding = _decoding(model, greedy, temperature, top_p, top_k, draft is not None)
    session = model.session() if prefix_cache else None
    generate = session.stream if session is not None else model.stream
    history: list[dict] = []
    pending: list[dict] = []
    noted = False
    err.print("chat: type a message; /image PATH attaches an image, /video PATH a video; /reset; Ctrl-D to quit")
    err.print(f"chat: decoding {decoding.describe()}", highlight=False, soft_wrap=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except UnicodeDecodeError:  # a non-UTF-8 line on stdin: report it and keep the session
            _print_error("that line is not valid UTF-8 text", hint="type or paste UTF-8 text")
            continue
        if line.startswith("/image "):
            pending.append({"type": "image", "image": line[7:].strip()})
            continue
        if line.startswith("/video "):
            pending.append({"type": "video", "video": line[7:].strip()})
            continue
        if line.strip() == "/reset":
            history, pending = [], []
            if session is not None:
                session.reset()  # frees the KV cache and forgets the encoded images
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": pending + [{"type": "text", "text": line}]})
        pending = []
        stats = GenerationStats()
        try:
            pieces = []
            for piece in generate(history, max_new_tokens=max_new_tokens, stats=stats, speculative=draft,
                                  seed=seed, **decoding.stream_kwargs()):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except QvlError as exc:
            history.pop()
            _print_error(str(exc), exc.hint)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})
        if stats.speculation_note and not noted:  # once per chat: the artifact does not change
            noted = True
            err.print(f"note: {stats.speculation_note}", highlight=False, soft_wrap=True)
        err.print(_chat_stats_line(stats) if session is not None else _stats_line(stats), highlight=False,
                  soft_wrap=True)
    if session is not None:
        session.close()


@app.command("serve")
def serve_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port (0: a free one, named on stderr)"),
    device: str = typer.Option("auto", help="auto (CUDA if usable, else CPU with a note) | cpu | cuda | trt (engine kit)"),
    ram_budget: Optional[str] = typer.Option(None, "--ram-budget", help=RAM_BUDGET_HELP),
    vram_budget: Optional[str] = typer.Option(None, "--vram-budget", help=VRAM_BUDGET_HELP),
    warm: bool = typer.Option(False, "--warm", help=WARM_HELP),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: physical cores)"),
    max_batch: int = typer.Option(4, help="KV slots: sequences decoded together in one decoder step (CPU, in-place "
                                          "GQA cache; elsewhere one at a time) and conversations whose cache is kept"),
    max_context: Optional[int] = typer.Option(None, help="positions per slot, prompt + completion (default: the "
                                                         "model's context, at most 4096); the KV pool is max-batch x this"),
    api_key: Optional[str] = typer.Option(None, envvar="QVL_API_KEY", help="require `Authorization: Bearer KEY` "
                                                                          "on /v1/* (env QVL_API_KEY)"),
    allow_dir: Optional[Path] = typer.Option(None, help="image_url may name local files under this directory "
                                                        "(symlinks resolved); without it only data: URLs"),
    max_queue: int = typer.Option(64, help="requests waiting for a slot; more get 429"),
    max_body_bytes: int = typer.Option(32 << 20, help="request body limit (413 above)"),
    max_image_pixels: int = typer.Option(4096 * 4096, help="width x height of one image, read from its header"),
    max_images: int = typer.Option(8, help="images per request"),
    max_videos: int = typer.Option(1, help="videos (video_url parts; needs the `video` extra) per request"),
    max_video_frames: int = typer.Option(1800, help="frames in one video's header (every frame up to the last "
                                                    "sampled one is decoded: this bounds a request's decoding work)"),
    default_max_tokens: int = typer.Option(512, help="completion tokens when a request gives no max_tokens"),
    model_name: Optional[str] = typer.Option(None, help="model id clients send (default: the artifact directory's name)"),
    max_image_tokens: Optional[int] = typer.Option(None, help=MAX_IMAGE_TOKENS_HELP),
    min_pixels: Optional[int] = typer.Option(None, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, help=MAX_PIXELS_HELP),
    ray: bool = typer.Option(False, "--ray", help="run as a Ray Serve deployment (RAY_ADDRESS: a cluster; else a "
                                                  "local Ray instance); needs the serve-ray extra"),
    replicas: str = typer.Option("1", help="--ray: replicas, an integer or 'auto' (autoscale on ongoing requests)"),
    max_replicas: int = typer.Option(4, help="--ray --replicas auto: the most replicas"),
):
    """OpenAI-compatible HTTP server: POST /v1/chat/completions (text + image_url parts, stream), GET /v1/models,
    /health, /metrics. Needs the `serve` extra (fastapi, uvicorn, prometheus-client). Ctrl-C or SIGTERM stops it
    (exit 0)."""
    _check_options(threads=threads)
    _check_image_limits(max_image_tokens, min_pixels, max_pixels)
    from qvl.runtime.serve.limits import ServeLimits
    from qvl.runtime.serve.server import ServeOptions, check_options, serve

    limits = ServeLimits(max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels, max_images=max_images,
                         max_queue=max_queue, default_max_tokens=default_max_tokens, allow_dir=allow_dir,
                         max_videos=max_videos, max_video_frames=max_video_frames)
    ram_bytes, vram_bytes = _budgets(ram_budget, vram_budget)
    opts = ServeOptions(host=host, port=port, device=device, threads=threads, max_batch=max_batch,
                        max_context=max_context, api_key=api_key, model_name=model_name, limits=limits,
                        max_image_tokens=max_image_tokens, min_pixels=min_pixels, max_pixels=max_pixels,
                        ram_budget=ram_bytes, vram_budget=vram_bytes, warm=warm)
    check_options(opts)

    def echo(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    if ray:
        from qvl.runtime.serve.ray_app import parse_replicas, serve_ray

        if not 1 <= max_replicas <= 1024:
            raise QvlError(f"--max-replicas must be in [1, 1024], got {max_replicas}")
        raise typer.Exit(serve_ray(artifact, opts, parse_replicas(replicas), max_replicas, echo=echo))
    raise typer.Exit(serve(artifact, opts, echo=echo))


@app.command("demo")
def demo_cmd(
    work: Path = typer.Option(Path("qvl-demo"), help="working directory for the checkpoint and artifact"),
    threads: Optional[int] = typer.Option(None),
):
    """The whole job on the committed trained sentinel: compile (export + passes) -> answer held-out synthetic
    visual questions with the runtime (question, expected, answer) -> parity against eager. Exit 0 only if
    parity holds. The exporter's warnings and logs go to WORK/demo.log."""
    _check_options(threads=threads)
    from qvl.toolchain.demo import run_demo

    result = run_demo(work, threads=threads)
    err.print("4/4 parity:", highlight=False)
    _print_parity(result.parity)
    raise typer.Exit(0 if result.parity.passed else 1)


def _print_error(message: str, hint: str | None = None) -> None:
    # escape(): a message quoting a path or user text such as "a[b]" must not be read as rich markup.
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)


def _click_exception_types() -> tuple[type, ...]:
    # typer >= 0.2x vendors click as `typer._click` and raises those classes, not `click`'s; older
    # typer re-raises plain click's. Catch both (the mro of a NoSuchOption names typer._click.exceptions).
    types: list[type] = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        types.append(VendoredClickException)
    except ImportError:
        pass
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


def _show_click_exception(exc) -> int:
    """A usage error (unknown flag/command, missing or unparsable option): one `error:` line + a hint."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        # Bare `qvl-compile`: the help and exit 2, as typer/click do for no_args_is_help. typer's rich
        # help formatter has already printed it (to stdout) while building the exception; plain click
        # only returns the text.
        if exc.format_message().strip():
            err.print(exc.format_message(), markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    command = ctx.command_path if ctx is not None else "qvl-compile"
    _print_error(exc.format_message(), hint=f"see '{command} --help'")
    return exc.exit_code


def main() -> None:
    """Console entry point. Exit codes: 0 ok, 1 a check failed (parity, demo), 2 bad input or usage,
    130 interrupted (Ctrl-C). Only unexpected errors (bugs) keep their traceback."""
    try:
        # standalone_mode=False: we print errors ourselves. In that mode typer *returns* the code of a
        # `raise typer.Exit(n)` (and turns Ctrl-C inside a command into Exit(130)) instead of exiting.
        rc = app(prog_name="qvl-compile", standalone_mode=False)
    except QvlError as exc:
        _print_error(str(exc), exc.hint)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        rc = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except _click_exception_types() as exc:
        sys.exit(_show_click_exception(exc))
    if isinstance(rc, int) and not isinstance(rc, bool):
        if rc == 130:
            err.print("aborted", highlight=False)
        sys.exit(rc)


if __name__ == "__main__":
    main()
