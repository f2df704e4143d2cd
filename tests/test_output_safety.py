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
from fs_helpers import resume, siblings, start_cli, tree_hashes, wait_stopped

PAUSE_AT_RENAME = {"QVL_FAULT_AT": "rename", "QVL_FAULT_SIGNAL": "SIGSTOP"}


def _make(out: Path, *extra: str, env: dict | None = None):
    return run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), *extra, env=env)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------ CLI regressions
def test_user_dir_created_at_out_during_export_is_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    proc = start_cli("export", str(tiny_checkpoint), "--out", str(out), env=PAUSE_AT_RENAME)
    wait_stopped(proc)  # export finished, staged, about to publish
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = resume(proc)
    assert_one_line_error(res, "appeared while qvl-compile was writing it")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert siblings(out) == []


def test_empty_user_dir_created_at_out_is_not_replaced(tmp_path):
    # plain rename(2) silently replaces an empty directory: the publish must use RENAME_NOREPLACE
    out = tmp_path / "ck"
    proc = start_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), env=PAUSE_AT_RENAME)
    wait_stopped(proc)
    out.mkdir()
    res = resume(proc)
    assert_one_line_error(res, "appeared while qvl-compile was writing it")
    assert list(out.iterdir()) == [] and siblings(out) == []


def test_second_concurrent_writer_fails_fast(tmp_path):
    out = tmp_path / "ck"
    first = start_cli("make-checkpoint", "--preset", "tiny", "--out", str(out), env=PAUSE_AT_RENAME)
    wait_stopped(first)
    for extra in ((), ("--overwrite",)):
        second = _make(out, *extra, "--seed", "1")
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


def test_overwrite_of_an_old_artifact_works_with_normal_permissions(tiny_checkpoint, tiny_artifact, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    (out / "stale-extra-file").write_text("from the old artifact")
    old_mask = os.umask(0o022)
    try:
        res = run_cli("export", str(tiny_checkpoint), "--out", str(out), "--overwrite")
    finally:
        os.umask(old_mask)
    assert res.returncode == 0, res.stderr
    assert not (out / "stale-extra-file").exists()
    assert json.loads((out / "manifest.json").read_text())["format"] == "qvl-artifact"
    assert siblings(out) == []
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert all(m == 0o644 for n, m in modes.items() if (out / n).is_file()), modes
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_checkpoint_files_respect_umask(tmp_path, umask, file_mode, dir_mode):
    # safetensors writes its shards 0600, tempfile.mkstemp (atomic manifest writes) too
    out = tmp_path / "ck"
    old_mask = os.umask(umask)
    try:
        res = _make(out)
    finally:
        os.umask(old_mask)
    assert res.returncode == 0, res.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}
    assert out.stat().st_mode & 0o777 == dir_mode


def test_overwrite_of_a_qvl_checkpoint_works(tmp_path):
    out = tmp_path / "ck"
    assert _make(out).returncode == 0
    first = tree_hashes(out)
    res = _make(out, "--overwrite", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert tree_hashes(out)["model.safetensors"] != first["model.safetensors"] and siblings(out) == []


def test_killed_between_the_two_renames_next_run_keeps_the_newest_copy(tmp_path):
    out = tmp_path / "ck"
    assert _make(out).returncode == 0
    res = _make(out, "--overwrite", "--seed", "1", env={"QVL_FAULT_AT": "swap"})
    assert res.returncode == -9
    assert not out.exists()  # the old copy is aside, the new one staged: the worst moment to die
    ref = tmp_path / "ref"
    assert _make(ref, "--seed", "1").returncode == 0
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
