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
from fs_helpers import resume, scratch, siblings, start_cli, wait_stopped


@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): see the module docstring")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


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


def test_out_fills_mid_write(small_fs, tiny_checkpoint):
    fs = small_fs("400m")  # passes the up-front check (weights + 256 MB margin); then filled behind its back
    out = fs / "art"
    proc = start_cli("export", str(tiny_checkpoint), "--out", str(out),
                     env={"QVL_FAULT_AT": "weights:write", "QVL_FAULT_SIGNAL": "SIGSTOP"})
    wait_stopped(proc)  # vision graph's weights are in the store, the decoder's are next
    _fill(fs)
    res = resume(proc)
    assert_one_line_error(res, "disk full while writing --out", str(fs))
    assert _contents(fs) == []


def test_tmpdir_fills_mid_export(small_fs, tiny_checkpoint, tmp_path):
    fs = small_fs("400m")
    out = tmp_path / "art"
    proc = start_cli("compile", str(tiny_checkpoint), "--out", str(out),
                     env={"TMPDIR": str(fs), "QVL_FAULT_AT": "export:traced", "QVL_FAULT_SIGNAL": "SIGSTOP"})
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
    try:
        for out in (ro / "art", ro / "sub" / "art"):
            res = run_cli("export", str(tiny_checkpoint), "--out", str(out))
            assert_one_line_error(res, "Read-only file system", str(ro))
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    afile = tmp_path / "afile"
    afile.write_text("user data")
    res = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(afile / "x" / "ck"))
    assert_one_line_error(res, f"{afile} is a file, not a directory")
    assert afile.read_text() == "user data"
    res = run_cli("export", str(tiny_checkpoint), "--out", "/proc/qvl-art")
    assert_one_line_error(res, "cannot write in /proc")
