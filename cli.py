"""`qvl-compile`: the command-line front end.

Commands import their heavy dependencies lazily, so `qvl-compile run` on a laptop with only the base
install never imports torch. A `QvlError` (bad user input) prints one line and a hint and exits 2;
anything else is a bug and keeps its traceback.
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


def _messages(images: list[Path], prompt: str) -> list[dict]:
    content = [{"type": "image", "image": str(p)} for p in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


@app.command("make-checkpoint")
def make_checkpoint_cmd(
    preset: str = typer.Option(..., help="tiny | 2b (the published Qwen3-VL-2B-Instruct config, random bf16 weights)"),
    out: Path = typer.Option(..., help="output directory (written atomically)"),
    seed: int = typer.Option(0, help="weight seed"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
):
    """Write a synthetic Qwen3-VL checkpoint in real Hugging Face format."""
    from qvl.toolchain.presets import PRESETS

    if preset not in PRESETS:
        raise QvlError(f"unknown preset {preset!r}", hint=f"choose one of: {', '.join(PRESETS)}")
    from qvl.toolchain.checkpoint import make_checkpoint

    with _progress() as prog:
        task = prog.add_task(f"writing {preset} checkpoint", total=1.0)
        report = make_checkpoint(
            preset, out, seed=seed, overwrite=overwrite,
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
    from qvl.toolchain.reference import EagerReference

    ref = EagerReference(checkpoint)
    res = ref.answer(_messages(image, prompt), max_new_tokens=max_new_tokens, keep_logits=False)
    if as_json:
        typer.echo(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": int(len(res.prompt_ids))}))
    else:
        typer.echo(res.text)


def main() -> None:
    try:
        app(standalone_mode=False)
    except QvlError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[dim]hint: {exc.hint}[/]", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
