"""Output directories that never lose user data: staged, locked, published by rename.

Every command that produces a directory (checkpoint, artifact, kit) writes it through `atomic_output_dir`:
- an exclusive flock on `.OUT.lock` next to `--out`, so a second concurrent writer fails at once instead of
  silently replacing the first one's output (the kernel releases it when the process dies, even by SIGKILL);
- the output is staged in `.OUT.partial-<owner>` and renamed into place only onto a path that is still
  absent (renameat2 RENAME_NOREPLACE): a directory the user made there meanwhile is never touched;
- `--overwrite` replaces only a qvl-compile output (artifact manifest or checkpoint marker), never the
  command's own source, and swaps old → `.OUT.old-<owner>`, staging → OUT, then deletes the old copy; a run
  killed between the two renames is completed by the next writer of that path (`recover`);
- published files get ordinary permissions (0666/0777 & ~umask): tempfile and safetensors write 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import signal
import tempfile
from pathlib import Path

from qvl.errors import QvlError
from qvl.toolchain.staging import OWNER_FILE, owner_state, owner_tag, remove_tree, write_owner, clean_stale_scratch

MARKER = ".qvl-output.json"  # written into qvl-compile checkpoints (artifacts are known by their manifest)
_HELD: dict[str, int] = {}  # locks this process holds: nested writers of the same --out must not self-deadlock


def fault_point(name: str) -> None:
    """Test-only fault injection (tests/test_fault_injection.py): `QVL_FAULT_AT=<name>` makes the process send
    itself `QVL_FAULT_SIGNAL` (default SIGKILL; SIGINT, SIGSTOP for pauses) on reaching this point. Points:
    export:traced, weights:write, passes:start, rename, swap, cache:object (artifacts/content_store.py). The only
    place that reads these variables."""
    if os.environ.get("QVL_FAULT_AT") != name:
        return
    os.kill(os.getpid(), getattr(signal, os.environ.get("QVL_FAULT_SIGNAL", "SIGKILL")))


# ------------------------------------------------------------------------------------------ disk space
def _existing(path: Path) -> Path:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


_SCRATCH_RE = re.compile(r"^\.?qvl-.*pid\d+-st\d+-")  # a staging.scratch_dir directory
_STAGING_RE = re.compile(r"^\.(.+)\.partial-pid\d+-st\d+-")  # an atomic_output_dir staging directory


def _user_path(path: Path) -> Path:
    """The path as the user named it: a staging directory stands for the --out it becomes."""
    return Path(*[(m.group(1) if (m := _STAGING_RE.match(part)) else part) for part in Path(path).absolute().parts])


def _label(path: Path) -> str:
    """Name a path the way the user controls it: TMPDIR for qvl's scratch space there, --out otherwise
    (judged by the scratch dir's name, not by location: an --out under /tmp is still --out)."""
    p, tmp = Path(path).absolute(), Path(tempfile.gettempdir()).absolute()
    for i, part in enumerate(p.parts):
        if _SCRATCH_RE.match(part):
            base = Path(*p.parts[:i])
            return f"TMPDIR ({base})" if base == tmp else f"the scratch space in {base}"
    if p == tmp:
        return f"TMPDIR ({tmp})"
    return f"--out ({_user_path(p)})"


def _hint(labels: list[str]) -> str:
    if all(l.startswith("TMPDIR") for l in labels):
        return "free space there or point TMPDIR at a file system with more room"
    if any(l.startswith("TMPDIR") for l in labels):
        return "free some space, or point TMPDIR / --out at a file system with more room"
    return "free some space or choose another --out"


def check_space(needs: list[tuple[Path, int]]) -> None:
    """Each (path, bytes) must fit; paths on one file system must fit together."""
    by_dev: dict[int, list] = {}
    for path, need in needs:
        probe = _existing(path)
        by_dev.setdefault(os.stat(probe).st_dev, []).append((path, need, probe))
    for group in by_dev.values():
        need = sum(n for _, n, _ in group)
        free = os.statvfs(group[0][2]).f_bavail * os.statvfs(group[0][2]).f_frsize
        if free < need:
            labels = list(dict.fromkeys(_label(p) for p, _, _ in group))
            raise QvlError(
                f"not enough disk space for {' and '.join(labels)}: need {need / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free on the file system of {_user_path(group[0][2])}",
                hint=_hint(labels),
            )


def check_free_space(path: Path, need_bytes: int) -> None:
    check_space([(Path(path), need_bytes)])


def _is_enospc(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):  # wrapped by onnx / safetensors / protobuf writers
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, paths: list[Path]) -> QvlError | None:
    """A one-line QvlError naming the file system that filled, or None if `exc` is not a full disk. Call it
    before removing what was written, while the full file system still shows as full."""
    if isinstance(exc, QvlError) or not _is_enospc(exc):
        return None
    places = [Path(p) for p in paths] + [Path(tempfile.gettempdir())]
    free = {}
    for p in places:
        try:
            st = os.statvfs(_existing(p))
            free[p] = st.f_bavail * st.f_frsize
        except OSError:
            continue
    fullest = min(free, key=free.get) if free else places[0]
    same = [p for p in free if os.stat(_existing(p)).st_dev == os.stat(_existing(fullest)).st_dev]
    labels = list(dict.fromkeys(_label(p) for p in [fullest, *same]))
    return QvlError(f"disk full while writing {' and '.join(labels)}: no space left on the file system of "
                    f"{_user_path(_existing(fullest))}; nothing partial was kept", hint=_hint(labels))


