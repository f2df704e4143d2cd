"""A killed compile leaves nothing partial (issue #12).

Deterministic kills through the test-only hook `QVL_FAULT_AT=<point>` (fsutil.fault_point): the process sends
itself SIGKILL (or `QVL_FAULT_SIGNAL`) on reaching the named point. After each kill: no directory at --out,
and whatever staging is left (`.OUT.partial-*` next to it, `qvl-*` in TMPDIR) is recognisably stale (owner
tag of a dead process); the next run cleans it and succeeds.

The killed (or interrupted) runs need nothing from the tests, so they are started when the module starts and
run in the background one at a time (fs_helpers.EarlyRuns), each in its own directory; each test takes its run
once it has exited and checks what it left exactly as before, then does the next run itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from fs_helpers import EarlyRuns, assert_only_stale, finish, scratch, siblings

SIGKILL_CASES = [
    ("checkpoint", "export:traced"),   # inside torch.onnx tracing of the checkpoint
    # passes about to run (a checkpoint source would have been exported into TMPDIR first: that export costs
    # ~25 s and leaves nothing export:traced does not, the owner-tagged scratch dir the next run removes whole)
    ("artifact", "passes:start"),
    ("artifact", "weights:write"),     # the compiled artifact's weight store half-written
    ("artifact", "rename"),            # fully staged, not yet published
]


def _dirs(early, key: str) -> tuple[Path, Path]:
    """(--out, TMPDIR) of an early run."""
    return early.dir(key) / "out" / "art", early.dir(key) / "tmp"


@pytest.fixture(scope="module", autouse=True)
def early(tiny_checkpoint, tiny_artifact, tmp_path_factory):
    runs = EarlyRuns(tmp_path_factory.mktemp("early-fault-injection"), lanes=1)

    def add(key: str, *args: str, **env: str) -> None:
        out, tmpdir = _dirs(runs, key)
        tmpdir.mkdir()
        runs.add(key, *args, "--out", str(out), env={"TMPDIR": str(tmpdir), **env})

    for source_kind, point in SIGKILL_CASES:  # test_sigkill_leaves_nothing_partial
        source = tiny_checkpoint if source_kind == "checkpoint" else tiny_artifact
        add(f"sigkill-{point}", "compile", str(source), QVL_FAULT_AT=point)
    # test_sigkill_during_checkpoint_write
    add("checkpoint-write", "make-checkpoint", "--preset", "tiny", QVL_FAULT_AT="weights:write")
    # test_sigint_during_export_exits_130_and_cleans_up
    add("sigint", "compile", str(tiny_checkpoint), QVL_FAULT_AT="export:traced", QVL_FAULT_SIGNAL="SIGINT")
    yield runs
    runs.close()


def _assert_nothing_partial(out: Path, tmpdir: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert_only_stale(siblings(out))
    assert_only_stale(scratch(tmpdir))


def _rerun_cleans_up(source: Path, out: Path, tmpdir: Path) -> None:
    res = run_cli("compile", str(source), "--out", str(out), env={"TMPDIR": str(tmpdir)})
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").is_file()
    assert siblings(out) == [] and scratch(tmpdir) == []


@pytest.mark.parametrize("source_kind,point", SIGKILL_CASES)
def test_sigkill_leaves_nothing_partial(early, tiny_artifact, source_kind, point):
    # `TMPDIR=TMP compile SOURCE --out OUT` with QVL_FAULT_AT=point, started by `early`
    out, tmpdir = _dirs(early, f"sigkill-{point}")
    res = finish(early.take(f"sigkill-{point}"))
    assert res.returncode == -9, (res.returncode, res.stderr)
    _assert_nothing_partial(out, tmpdir)
    assert siblings(out) or scratch(tmpdir), "the kill came before anything was staged: wrong fault point?"
    _rerun_cleans_up(tiny_artifact, out, tmpdir)


def test_sigkill_during_checkpoint_write(early):
    # `TMPDIR=TMP make-checkpoint --preset tiny --out OUT` with QVL_FAULT_AT=weights:write, started by `early`
    out, tmpdir = _dirs(early, "checkpoint-write")
    env = {"TMPDIR": str(tmpdir)}
    res = finish(early.take("checkpoint-write"))
    assert res.returncode == -9
    _assert_nothing_partial(out, tmpdir)
    res = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").is_file() and siblings(out) == []


def test_sigint_during_export_exits_130_and_cleans_up(early):
    # `TMPDIR=TMP compile CKPT --out OUT` with QVL_FAULT_AT=export:traced QVL_FAULT_SIGNAL=SIGINT, started by `early`
    out, tmpdir = _dirs(early, "sigint")
    res = finish(early.take("sigint"))
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    # an interrupt unwinds normally: staging and scratch are removed then, not left for the next run
    assert not out.exists() and siblings(out) == [] and scratch(tmpdir) == []
