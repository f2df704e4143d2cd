"""A killed compile leaves nothing partial (issue #12).

Deterministic kills through the test-only hook `QVL_FAULT_AT=<point>` (fsutil.fault_point): the process sends
itself SIGKILL (or `QVL_FAULT_SIGNAL`) on reaching the named point. After each kill: no directory at --out,
and whatever staging is left (`.OUT.partial-*` next to it, `qvl-*` in TMPDIR) is recognisably stale (owner
tag of a dead process); the next run cleans it and succeeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from fs_helpers import assert_only_stale, scratch, siblings


def _assert_nothing_partial(out: Path, tmpdir: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert_only_stale(siblings(out))
    assert_only_stale(scratch(tmpdir))


def _rerun_cleans_up(source: Path, out: Path, tmpdir: Path) -> None:
    res = run_cli("compile", str(source), "--out", str(out), env={"TMPDIR": str(tmpdir)})
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").is_file()
    assert siblings(out) == [] and scratch(tmpdir) == []


@pytest.mark.parametrize("source_kind,point", [
    ("checkpoint", "export:traced"),   # inside torch.onnx tracing of the checkpoint
    ("checkpoint", "passes:start"),    # export done (in TMPDIR), passes about to run
    ("artifact", "weights:write"),     # the compiled artifact's weight store half-written
    ("artifact", "rename"),            # fully staged, not yet published
])
def test_sigkill_leaves_nothing_partial(tiny_checkpoint, tiny_artifact, tmp_path, source_kind, point):
    source = tiny_checkpoint if source_kind == "checkpoint" else tiny_artifact
    out, tmpdir = tmp_path / "out" / "art", tmp_path / "tmp"
    tmpdir.mkdir()
    res = run_cli("compile", str(source), "--out", str(out), env={"TMPDIR": str(tmpdir), "QVL_FAULT_AT": point})
    assert res.returncode == -9, (res.returncode, res.stderr)
    _assert_nothing_partial(out, tmpdir)
    assert siblings(out) or scratch(tmpdir), "the kill came before anything was staged: wrong fault point?"
    _rerun_cleans_up(tiny_artifact, out, tmpdir)


def test_sigkill_during_checkpoint_write(tmp_path):
    out, tmpdir = tmp_path / "ck", tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    res = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), env={**env, "QVL_FAULT_AT": "weights:write"})
    assert res.returncode == -9
    _assert_nothing_partial(out, tmpdir)
    res = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").is_file() and siblings(out) == []


def test_sigint_during_export_exits_130_and_cleans_up(tiny_checkpoint, tmp_path):
    out, tmpdir = tmp_path / "art", tmp_path / "tmp"
    tmpdir.mkdir()
    res = run_cli("compile", str(tiny_checkpoint), "--out", str(out),
                  env={"TMPDIR": str(tmpdir), "QVL_FAULT_AT": "export:traced", "QVL_FAULT_SIGNAL": "SIGINT"})
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    # an interrupt unwinds normally: staging and scratch are removed then, not left for the next run
    assert not out.exists() and siblings(out) == [] and scratch(tmpdir) == []
