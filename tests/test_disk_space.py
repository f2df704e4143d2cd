"""Disk and temp space (issue #12): the up-front check names the right file system and variable (TMPDIR vs
--out), and a disk that fills mid-write gives one `error:` line naming it, with nothing partial kept.

These mount small tmpfs file systems (`mount -t tmpfs -o size=... tmpfs DIR`, needs root / CAP_SYS_ADMIN) and
skip with the reason otherwise. The manual check then: mount a 20 MB tmpfs at /mnt/small, run
`qvl-compile make-checkpoint --preset tiny --out /mnt/small/ck` (error names --out) and
`TMPDIR=/mnt/small qvl-compile compile CKPT --out ~/art` (error names TMPDIR); `ls -a /mnt/small` is empty after.
Mid-write: pause the run with QVL_FAULT_AT=weights:write QVL_FAULT_SIGNAL=SIGSTOP, fill the file system
(`fallocate -l ...`), `kill -CONT` it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from fs_helpers import EarlyRuns, resume, run_cli_concurrently, scratch, siblings, wait_stopped


def _mount(d: Path, size: str) -> str | None:
    """Mount a `size` tmpfs at `d` (created); None, or why it cannot be done here."""
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): see the module docstring"
    return None


@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        why = _mount(d, size)
        if why:
            pytest.skip(why)
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


PAUSE_AT = {"QVL_FAULT_SIGNAL": "SIGSTOP"}


@pytest.fixture(scope="module", autouse=True)
def early(tiny_checkpoint, tmp_path_factory):
    """The two mid-write cases export the checkpoint up to a pause point (~20 s each): their runs start with the
    module's first test, one at a time, and pause themselves there (fs_helpers.EarlyRuns); the test named in the
    comment takes its run, fills the file system and resumes it. Each has its own 400 MB tmpfs (mounted here:
    passes the up-front check, weights + 256 MB margin; then filled behind the run's back)."""
    runs = EarlyRuns(tmp_path_factory.mktemp("early-disk-space"), lanes=1)
    runs.skip = {}
    mounted = []
    for key in ("out-fills", "tmpdir-fills"):
        fs = runs.dir(key) / "fs"
        runs.skip[key] = _mount(fs, "400m")
        if runs.skip[key] is None:
            mounted.append(fs)
    if runs.skip["out-fills"] is None:  # test_out_fills_mid_write
        runs.add("out-fills", "export", str(tiny_checkpoint), "--out", str(runs.dir("out-fills") / "fs" / "art"),
                 env={**PAUSE_AT, "QVL_FAULT_AT": "weights:write"})
    if runs.skip["tmpdir-fills"] is None:  # test_tmpdir_fills_mid_export
        runs.add("tmpdir-fills", "compile", str(tiny_checkpoint), "--out", str(runs.dir("tmpdir-fills") / "art"),
                 env={**PAUSE_AT, "QVL_FAULT_AT": "export:traced", "TMPDIR": str(runs.dir("tmpdir-fills") / "fs")})
    yield runs
    runs.close()
    for fs in mounted:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def _take(early, key: str):
    if early.skip[key]:
        pytest.skip(early.skip[key])
    return early.dir(key) / "fs", early.take(key)


def _fill(fs: Path, leave: int = 256 << 10) -> None:
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))


def _contents(fs: Path) -> list[str]:
    # `.ses`: a 51-byte session-id file onnxruntime itself keeps in TMPDIR (not qvl-compile's)
    return sorted(p.name for p in fs.iterdir() if p.name not in ("filler", ".ses"))


def test_out_too_small_is_reported_up_front(small_fs):
    fs = small_fs("20m")
    res = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(fs / "ck"))
    assert_one_line_error(res, "not enough disk space for --out", str(fs))
    assert "TMPDIR" not in res.stderr
    assert _contents(fs) == []


def test_small_tmpdir_is_blamed_not_out(small_fs, tiny_checkpoint, tmp_path):
    fs = small_fs("20m")
    out = tmp_path / "art"
    res = run_cli("compile", str(tiny_checkpoint), "--out", str(out), env={"TMPDIR": str(fs)})
    assert_one_line_error(res, "not enough disk space for TMPDIR", "TMPDIR")
    assert "--out" not in res.stderr.split("error:")[1].splitlines()[0]
    assert _contents(fs) == [] and not out.exists() and siblings(out) == []


def test_out_fills_mid_write(early):
    # `export CKPT --out FS/art` paused at weights:write, FS a 400 MB tmpfs: started by `early`
    fs, proc = _take(early, "out-fills")
    wait_stopped(proc)  # vision graph's weights are in the store, the decoder's are next
    _fill(fs)
    res = resume(proc)
    assert_one_line_error(res, "disk full while writing --out", str(fs))
    assert _contents(fs) == []


def test_tmpdir_fills_mid_export(early):
    # `TMPDIR=FS compile CKPT --out OUT` paused at export:traced, FS a 400 MB tmpfs: started by `early`
    fs, proc = _take(early, "tmpdir-fills")
    out = early.dir("tmpdir-fills") / "art"
    wait_stopped(proc)  # the export into $TMPDIR has traced the vision tower and will write its weights next
    _fill(fs)
    res = resume(proc)
    assert_one_line_error(res, "disk full while writing TMPDIR", str(fs))
    assert "--out" not in res.stderr.split("error:")[1].splitlines()[0]
    assert _contents(fs) == [] and scratch(fs) == []
    assert not out.exists() and siblings(out) == []


def test_unwritable_out_is_one_line_error(tmp_path, tiny_checkpoint):
    """Read-only file system, a path under a file, /proc: one line naming the place, nothing written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip() or r.returncode})")
    afile = tmp_path / "afile"
    afile.write_text("user data")
    try:
        # four independent refusals (different places, nothing shared): run side by side
        *ro_results, in_file, in_proc = run_cli_concurrently(
            *(("export", str(tiny_checkpoint), "--out", str(out)) for out in (ro / "art", ro / "sub" / "art")),
            ("make-checkpoint", "--preset", "tiny", "--out", str(afile / "x" / "ck")),
            ("export", str(tiny_checkpoint), "--out", "/proc/qvl-art"),
        )
        for res in ro_results:
            assert_one_line_error(res, "Read-only file system", str(ro))
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert_one_line_error(in_file, f"{afile} is a file, not a directory")
    assert afile.read_text() == "user data"
    assert_one_line_error(in_proc, "cannot write in /proc")
