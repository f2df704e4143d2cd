"""Helpers shared by the output-safety, disk-space and fault-injection tests (not a test module)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qvl.toolchain.staging import owner_state


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Like conftest.run_cli, but returns at once (for runs paused with QVL_FAULT_SIGNAL=SIGSTOP)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", "from qvl.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `proc` has stopped itself at its fault point (state T in /proc/PID/stat)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before its fault point: {proc.stderr.read()}")
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return
        time.sleep(0.1)
    raise AssertionError("never reached its fault point")


def resume(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[Path]:
    """qvl's hidden siblings of `out` (staging, replaced copy, lock file)."""
    return sorted(p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}."))


def scratch(tmpdir: Path) -> list[Path]:
    return sorted(p for p in Path(tmpdir).iterdir() if p.name.startswith(("qvl-", ".qvl-")))


def assert_only_stale(paths: list[Path]) -> None:
    """Whatever a killed run left must be recognisable as stale: owner-tagged, owner dead (or a lock file)."""
    for p in paths:
        if p.name.endswith(".lock"):
            continue
        assert owner_state(p) == "dead", (p, owner_state(p))
