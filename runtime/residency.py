"""Where an artifact's bytes are: the disk (NVMe), the kernel's page cache, or ONNX Runtime's heap; and moving them.

Tiers, slowest first:

* **disk**: the artifact's files (graphs, the weight store or a `--cache` artifact's hard-linked objects).
* **page cache**: the kernel's cache of file pages, shared by every process. A session created from pages already
  there loads at memory speed instead of disk speed; so does a streamed part (`backends/partitioned.py`).
* **RAM of a loaded session**: ONNX Runtime copies every initializer into its own heap when it creates a session
  (external data is read through the page cache, then copied), so the "RAM tier" of a loaded part is ORT's heap,
  and the page cache is the tier between the disk and it. Mapping the weight file does not make weights "RAM
  resident" for ORT; it only decides where the copy comes from.

What a RAM budget bounds: the process's RSS -- ORT's heap (kept parts' weights, arenas), the KV cache, a streamed
part's session while it runs, and the file pages the process itself maps and touches (the memory-mapped embedding,
counted as RssFile). What it does not bound: the page cache. Pages that `read_ahead` / `warm_artifact` / a session
load bring in stay cached after use, outside the process's RSS (in a cgroup they are charged as file memory, and
reclaimed first); they are clean, so the kernel drops them under memory pressure without writing anything. So
prefetching cannot push the process over its RSS budget, but it can push other files' pages out of the cache, and
the kernel can drop prefetched pages before they are used (the load then reads the disk again: prefetching is a
speed hint, never a correctness matter).

Mechanisms (Linux first; `support()` says what this host lacks, and the functions that need it raise
`ResidencyUnsupported` with that reason):

* eviction: `posix_fadvise(POSIX_FADV_DONTNEED)` drops a range's clean pages, no root needed. Dirty pages are
  skipped by it, so the file is `fdatasync`ed first. Pages that some process has mapped stay, and tmpfs pages
  cannot be dropped at all (they are the file).
* residency: `mincore(2)` through ctypes on a PROT_READ shared mapping of the range, which touches no page. Since
  Linux 5.0 the kernel answers for the page cache only when the caller owns the file or may write it (otherwise it
  reports only this process's own mapped pages); `resident_fraction` refuses other files instead of reporting 0.
* read-ahead: `POSIX_FADV_WILLNEED` is advisory (the kernel may cap or skip it), so `read_ahead` also reads the
  bytes with `os.preadv` into one reused buffer: when it returns, the pages were in the cache. Its descriptor is
  `POSIX_FADV_RANDOM`, so the kernel's own read-ahead (here up to 8 MiB) does not read past the ranges asked for.
* `mmap.madvise` is not used: MADV_DONTNEED on a file mapping only unmaps this process's view (the cache keeps the
  pages), and MADV_WILLNEED is the same hint as the fadvise one.

A length of 0 or None means "to the end of the file" everywhere (posix_fadvise's convention).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from qvl.errors import QvlError

CHUNK = 8 << 20  # read buffer: large enough for NVMe's sequential speed, small enough to stay in L3-ish reach
WARM_UNIT = 64 << 20  # warm_artifact hands files to its readers in runs of this size (parallel on one big store)
PAGE = mmap.PAGESIZE


class ResidencyUnsupported(QvlError):
    """This host cannot do what was asked (no posix_fadvise, no mincore, a file whose cache state is hidden)."""


# -- what this host supports ---------------------------------------------------------------------------------

_LIBC: list = []


def _libc():
    """libc with mmap / munmap / mincore typed, or None (no C library ctypes can load, or no mincore)."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore  # noqa: B018 (AttributeError when absent)
        except (OSError, AttributeError, TypeError):
            libc = None
        if libc is not None:
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC.append(libc)
    return _LIBC[0]


def support() -> dict[str, str | None]:
    """Per capability ("evict", "resident_fraction", "willneed", "preadv"): None when available, else why not."""
    fadvise = hasattr(os, "posix_fadvise")
    return {
        "evict": None if fadvise else "os.posix_fadvise is missing on this platform: the page cache cannot be dropped "
                                      "per file without root",
        "resident_fraction": None if _libc() is not None and hasattr(mmap, "PROT_READ") else
        "mincore(2) is not reachable through ctypes on this platform: page-cache residency cannot be measured",
        "willneed": None if fadvise else "os.posix_fadvise is missing: read-ahead only reads (no kernel hint)",
        "preadv": None if hasattr(os, "preadv") else "os.preadv is missing: reads go through os.pread (one copy more)",
    }


def _need(capability: str) -> None:
    reason = support()[capability]
    if reason is not None:
        raise ResidencyUnsupported(reason)


