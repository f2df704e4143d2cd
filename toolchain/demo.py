"""`qvl-compile demo`: the whole job on the committed, trained sentinel, with answers a newcomer can check.

Steps: copy the sentinel checkpoint (toolchain/data/sentinel/, a small Qwen3-VL trained on synthetic VQA,
see toolchain/eval/sentinel.py) into WORK; compile it for the default cpu target (export + passes); answer
the first held-out synthetic VQA questions, one of each kind, with the torch-free runtime, scored exactly
as `qvl-compile eval` scores; run the parity suite against eager PyTorch. The caller prints the parity
report and sets the exit code from it.

While it works, everything that is not the demo's own output goes to WORK/demo.log: the exporter's
torchvision / FutureWarning / TracerWarning lines, torch's and transformers' logging and progress bars,
ONNX Runtime's native warnings. They are written from Python (`warnings`, `logging`, tqdm), from C++
(torch, ONNX Runtime) and possibly from child processes, so the redirection is of file descriptors 1 and
2 (`output_to_log`), not of `sys.stdout` / `sys.stderr`; the demo's own lines go to duplicates of the
original descriptors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from qvl.errors import QvlError

LOG_NAME = "demo.log"
QUESTIONS = 4  # the test split's first four: one colour, count, left and number question (KINDS order)
MAX_NEW_TOKENS = 8  # as `qvl-compile eval`: every synthetic answer is one or two tokens and <|im_end|>


@dataclass
class DemoResult:
    parity: object  # toolchain.eval.parity.ParityReport
    correct: int
    total: int
    log: Path


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Point file descriptors 1 and 2 at `log_path` (truncated) for the block; yield text streams on the
    original stdout and stderr for the caller's own lines. Restored on any exit, exceptions and Ctrl-C
    included, before they propagate, so an error message reaches the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    streams = [open(os.dup(fd), "w", encoding=getattr(like, "encoding", None) or "utf-8",
                    errors="backslashreplace", buffering=1)
               for fd, like in zip(saved, (sys.stdout, sys.stderr))]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield streams[0], streams[1]
    finally:
        try:  # Python-level text still buffered was written while redirected: it belongs to the log
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (log_fd, *saved):
                os.close(fd)
            for s in streams:
                s.close()


@contextlib.contextmanager
def _status(console, text: str) -> Iterator:
    """A spinner on the real terminal; yields a function that changes its text. Not `Console.status`: its
    `Live` swaps `sys.stdout` / `sys.stderr` for proxies printing through the console whenever that is a
    terminal, which would carry every warning written meanwhile straight past `output_to_log` to the user."""
    from rich.live import Live
    from rich.spinner import Spinner

    spinner = Spinner("dots", text)
    with Live(spinner, console=console, transient=True, refresh_per_second=12.5,
              redirect_stdout=False, redirect_stderr=False):
        yield lambda t: spinner.update(text=t)


def run_demo(work: Path, threads: int | None = None) -> DemoResult:
    from rich.console import Console

    work = Path(work)
    if work.exists() and not work.is_dir():
        raise QvlError(f"the demo's working directory {work} exists and is not a directory",
                       hint="give --work a new or existing directory")
    work.mkdir(parents=True, exist_ok=True)
    log = work / LOG_NAME
    with output_to_log(log) as (out, err_stream):
        err = Console(file=err_stream, highlight=False, soft_wrap=True)
        say = lambda m: err.print(m, markup=False)  # noqa: E731
        say(f"exporter warnings and logs go to {log}")
        ckpt, art = _checkpoint(work, say, err)
        _compile(ckpt, art, say, err)
        correct, total = _answer(art, work / "vqa", threads, out, say, err)
        with _status(err, "parity against eager PyTorch") as status:
            from qvl.toolchain.eval.parity import run_parity

            report = run_parity(art, ckpt, work / "images", threads=threads,
                                progress=lambda name, i, n: status(f"parity case {i + 1}/{n}: {name}"))
    return DemoResult(report, correct, total, log)


def _checkpoint(work: Path, say, err) -> tuple[Path, Path]:
    from qvl.toolchain.eval.sentinel import SENTINEL_DIR, copy_sentinel

    ckpt, art = work / "sentinel-checkpoint", work / "sentinel-artifact"
    with _status(err, "copying the sentinel checkpoint"):
        copy_sentinel(ckpt, overwrite=True)
    size = (ckpt / "model.safetensors").stat().st_size
    say(f"1/4 checkpoint: {ckpt} (the trained sentinel committed at {SENTINEL_DIR}: Qwen3-VL's architecture at "
        f"{size / 1e6:.1f} MB, trained on synthetic visual questions)")
    return ckpt, art


def _compile(ckpt: Path, art: Path, say, err) -> None:
    from qvl.toolchain.compile.pipeline import compile_artifact

    with _status(err, "compiling") as status:
        report = compile_artifact(ckpt, "cpu", art, overwrite=True, step=status)
    fused = sum(r["counts"].get("group_query_attention", 0) for r in report.pass_reports)
    say(f"2/4 artifact for {report.target}: {art} ({fused} decoder attentions fused, KV cache in place; "
        f"{report.seconds:.0f} s)")


def _answer(art: Path, folder: Path, threads, out: TextIO, say, err) -> tuple[int, int]:
    """The held-out questions through the runtime, scored as `qvl-compile eval` scores (exact match after
    `normalize_answer`); the images are saved so that the user can look at them and ask their own."""
    from qvl.runtime import load
    from qvl.toolchain.eval.evaluate import evaluate
    from qvl.toolchain.eval.synthetic_vqa import make_samples

    samples = make_samples("test", QUESTIONS)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(samples, start=1):
        paths.append(folder / f"{i}-{s['kind']}.png")
        s["images"][0].save(paths[-1])
    model = load(art, threads=threads)
    say(f"3/4 answers from the artifact (torch-free runtime) to held-out synthetic questions, images in {folder}:")
    t0 = time.perf_counter()
    with _status(err, "answering"):
        report = evaluate(lambda messages, images: model.generate(messages, images=images,
                                                                  max_new_tokens=MAX_NEW_TOKENS), samples)
    width = max(len(r.question) for r in report.records)
    for path, r in zip(paths, report.records):
        out.write(f"  {r.question:<{width}}  expected {json.dumps(r.expected):<8} answered "
                  f"{json.dumps(r.predicted, ensure_ascii=False):<8} {'✓' if r.correct else '✗'}  {path.name}\n")
    out.write(f"  {report.correct} of {report.total} correct\n")
    out.flush()
    say(f"[{report.total} questions answered in {time.perf_counter() - t0:.2f} s; ask your own: qvl-compile run "
        f"{shlex.quote(str(art))} --image {shlex.quote(str(paths[1]))} --prompt {shlex.quote(samples[1]['question'])}]")
    return report.correct, report.total