# ------------------------------------------------------------------------------------------ target checks
def qvl_output_kind(path: Path) -> str | None:
    """"artifact" / "checkpoint" if `path` is a directory qvl-compile wrote, else None."""
    path = Path(path)
    for name, key, want in (("manifest.json", "format", "qvl-artifact"), (MARKER, "format", "qvl-output")):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key) == want:
            return data.get("kind", "artifact")
    return None


def check_output_target(out: Path, overwrite: bool, sources=()) -> None:
    """Refuse an --out that is, contains or lies inside a source of the command; an existing one without
    --overwrite; and, with --overwrite, anything but a qvl-compile output."""
    out = Path(out).absolute()
    r_out = out.resolve()
    for src in sources:
        if src is None:
            continue
        r_src = Path(src).resolve()
        if r_out == r_src:
            raise QvlError(f"--out {out} is the source of this command", hint="write to another --out")
        if r_src in r_out.parents:
            raise QvlError(f"--out {out} is inside the source {src}", hint="write to a directory outside it")
        if r_out in r_src.parents:
            raise QvlError(f"the source {src} is inside --out {out}", hint="write to another --out")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise QvlError(f"output directory already exists: {out}", hint="pass --overwrite or choose another --out")
    if out.is_symlink() or not out.is_dir() or qvl_output_kind(out) is None:
        raise QvlError(f"--overwrite refuses to replace {out}: it is not a qvl-compile artifact or checkpoint",
                       hint="move it away yourself or choose another --out")


