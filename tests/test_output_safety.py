"""--out never loses user data (issue #12): locking, rename only onto an absent path, --overwrite only of a
qvl-compile output that is not the command's source, permissions, recovery and stale-staging cleanup.
Every CLI case goes through the real console entry point in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from fs_helpers import (EarlyRuns, copy_qvl_checkpoint, finish, resume, run_cli_concurrently, siblings, tree_hashes,
                        wait_stopped)

PAUSE_AT_RENAME = {"QVL_FAULT_AT": "rename", "QVL_FAULT_SIGNAL": "SIGSTOP"}


UMASK_CASES = [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]


@pytest.fixture(scope="module", autouse=True)
def early(tiny_checkpoint, tiny_artifact, tmp_path_factory):
    """This module's runs whose inputs are fixed in advance start with its first test and run in the background,
    one at a time (fs_helpers.EarlyRuns), so that they overlap the other tests: the two exports (~25 s each)
    and the make-checkpoint runs (~7 s each). The test named in each comment takes its run from here and does
    the rest (fills in the user's directory, resumes, asserts) as before."""
    runs = EarlyRuns(tmp_path_factory.mktemp("early-output-safety"))

    def make(key: str, *extra: str, env: dict | None = None, umask: int | None = None) -> None:
        runs.add(key, "make-checkpoint", "--preset", "tiny", "--out", str(runs.dir(key) / "ck"), *extra,
                 env=env, umask=umask)

    # test_user_dir_created_at_out_during_export_is_untouched: export, paused when staged (about to publish)
    runs.add("user-dir", "export", str(tiny_checkpoint), "--out", str(runs.dir("user-dir") / "art"), env=PAUSE_AT_RENAME)
    # test_overwrite_of_an_old_artifact_works_with_normal_permissions: export --overwrite onto an old artifact
    old = runs.dir("overwrite-old") / "art"
    shutil.copytree(tiny_artifact, old)
    (old / "stale-extra-file").write_text("from the old artifact")
    runs.add("overwrite-old", "export", str(tiny_checkpoint), "--out", str(old), "--overwrite", umask=0o022)
    make("empty-dir", env=PAUSE_AT_RENAME)  # test_empty_user_dir_created_at_out_is_not_replaced
    make("second-writer", env=PAUSE_AT_RENAME)  # test_second_concurrent_writer_fails_fast: the first writer
    for umask, _, _ in UMASK_CASES:  # test_checkpoint_files_respect_umask
        make(f"umask-{umask:03o}", umask=umask)
    # test_overwrite_of_a_qvl_checkpoint_works: --overwrite (seed 1) of a tiny qvl checkpoint (seed 0)
    runs.before = {"overwrite-qvl": tree_hashes(copy_qvl_checkpoint(tiny_checkpoint, runs.dir("overwrite-qvl") / "ck"))}
    make("overwrite-qvl", "--overwrite", "--seed", "1")
    # test_killed_between_the_two_renames_next_run_keeps_the_newest_copy: the same, killed between its renames
    copy_qvl_checkpoint(tiny_checkpoint, runs.dir("killed-swap") / "ck")
    make("killed-swap", "--overwrite", "--seed", "1", env={"QVL_FAULT_AT": "swap"})
    yield runs
    runs.close()


def _make(out: Path, *extra: str, env: dict | None = None):
    return run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), *extra, env=env)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------ CLI regressions
def test_user_dir_created_at_out_during_export_is_untouched(early):
    out = early.dir("user-dir") / "art"
    proc = early.take("user-dir")  # `export CKPT --out OUT` with PAUSE_AT_RENAME, started by `early`
    wait_stopped(proc)  # export finished, staged, about to publish
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = resume(proc)
    assert_one_line_error(res, "appeared while qvl-compile was writing it")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert siblings(out) == []


def test_empty_user_dir_created_at_out_is_not_replaced(early):
    # plain rename(2) silently replaces an empty directory: the publish must use RENAME_NOREPLACE
    out = early.dir("empty-dir") / "ck"
    proc = early.take("empty-dir")  # `make-checkpoint --preset tiny --out OUT` with PAUSE_AT_RENAME, started by `early`
    wait_stopped(proc)
    out.mkdir()
    res = resume(proc)
    assert_one_line_error(res, "appeared while qvl-compile was writing it")
    assert list(out.iterdir()) == [] and siblings(out) == []


def test_second_concurrent_writer_fails_fast(early):
    out = early.dir("second-writer") / "ck"
    first = early.take("second-writer")  # `make-checkpoint --preset tiny --out OUT` with PAUSE_AT_RENAME, by `early`
    wait_stopped(first)
    # both refused at the lock, before they write anything: run side by side
    seconds = run_cli_concurrently(*(("make-checkpoint", "--preset", "tiny", "--out", str(out), *extra, "--seed", "1")
                                     for extra in ((), ("--overwrite",))))
    for second in seconds:
        assert_one_line_error(second, f"another qvl-compile is writing {out}", f"pid {first.pid}")
    res = resume(first)
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").is_file() and siblings(out) == []


def test_export_onto_its_own_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    before = tree_hashes(ck)
    res = run_cli("export", str(ck), "--out", str(ck), "--overwrite")
    assert_one_line_error(res, "is the source of this command")
    res = run_cli("compile", str(ck), "--out", str(ck), "--overwrite")
    assert_one_line_error(res, "is the source of this command")
    res = run_cli("export", str(ck), "--out", str(ck / "art"))
    assert_one_line_error(res, "is inside the source")
    res = run_cli("export", str(ck), "--out", str(tmp_path), "--overwrite")
    assert_one_line_error(res, "is inside --out")
    assert tree_hashes(ck) == before and not (ck / "art").exists()
    assert siblings(ck) == []


