"""Atomic directory output: write into a hidden sibling, rename into place only when complete.

Every command that produces a directory (checkpoint, artifact) uses this, so an interrupted or failed
run never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from qvl.errors import QvlError


def check_free_space(path: Path, need_bytes: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise QvlError(
            f"not enough disk space at {probe}: need {need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free",
            hint="free some space or choose another --out",
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a staging directory; on success it replaces `out`, on any error it is removed."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise QvlError(f"output directory already exists: {out}", hint="pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise QvlError(f"disk full while writing {out}", hint="free some space and run again") from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