# ------------------------------------------------------------------------------------------ locking
def _prepare_parent(out: Path) -> None:
    """Create `out`'s parent directories, or say in one line why they cannot be."""
    for p in (out.parent, *out.parent.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                raise QvlError(f"cannot write {out}: {p} is a file, not a directory", hint="choose another --out")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QvlError(f"cannot create {out.parent}: {exc.strerror}", hint="choose a writable --out") from None


@contextlib.contextmanager
def output_lock(out: Path):
    """Exclusive, non-blocking flock on `.OUT.lock`; re-entrant within this process."""
    out = Path(out).absolute()
    key = str(out)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    _prepare_parent(out)
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # read-only file system, no permission, /proc ...: the user's --out, not a bug
            raise QvlError(f"cannot write in {out.parent}: {exc.strerror}",
                           hint="choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QvlError(f"another qvl-compile is writing {out} (pid {pid})",
                           hint="wait for it to finish or choose another --out") from None
        # The previous holder unlinks the file when done; if it did so after our open, we locked an orphan.
        try:
            now = os.stat(lock)
            if (now.st_dev, now.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiter that opened it sees the inode change and retries
        os.close(fd)


# ------------------------------------------------------------------------------------------ publishing
def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError if `dst` exists, even as an empty directory (which plain
    rename would silently replace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            raise FileExistsError(e, os.strerror(e), str(dst))
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), str(dst))
    # file systems without RENAME_NOREPLACE: check, then rename (the lock keeps other qvl writers out)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def recover(out: Path) -> None:
    """Finish what killed writers of `out` left (call with the lock held). The order of `_publish` makes the
    state unambiguous: `.OUT.old-T` exists only after T's staging was complete, so with OUT missing the
    staging `.OUT.partial-T` is the newest complete copy (else the old one is put back). Then dead stagings go."""
    out = Path(out).absolute()
    old, partial = f".{out.name}.old-", f".{out.name}.partial-"
    for entry in sorted(out.parent.iterdir()):
        if entry.name.startswith(old):
            staged = out.parent / (partial + entry.name[len(old):])
            if owner_state(entry, record_dir=staged) != "dead":
                continue
            if not os.path.lexists(out):
                (staged if staged.is_dir() else entry).rename(out)
            if os.path.lexists(entry):
                remove_tree(entry)
    for entry in sorted(out.parent.iterdir()):
        if entry.name.startswith(partial) and owner_state(entry) == "dead":
            remove_tree(entry)


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines() if os.path.exists("/proc/self/status") else []:
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalize_permissions(root: Path) -> None:
    """Directories 0777 & ~umask, files 0666 & ~umask (0777 if executable), as a plain `cp` would leave them."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                x = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o777 if x else 0o666) & ~mask)


def _appeared(out: Path) -> QvlError:
    return QvlError(f"{out} appeared while qvl-compile was writing it; left it untouched",
                    hint="move it away and run again, or choose another --out")


def _publish(staging: Path, out: Path, tag: str) -> None:
    if not os.path.lexists(out):
        try:
            _rename_noreplace(staging, out)
        except FileExistsError:
            raise _appeared(out) from None
        return
    trash = out.parent / f".{out.name}.old-{tag}"
    os.rename(out, trash)
    fault_point("swap")
    try:
        _rename_noreplace(staging, out)
    except FileExistsError:
        raise QvlError(f"{out} was recreated while qvl-compile was replacing it; left it untouched",
                       hint=f"the previous output is at {trash}") from None
    remove_tree(trash)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, sources=(), kind: str = "artifact"):
    """Yield a staging directory; on success it becomes `out`, on any error (or signal) it is removed.
    `sources`: the paths the command reads (never replaced, never nested with `out`). `kind="checkpoint"`
    writes the marker that lets a later `--overwrite` recognise the directory as qvl-compile's."""
    out = Path(out).absolute()
    with output_lock(out):
        recover(out)
        check_output_target(out, overwrite, sources)
        existed = os.path.lexists(out)
        clean_stale_scratch()
        tag = owner_tag()
        staging = out.parent / f".{out.name}.partial-{tag}"
        staging.mkdir()
        try:
            write_owner(staging)
            yield staging
            (staging / OWNER_FILE).unlink(missing_ok=True)
            if kind != "artifact":
                (staging / MARKER).write_text(json.dumps({"format": "qvl-output", "kind": kind}) + "\n")
            normalize_permissions(staging)
            fault_point("rename")
            if not existed and os.path.lexists(out):
                raise _appeared(out)
            check_output_target(out, overwrite, sources)  # again: the target may have changed meanwhile
            _publish(staging, out, tag)
            with contextlib.suppress(OSError):
                fsync_dir(out.parent)
        except BaseException as exc:
            full = disk_full_error(exc, [staging])
            remove_tree(staging)
            if full is not None:
                raise full from exc
            raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
