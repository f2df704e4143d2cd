"""Helpers shared by the output-safety, disk-space and fault-injection tests (not a test module)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qvl.toolchain.staging import owner_state


def start_cli(*args: str, env: dict | None = None, base_env: dict | None = None, umask: int = -1,
              capture_to: Path | None = None) -> subprocess.Popen:
    """Like conftest.run_cli, but returns at once (for runs paused with QVL_FAULT_SIGNAL=SIGSTOP). `base_env`
    replaces os.environ as the starting point, `umask` (>= 0) is set in the child, and `capture_to` sends its
    stdout/stderr to files in that directory instead of pipes (`finish` reads either)."""
    full_env = dict(os.environ if base_env is None else base_env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    argv = [sys.executable, "-c", "from qvl.cli import main; main()", *args]
    if capture_to is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                umask=umask)
    Path(capture_to).mkdir(parents=True, exist_ok=True)
    with open(Path(capture_to) / "stdout", "wb") as out, open(Path(capture_to) / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=full_env, umask=umask)
    proc.capture_to = Path(capture_to)
    return proc


def _output(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a finished run whose output went to files (start_cli's capture_to)."""
    return tuple((proc.capture_to / name).read_bytes().decode(errors="replace") for name in ("stdout", "stderr"))


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a start_cli run to exit; its CompletedProcess (text), as conftest.run_cli returns."""
    out, err = proc.communicate(timeout=timeout)
    if getattr(proc, "capture_to", None) is not None:
        out, err = _output(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stopped(proc: subprocess.Popen) -> bool:
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:  # already reaped
        return False
    return stat[stat.rindex(")") + 2] == "T"


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `proc` has stopped itself at its fault point (state T in /proc/PID/stat)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else _output(proc)[1]
            raise AssertionError(f"exited {proc.returncode} before its fault point: {err}")
        if _stopped(proc):
            return
        time.sleep(0.1)
    raise AssertionError("never reached its fault point")


def resume(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    os.kill(proc.pid, signal.SIGCONT)
    return finish(proc, timeout)


class EarlyRuns:
    """CLI runs that a test module starts when its first test starts, so that they overlap its other tests.

    Why: the suite runs one test at a time and a test mostly waits on one single-threaded `qvl-compile`
    subprocess, so on the 2-core CI machine one core idles. A module's slow runs whose inputs are fixed in
    advance (an export, a run that kills or pauses itself at a QVL_FAULT_AT point) are queued here at module
    setup and run in the background, at most `lanes` at a time (a run paused with SIGSTOP frees its lane);
    each is then collected by the one test that owns it with `take(key)` -- a Popen for `finish`,
    `wait_stopped`, `resume` -- and that test asserts exactly what it did when it started the run itself.
    Only *when* a run starts changes: same argv, its own directory `dir(key)`, the environment and umask of
    module setup (not those a concurrent test has set meanwhile), output captured in files. Runs no test
    took (or left paused) are killed at module teardown."""

    def __init__(self, root: Path, lanes: int = 1):
        self.root = Path(root)
        self.lanes = lanes
        self._env = dict(os.environ)
        self._umask = os.umask(0)
        os.umask(self._umask)
        self._queue: list[tuple[str, tuple, dict]] = []
        self._procs: dict[str, subprocess.Popen] = {}  # started, not yet taken
        self._all: list[subprocess.Popen] = []
        self._started: dict[str, threading.Event] = {}
        self._errors: dict[str, BaseException] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def dir(self, key: str) -> Path:
        """The run's own directory (created): put its --out, TMPDIR, cache here."""
        d = self.root / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add(self, key: str, *args: str, env: dict | None = None, umask: int | None = None) -> None:
        """Queue `qvl-compile ARGS` (started in queue order as lanes free up)."""
        assert key not in self._started, key
        self._started[key] = threading.Event()
        with self._lock:
            self._queue.append((key, args, {"env": env, "umask": self._umask if umask is None else umask}))
            if self._thread is None:
                self._thread = threading.Thread(target=self._pump, name="early-runs", daemon=True)
                self._thread.start()

    def _busy(self) -> int:
        return sum(1 for p in list(self._procs.values()) if p.poll() is None and not _stopped(p))

    def _pump(self) -> None:
        while not self._closed:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                if self._busy() < self.lanes:
                    self._start(0)
                    continue
            time.sleep(0.05)

    def _start(self, i: int) -> None:
        """Start queued run `i` (lock held)."""
        key, args, kw = self._queue.pop(i)
        try:
            self._procs[key] = start_cli(*args, base_env=self._env, capture_to=self.root / ".logs" / key, **kw)
            self._all.append(self._procs[key])
        except BaseException as exc:  # reported by take()
            self._errors[key] = exc
        self._started[key].set()

    def take(self, key: str, timeout: float = 900) -> subprocess.Popen:
        """The run `key` (started, perhaps finished or paused): the calling test owns it from now on. One still
        queued starts now, whatever the lanes: the test waits for it anyway (as when it started the run itself)."""
        with self._lock:
            queued = [i for i, (k, _, _) in enumerate(self._queue) if k == key]
            if queued:
                self._start(queued[0])
        if not self._started[key].wait(timeout):
            raise AssertionError(f"early run {key!r} was not started within {timeout} s")
        if key in self._errors:
            raise self._errors.pop(key)
        with self._lock:
            return self._procs.pop(key)

    def close(self) -> None:
        """Module teardown: drop what was not started; kill every run still alive (not taken, or left paused by
        a test that failed before resuming it)."""
        self._closed = True
        with self._lock:
            self._queue.clear()
            self._procs = {}
        for p in self._all:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_cli_concurrently(*argvs, env: dict | None = None, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run independent `qvl-compile` invocations at the same time (each as conftest.run_cli would); their results in
    argument order. Only for runs that cannot see each other: different --out paths, no shared lock or TMPDIR state."""
    procs = [start_cli(*argv, env=env) for argv in argvs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def copy_qvl_checkpoint(src: Path, dst: Path) -> Path:
    """`dst` as a copy of the session's tiny qvl-compile checkpoint `src` (a cheap stand-in for running
    `make-checkpoint --preset tiny --out dst`, same files); falls back to the real command when `src` lacks the
    qvl-compile marker (QVL_TINY_CHECKPOINT pointing at a checkpoint from elsewhere)."""
    from qvl.toolchain.fsutil import MARKER

    if (Path(src) / MARKER).is_file():
        shutil.copytree(src, dst)
    else:
        proc = subprocess.run([sys.executable, "-c", "from qvl.cli import main; main()", "make-checkpoint",
                               "--preset", "tiny", "--out", str(dst)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return Path(dst)


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