def _span(size: int, offset: int, length: int | None) -> tuple[int, int]:
    start = min(max(0, int(offset)), size)
    stop = size if not length else min(size, start + max(0, int(length)))
    return start, stop


# -- eviction and residency ---------------------------------------------------------------------------------

def evict_file(path, offset: int = 0, length: int = 0) -> None:
    """Drop the clean pages of `path`[offset, offset + length) from the page cache (length 0: to the end)."""
    _need("evict")
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)  # DONTNEED skips dirty pages: write them back first (a no-op on a clean file)
        except OSError:
            pass  # a file system without sync support has nothing dirty to write
        os.posix_fadvise(fd, int(offset), int(length), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict_artifact(artifact_dir) -> dict:
    """Evict every regular file under `artifact_dir` (graphs, weight store, a `--cache` artifact's objects, which
    are hard links, so the cache's copy is the same pages): {"files", "bytes"}."""
    files = 0
    total = 0
    for root, _dirs, names in os.walk(artifact_dir):  # does not follow symlinks (an artifact has none)
        for name in names:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                evict_file(p)
                files += 1
                total += os.path.getsize(p)
    return {"files": files, "bytes": total}


def _check_visible(path, st: os.stat_result) -> None:
    if st.st_uid == os.geteuid():
        return
    if os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    raise ResidencyUnsupported(f"the kernel hides the page-cache state of {path} from this user (mincore reports "
                               "it only for files the caller owns or may write)",
                               hint="measure files you own, or run as their owner")


def _page_vector(fd: int, path, start: int, stop: int) -> np.ndarray:
    """mincore's bytes for the pages of [start, stop) of an open file (bit 0: in the page cache); stop > start."""
    libc = _libc()
    base = start - start % PAGE
    span = stop - base
    addr = libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, base)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {path} for mincore: {os.strerror(err)}")
    try:
        vec = np.zeros((span + PAGE - 1) // PAGE, dtype=np.uint8)
        if libc.mincore(addr, span, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore on {path}: {os.strerror(err)}")
    finally:
        libc.munmap(addr, span)
    return vec & 1


def resident_fraction(path, offset: int = 0, length: int | None = None) -> float:
    """Fraction of the pages of `path`[offset, offset + length) that are in the page cache (1.0 for an empty range).
    Touches no page: mincore on a fresh PROT_READ mapping of the range."""
    _need("resident_fraction")
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        _check_visible(path, st)
        start, stop = _span(st.st_size, offset, length)
        if stop <= start:
            return 1.0
        vec = _page_vector(fd, path, start, stop)
    finally:
        os.close(fd)
    return float(np.count_nonzero(vec)) / vec.size


def _missing_runs(path, ranges) -> list[tuple[int, int]]:
    """The parts of `ranges` ((offset, length), clipped to the file) whose pages are not in the page cache, as
    (offset, length) runs; all of them when this host cannot tell."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        spans = [r for r in (_span(st.st_size, off, ln) for off, ln in ranges) if r[1] > r[0]]
        try:
            _need("resident_fraction")
            _check_visible(path, st)
        except ResidencyUnsupported:
            return [(a, b - a) for a, b in spans]
        out = []
        for start, stop in spans:
            base = start - start % PAGE
            edges = np.flatnonzero(np.diff(np.concatenate(([1], _page_vector(fd, path, start, stop), [1]))))
            for a, b in zip(edges[::2], edges[1::2]):  # each run of absent pages is pages [a, b)
                lo, hi = max(start, base + int(a) * PAGE), min(stop, base + int(b) * PAGE)
                out.append((lo, hi - lo))
        return out
    finally:
        os.close(fd)


def artifact_resident_fraction(artifact_dir) -> float:
    """Bytes-weighted resident fraction of the files `warm_artifact` reads (graphs and weight files)."""
    sizes = [(p, p.stat().st_size) for p in artifact_load_files(artifact_dir)]
    total = sum(s for _, s in sizes)
    return sum(resident_fraction(p) * s for p, s in sizes) / total if total else 1.0


# -- reading ahead ------------------------------------------------------------------------------------------

def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, len(view), pos)
    view[:len(data)] = data
    return len(data)


def _read_runs(fd: int, runs, view: memoryview, advice: int | None, willneed: bool = True) -> int:
    """`advice` for the descriptor, WILLNEED every run (the kernel starts them all at once), then read each run
    through `view`; bytes read."""
    if hasattr(os, "posix_fadvise"):
        if advice is not None:
            os.posix_fadvise(fd, 0, 0, advice)
        for start, stop in runs if willneed else ():
            os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
    total = 0
    for start, stop in runs:
        pos = start
        while pos < stop:
            got = _pread_into(fd, view[:min(len(view), stop - pos)], pos)
            if got <= 0:
                break  # the file shrank under us
            pos += got
            total += got
    return total


def read_ahead(path, ranges, chunk: int = CHUNK, buffer: bytearray | None = None) -> int:
    """Bring `path`'s (offset, length) `ranges` into the page cache, and only those (kernel read-ahead off for this
    descriptor); returns the bytes read. `buffer`: a reusable read buffer (else one of `chunk` bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        runs = [r for r in (_span(size, off, ln) for off, ln in ranges) if r[1] > r[0]]
        if not runs:
            return 0
        buf = buffer if buffer is not None else bytearray(min(int(chunk), max(b - a for a, b in runs)))
        return _read_runs(fd, runs, memoryview(buf), getattr(os, "POSIX_FADV_RANDOM", None))
    finally:
        os.close(fd)


class Prefetcher:
    """Reads parts' weight ranges into the page cache on one background thread, first queued first read.

    `prefetch_part` / `prefetch_ranges` return at once. Only pages not already in the page cache are read (mincore
    first: decode asks for every streamed part every token, and re-reading cached pages would cost a memory copy of
    the part each time), unless `skip_resident=False`. A name already queued or being read is not queued again;
    when `max_queued_parts` are waiting, the oldest waiting one is dropped (`dropped`): its user has moved on and
    is loading it itself by now. `order`: the names read, in the order they were read; `errors`: (name, message)
    of reads that failed (a prefetch failure is not the caller's: the session load reports a missing file itself).
    """

    def __init__(self, max_queued_parts: int = 2, chunk: int = CHUNK, skip_resident: bool = True):
        self.max_queued_parts = max(1, int(max_queued_parts))
        self.skip_resident = skip_resident
        self.order: list[str] = []
        self.dropped: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.bytes_read = 0
        self.seconds = 0.0
        self._pending: deque = deque()
        self._running: str | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._buffer = memoryview(bytearray(int(chunk)))
        self._manifests: dict[Path, object] = {}  # artifact dir -> its manifest (a part's graph file)
        self._thread = threading.Thread(target=self._loop, name="qvl-prefetch", daemon=True)
        self._thread.start()

    @property
    def running(self) -> str | None:
        """The name being read now, or None."""
        return self._running

    def prefetch_part(self, artifact_dir: Path, spec) -> None:
        """Queue a partition part (`artifacts.schema.DecoderPart`): its graph file and its `ranges`."""
        self._submit(spec.name, lambda: self._part_runs(Path(artifact_dir), spec))

    def prefetch_ranges(self, name: str, paths_and_ranges) -> None:
        """Queue (path, offset, length) runs under `name`."""
        runs = [(Path(p), int(off), int(ln or 0)) for p, off, ln in paths_and_ranges]
        self._submit(name, lambda: runs)

    def _part_runs(self, artifact_dir: Path, spec) -> list:
        manifest = self._manifests.get(artifact_dir)
        if manifest is None:
            from qvl.artifacts.manifest import read_manifest

            manifest = self._manifests[artifact_dir] = read_manifest(artifact_dir, verify_graphs=False)
        runs = [(manifest.graph_path(spec.graph), 0, 0)]  # the .onnx itself, read at every session creation
        return runs + [(artifact_dir / file, int(off), int(ln)) for file, off, ln in spec.ranges]

    def _submit(self, name: str, runs) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("Prefetcher is closed")
            if name == self._running or any(n == name for n, _ in self._pending):
                return
            if len(self._pending) >= self.max_queued_parts:
                self.dropped.append(self._pending.popleft()[0])
            self._pending.append((name, runs))
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                name, runs = self._pending.popleft()
                self._running = name
            t = time.perf_counter()
            try:
                by_path: dict[Path, list] = {}
                for path, off, ln in runs():
                    by_path.setdefault(path, []).append((off, ln))
                if self.skip_resident:
                    by_path = {p: _missing_runs(p, rs) for p, rs in by_path.items()}
                n = sum(read_ahead(p, rs, buffer=self._buffer) for p, rs in by_path.items() if rs)
                error = None
            except Exception as exc:  # recorded, and the thread lives on: prefetching is only a hint
                n, error = 0, f"{type(exc).__name__}: {exc}"
            with self._cv:
                self.bytes_read += n
                self.seconds += time.perf_counter() - t
                if error is None:
                    self.order.append(name)
                else:
                    self.errors.append((name, error))
                self._running = None
                self._cv.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Until everything queued has been read; TimeoutError if that takes longer than `timeout` seconds."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._pending and self._running is None, timeout):
                raise TimeoutError(f"prefetch still busy after {timeout} s ({len(self._pending)} parts waiting)")

    def close(self) -> None:
        """Drop what is still waiting, finish the read under way, stop the thread."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- warming a whole artifact, measuring the disk -------------------------------------------------------------

def artifact_load_files(artifact_dir) -> list[Path]:
    """What loading the artifact reads: every graph (ONNX Runtime's saved optimized ones too) and weight file."""
    from qvl.artifacts.manifest import read_manifest

    m = read_manifest(Path(artifact_dir), verify_graphs=False)
    names = [g.file for g in m.graphs.values()]
    if m.ort_optimized is not None:
        names += [g.file for g in m.ort_optimized.graphs.values()]
    names += list(m.weights.files)
    seen: dict[str, Path] = {}
    for n in names:
        seen.setdefault(n, m.path(n))
    return [p for p in seen.values() if p.is_file()]


def warm_artifact(artifact_dir, threads: int = 2, chunk: int = CHUNK) -> dict:
    """`--warm`: read every graph and weight file into the page cache with `threads` readers, each reading
    `WARM_UNIT` runs sequentially (so one big weight store is read in parallel too). Pages already cached are not
    read again (a warm start costs a mincore, not a copy of the model). {"files", "bytes" (read), "skipped" (already
    resident; bytes + skipped = the files' sizes), "seconds", "gb_s" (of the bytes read), "threads"}."""
    threads = int(threads)
    if threads < 1:
        raise QvlError(f"warm_artifact needs at least 1 reader thread, not {threads}")
    t = time.perf_counter()
    files = artifact_load_files(artifact_dir)
    sizes = sum(p.stat().st_size for p in files)
    units = deque((p, o, min(WARM_UNIT, off + ln - o)) for p in files for off, ln in _missing_runs(p, [(0, 0)])
                  for o in range(off, off + ln, WARM_UNIT))
    lock = threading.Lock()
    done: list[int] = []
    failures: list[BaseException] = []

    def reader() -> None:
        view = memoryview(bytearray(int(chunk)))
        n = 0
        try:
            while True:
                with lock:
                    if not units or failures:
                        break
                    path, off, ln = units.popleft()
                fd = os.open(path, os.O_RDONLY)
                try:
                    n += _read_runs(fd, [(off, off + ln)], view, getattr(os, "POSIX_FADV_SEQUENTIAL", None))
                finally:
                    os.close(fd)
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)
        with lock:
            done.append(n)

    workers = [threading.Thread(target=reader, name=f"qvl-warm-{i}", daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t
    if failures:
        raise failures[0]
    total = sum(done)
    return {"files": len(files), "bytes": total, "skipped": sizes - total, "seconds": seconds,
            "gb_s": total / seconds / 1e9 if seconds else 0.0, "threads": threads}


def warm_in_background(artifact_dir, threads: int = 2) -> Future:
    """`warm_artifact` on its own thread, started now (e.g. while the session loads); the Future has its dict."""
    fut: Future = Future()
    fut.set_running_or_notify_cancel()

    def run() -> None:
        try:
            fut.set_result(warm_artifact(artifact_dir, threads))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, name="qvl-warm", daemon=True).start()
    return fut


def measure_disk_read(path, size: int | None = None) -> float:
    """Sequential read speed of the disk under `path`, in GB/s: the first `size` bytes (default all) evicted, then
    read once; evicted again afterwards unless they were resident before (the cache is left as found)."""
    path = Path(path)
    total = path.stat().st_size
    size = total if size is None else min(int(size), total)
    if size <= 0:
        raise QvlError(f"cannot measure a disk read on {path}: nothing to read")
    before = resident_fraction(path, 0, size)
    evict_file(path, 0, size)
    left = resident_fraction(path, 0, size)
    if left > 0.05:
        raise ResidencyUnsupported(f"{left:.0%} of {path} stayed in the page cache after eviction (tmpfs, or mapped "
                                   "by a running process): its read speed would be memory's, not the disk's")
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        # one plain sequential reader (the kernel's read-ahead, no WILLNEED of the whole range): what `dd` would see
        n = _read_runs(fd, [(0, size)], memoryview(bytearray(CHUNK)), getattr(os, "POSIX_FADV_SEQUENTIAL", None),
                       willneed=False)
        seconds = time.perf_counter() - t
    finally:
        os.close(fd)
    if before < 0.5:
        evict_file(path, 0, size)
    return n / seconds / 1e9
