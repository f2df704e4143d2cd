"""Shared fixtures: the tiny synthetic checkpoint is generated once per test session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A test run started in the background by a non-interactive shell (`nohup .ci/run &`) inherits SIGINT *ignored*, and
# every child it execs would too: the Ctrl-C tests send SIGINT to `qvl-compile` children and need it delivered. A
# handler (not SIG_IGN) here makes exec'ed children start with the default disposition again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:  # hypothesis: reproducible examples in CI (CI=true), fresh random ones on a developer's machine
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # the fuzz tests import hypothesis themselves and fail loudly without it
    pass


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL checkpoint in real HF format (seed 0), made by the project's own generator."""
    from qvl.toolchain.checkpoints.synthetic import make_checkpoint

    cached = os.environ.get("QVL_TINY_CHECKPOINT")
    if cached and (Path(cached) / "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint("tiny", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported once per session (plain fp32 export)."""
    from qvl.toolchain.export.exporter import export_artifact

    out = tmp_path_factory.mktemp("artifact") / "tiny-art"
    export_artifact(tiny_checkpoint, out)
    return out


def run_cli(*args: str, timeout: float = 600, env: dict | None = None):
    """Run the real `qvl-compile` entry point in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", "from qvl.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def assert_one_line_error(proc, *needles: str) -> None:
    """A user error: exit 2, an `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)


@pytest.fixture(scope="session")
def tiny_cpu_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny export compiled for the cpu target (fusion passes, in-place KV cache)."""
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("cpu") / "tiny-cpu"
    compile_artifact(tiny_artifact, "cpu", out)
    return out


@pytest.fixture(scope="session")
def sm61_kit_build(tiny_artifact, tmp_path_factory):
    """The tiny export as an fp32 sm61 engine kit, built once per session: (kit dir, the lines it printed)."""
    from qvl.toolchain.tensorrt.command import kit_command

    lines: list[str] = []
    out = tmp_path_factory.mktemp("kit-shared") / "tiny-sm61-kit"
    kit_command(tiny_artifact, "sm61", out, echo=lines.append)
    return out, lines


@pytest.fixture(scope="session")
def sm61_kit_dir(sm61_kit_build) -> Path:
    return sm61_kit_build[0]


@pytest.fixture(scope="session")
def int8_kit_build(tiny_artifact, tmp_path_factory):
    """`compile --target sm61 --weights int8` with the default accuracy budget (mean KL 0.01, greedy agreement
    0.9), built once per session: (kit dir, printed lines, the command's report, the budget)."""
    from qvl.toolchain.quant.accuracy_budget import AccuracyBudget
    from qvl.toolchain.tensorrt.command import kit_command

    lines: list[str] = []
    out = tmp_path_factory.mktemp("kit8-shared") / "tiny-sm61-int8-kit"
    budget = AccuracyBudget()
    report = kit_command(tiny_artifact, "sm61", out, echo=lines.append, weights="int8", budget=budget, threads=1)
    return out, lines, report, budget


@pytest.fixture(scope="session")
def int8_kit_dir(int8_kit_build) -> Path:
    return int8_kit_build[0]


@pytest.fixture(scope="session")
def tiny_checkpoint_seed1(tmp_path_factory) -> Path:
    """Another tiny checkpoint (seed 1): a checkpoint an artifact was NOT compiled from, and the expected result
    of `make-checkpoint --preset tiny --seed 1` (same generator, byte-identical). Read-only: copy it to modify."""
    from qvl.toolchain.checkpoints.synthetic import make_checkpoint

    out = tmp_path_factory.mktemp("ckpt-seed1") / "tiny-seed1"
    make_checkpoint("tiny", out, seed=1)
    return out


@pytest.fixture(scope="session")
def sm61_cuda_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny export compiled for cuda-sm61 (TensorScatter in-place cache, fp32)."""
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("cuda-sm61") / "art"
    compile_artifact(tiny_artifact, "cuda-sm61", out)
    return out


@pytest.fixture(scope="session")
def sm61_cuda_int4(sm61_cuda_artifact, tmp_path_factory) -> Path:
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = tmp_path_factory.mktemp("cuda-sm61-int4") / "art"
    # from the compiled fp32 artifact (its fusions re-run and find nothing left to fuse): saves a second export
    compile_with_precision(sm61_cuda_artifact, "cuda-sm61", out, weights="int4")
    return out


@pytest.fixture(scope="session")
def tiny_cpu_int4(tiny_cpu_artifact, tmp_path_factory) -> Path:
    """The cpu artifact with every eligible linear int4 (no budget), from the compiled fp32 artifact."""
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = tmp_path_factory.mktemp("cpu-int4") / "art"
    compile_with_precision(tiny_cpu_artifact, "cpu", out, weights="int4")
    return out