@pytest.mark.parametrize("content", ["user file", "fake manifest", "hf checkpoint"])
def test_overwrite_refuses_a_directory_qvl_did_not_write(tiny_checkpoint, tmp_path, content):
    out = tmp_path / "data"
    if content == "hf checkpoint":  # same files as ours, but no marker: not provably qvl-compile's
        shutil.copytree(tiny_checkpoint, out)
        (out / ".qvl-output.json").unlink(missing_ok=True)
    else:
        out.mkdir()
        (out / "precious.txt").write_text("do not delete")
        if content == "fake manifest":
            (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    before = tree_hashes(out)
    res = _make(out, "--overwrite")
    assert_one_line_error(res, "--overwrite refuses to replace", "not a qvl-compile artifact or checkpoint")
    assert tree_hashes(out) == before and siblings(out) == []


def test_overwrite_of_an_old_artifact_works_with_normal_permissions(early):
    # `early` copied the tiny export to OUT, added OUT/stale-extra-file and ran, with umask 022,
    # `export CKPT --out OUT --overwrite`
    out = early.dir("overwrite-old") / "art"
    res = finish(early.take("overwrite-old"))
    assert res.returncode == 0, res.stderr
    assert not (out / "stale-extra-file").exists()
    assert json.loads((out / "manifest.json").read_text())["format"] == "qvl-artifact"
    assert siblings(out) == []
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert all(m == 0o644 for n, m in modes.items() if (out / n).is_file()), modes
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("umask,file_mode,dir_mode", UMASK_CASES)
def test_checkpoint_files_respect_umask(early, umask, file_mode, dir_mode):
    # safetensors writes its shards 0600, tempfile.mkstemp (atomic manifest writes) too
    out = early.dir(f"umask-{umask:03o}") / "ck"
    res = finish(early.take(f"umask-{umask:03o}"))  # `make-checkpoint --preset tiny --out OUT` with this umask
    assert res.returncode == 0, res.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}
    assert out.stat().st_mode & 0o777 == dir_mode


def test_overwrite_of_a_qvl_checkpoint_works(early):
    # OUT was a copy of the tiny checkpoint (= `make-checkpoint --preset tiny --out OUT`); `early` ran
    # `make-checkpoint --preset tiny --out OUT --overwrite --seed 1`
    out = early.dir("overwrite-qvl") / "ck"
    first = early.before["overwrite-qvl"]  # tree_hashes(OUT) before that run
    res = finish(early.take("overwrite-qvl"))
    assert res.returncode == 0, res.stderr
    assert tree_hashes(out)["model.safetensors"] != first["model.safetensors"] and siblings(out) == []


def test_killed_between_the_two_renames_next_run_keeps_the_newest_copy(tiny_checkpoint_seed1, early):
    # OUT was a copy of the tiny checkpoint (= `make-checkpoint --preset tiny --out OUT`); `early` ran
    # `make-checkpoint --preset tiny --out OUT --overwrite --seed 1` with QVL_FAULT_AT=swap
    out = early.dir("killed-swap") / "ck"
    res = finish(early.take("killed-swap"))
    assert res.returncode == -9
    assert not out.exists()  # the old copy is aside, the new one staged: the worst moment to die
    ref = tiny_checkpoint_seed1  # what `make-checkpoint --preset tiny --seed 1` writes
    res = _make(out)  # any next writer of that path recovers first, then sees the (restored) output
    assert_one_line_error(res, "output directory already exists")
    assert tree_hashes(out) == tree_hashes(ref) and siblings(out) == []


# ------------------------------------------------------------------------------------------ in-process units
def test_recover_states(tmp_path):
    from qvl.toolchain.fsutil import recover

    tag = f"pid{_dead_pid()}-st1-deadbeef"

    def state(name: str, content: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(content)
        return d

    out = tmp_path / "a"
    state(f".a.old-{tag}", "old")
    state(f".a.partial-{tag}", "new")  # complete: `.old-` exists only after staging finished
    recover(out)
    assert (out / "f").read_text() == "new" and siblings(out) == []

    out = tmp_path / "b"
    state(f".b.old-{tag}", "old")
    recover(out)
    assert (out / "f").read_text() == "old" and siblings(out) == []

    out = state("c", "current")
    state(f".c.partial-{tag}", "half")
    live = state(f".c.partial-pid{os.getpid()}-st0-cafecafe", "running")
    recover(out)
    assert (out / "f").read_text() == "current" and siblings(out) == [live]


def test_stale_scratch_cleanup_only_removes_dead_owners(tmp_path):
    from qvl.toolchain.staging import clean_stale_scratch, owner_tag

    dead = tmp_path / f"qvl-compile-pid{_dead_pid()}-st1-deadbeef-x1"
    live = tmp_path / f"qvl-fp32-{owner_tag()}-x2"
    untagged = tmp_path / "qvl-compile-abc123"  # an older version's: owner unknown, left alone
    other = tmp_path / f"notours-pid{_dead_pid()}-st1-deadbeef-x3"
    for d in (dead, live, untagged, other):
        d.mkdir()
    assert clean_stale_scratch(tmp_path) == [dead]
    assert sorted(tmp_path.iterdir()) == sorted([live, untagged, other])


def test_scratch_dir_carries_its_owner(tmp_path):
    from qvl.toolchain.staging import OWNER_FILE, owner_state, scratch_dir

    with scratch_dir("qvl-test-", dir=tmp_path) as d:
        assert (d / OWNER_FILE).is_file() and owner_state(d) == "alive"
    assert not d.exists()
