"""Owner-tagged scratch directories, and cleanup of the ones a killed run left behind.

A SIGKILLed compile cannot remove its staging sibling (`.OUT.partial-*`) or its temp directories
(`$TMPDIR/qvl-*`), and a blind sweep of such names would delete the scratch space of a run that is still
going. So every scratch directory carries its owner: the name holds `pid<PID>-st<START>` (START is the
process start time from /proc/PID/stat, so a reused pid does not look alive), and an owner file inside
adds host, boot id and pid namespace. A directory is removed only when its owner is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

OWNER_FILE = ".qvl-owner.json"
_TAG_RE = re.compile(r"pid(\d+)-st(\d+)-")
# Scratch directories this project creates: `qvl-compile-*`, `qvl-fp32-*`, `.qvl-calib-*`, ...
_SCRATCH_PREFIXES = ("qvl-", ".qvl-")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a process, None if there is none (or no /proc)."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    rest = data[data.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return rest[0], int(rest[19])  # fields 3 (state) and 22 (starttime, clock ticks after boot)


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner_tag() -> str:
    """`pid<PID>-st<START>-<random>`: unique per call, parseable back to the owner process."""
    stat = _proc_stat(os.getpid())
    return f"pid{os.getpid()}-st{stat[1] if stat else 0}-{uuid.uuid4().hex[:8]}"


def write_owner(directory: Path) -> None:
    stat = _proc_stat(os.getpid())
    record = {"pid": os.getpid(), "starttime": stat[1] if stat else 0, "boot_id": _boot_id(),
              "pid_ns": _pid_ns(), "host": socket.gethostname()}
    (Path(directory) / OWNER_FILE).write_text(json.dumps(record))


def _process_alive(pid: int, start: int) -> bool:
    if not os.path.exists("/proc/self/stat"):  # no /proc (macOS): a signal-0 probe, pid reuse not detected
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):  # a zombie is a killed process not yet reaped
        return False
    return start == 0 or stat[1] == start


def owner_state(path: Path, record_dir: Path | None = None) -> str:
    """"alive", "dead" or "unknown" (not tagged, or owned by another host / pid namespace: not ours to judge).
    `record_dir`: where the owner file is, when `path` itself has none (a renamed-aside old output)."""
    path = Path(path)
    m = _TAG_RE.search(path.name)
    if not m:
        return "unknown"
    try:
        rec = json.loads((Path(record_dir or path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        rec = None  # killed between mkdir and writing the owner file, or already published: the name decides
    if rec:
        if rec.get("host") != socket.gethostname():
            return "unknown"
        if rec.get("boot_id") != _boot_id():
            return "dead"  # rebooted since: every process of that boot is gone
        if rec.get("pid_ns") != _pid_ns():
            return "unknown"  # another container's pids mean nothing here
    return "alive" if _process_alive(int(m.group(1)), int(m.group(2))) else "dead"


def remove_tree(path: Path) -> None:
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_scratch(directory: Path | str | None = None) -> list[Path]:
    """Remove `qvl-*` / `.qvl-*` scratch directories in `directory` (default: the temp dir) whose owner is dead."""
    directory = Path(directory or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(_SCRATCH_PREFIXES) and e.is_dir(follow_symlinks=False) and _TAG_RE.search(e.name):
            if owner_state(Path(e.path)) == "dead":
                remove_tree(Path(e.path))
                removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def scratch_dir(prefix: str, dir: Path | str | None = None):
    """`tempfile.TemporaryDirectory` with owner info in its name and an owner file inside; first removes the
    scratch directories that killed runs left in the same place. Disk full inside → one-line QvlError naming
    the filesystem that filled (see fsutil.disk_full_error), measured before the cleanup frees it again."""
    from qvl.toolchain.fsutil import disk_full_error

    base = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    clean_stale_scratch(base)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=base))
    try:
        write_owner(path)
        yield path
    except Exception as exc:
        full = disk_full_error(exc, [path])
        remove_tree(path)
        if full is not None:
            raise full from exc
        raise
    finally:
        remove_tree(path)
