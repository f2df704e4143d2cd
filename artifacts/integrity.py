"""Tamper evidence for artifacts: digests of every file, path containment, and the per-machine verified record.

* **Weight store** (`weights.bin`, up to several GB): blake3 digests of fixed-size chunks (64 MiB), recorded in
  `manifest["weights"]` as `algorithm`, `chunk_bytes`, `chunks` (hex, in file order) and `digest`, the
  whole-file digest: blake3 over a domain tag, the file size, the chunk size and the chunk digests in order
  (a two-level tree, so the whole file is hashed once and a mismatch is located to one chunk).
* **Side files** (tokenizer, templates, configs): `manifest["side_files"][name] = {"blake3", "bytes"}`.
* **Graphs**: sha256 per graph file (`manifest["graphs"][name]["sha256"]`, as before).
* **Verified record**: hashing gigabytes at every start would cost seconds, so after a successful check a small
  record is written to the user cache (`$QVL_CACHE`, else `$XDG_CACHE_HOME/qvl-compile`, else
  `~/.cache/qvl-compile`), keyed by the store's absolute path and holding (st_dev, st_ino, st_size,
  st_mtime_ns, st_ctime_ns) and the manifest's whole-file digest. A later load with all of these equal skips
  the re-hash; any write to the file changes its mtime/ctime and the next load hashes it again. An
  unwritable cache only means verifying every time.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

from qvl.errors import QvlError

ALGORITHM = "blake3"
CHUNK_BYTES = 64 << 20
_ROOT_TAG = b"qvl-weights-v1\0"
RECORD_VERSION = 1
# Counts whole weight-store hashes in this process (tests use it to see that a warm start did not re-hash).
STATS = {"weight_store_hashes": 0}


def _blake3(data=b""):
    import blake3

    return blake3.blake3(data, max_threads=blake3.blake3.AUTO)


# -- digests ---------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """blake3 of a whole (small) file."""
    h = _blake3()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def root_digest(size: int, chunk_bytes: int, chunks: list[str]) -> str:
    h = _blake3(_ROOT_TAG + f"{size}:{chunk_bytes}:".encode())
    for c in chunks:
        h.update(bytes.fromhex(c))
    return h.hexdigest()


def _iter_chunks(path: Path, chunk_bytes: int):
    """(index, offset, blake3 hex) of every chunk, from a read-only memory map (no copy into Python memory)."""
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for k, off in enumerate(range(0, size, chunk_bytes)):
                    yield k, off, _blake3(view[off:off + chunk_bytes]).hexdigest()
            finally:
                view.release()


def weights_digests(path: Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """The digest fields of `manifest["weights"]` for the store at `path`."""
    size = Path(path).stat().st_size
    chunks = [d for _, _, d in _iter_chunks(path, chunk_bytes)]
    STATS["weight_store_hashes"] += 1
    return {"bytes": size, "algorithm": ALGORITHM, "chunk_bytes": chunk_bytes, "chunks": chunks,
            "digest": root_digest(size, chunk_bytes, chunks)}


# -- verified record (user cache) -------------------------------------------------------------------------


def cache_dir() -> Path:
    if os.environ.get("QVL_CACHE"):
        return Path(os.environ["QVL_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "qvl-compile"
    return Path.home() / ".cache" / "qvl-compile"


def _record_path(store: Path) -> Path:
    return cache_dir() / "verified" / (_blake3(str(store).encode()).hexdigest()[:32] + ".json")


def _identity(store: Path, st: os.stat_result, digest: str) -> dict:
    return {"version": RECORD_VERSION, "path": str(store), "st_dev": st.st_dev, "st_ino": st.st_ino,
            "st_size": st.st_size, "st_mtime_ns": st.st_mtime_ns, "st_ctime_ns": st.st_ctime_ns, "digest": digest}


def has_record(store: Path, digest: str) -> bool:
    """A verified record for exactly this file (path, inode, size, times) and this manifest digest."""
    store = Path(store).resolve()
    try:
        rec = json.loads(_record_path(store).read_text("utf-8"))
        want = _identity(store, store.stat(), digest)
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and all(rec.get(k) == v for k, v in want.items())


def write_record(store: Path, st: os.stat_result, digest: str) -> bool:
    """Atomically record that `store` (as `st` describes it) matched `digest`; False if the cache is unwritable."""
    store = Path(store).resolve()
    path = _record_path(store)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".rec-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**_identity(store, st, digest), "verified_at": time.time()}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True


def verify_weights(store: Path, section: dict, use_record: bool = True) -> str:
    """Check the store against `manifest["weights"]`: 'cached' (a verified record matches) or 'verified'
    (every chunk hashed and equal; the record is refreshed). A mismatch is a QvlError naming the chunk."""
    store = Path(store)
    before = store.stat()
    if before.st_size != section["bytes"]:
        raise QvlError(f"artifact weight store {store.name} has {before.st_size} bytes, manifest says {section['bytes']}",
                       hint="the artifact is truncated or modified: re-export or copy it again")
    if use_record and has_record(store, section["digest"]):
        return "cached"
    want = section["chunks"]
    STATS["weight_store_hashes"] += 1
    for k, off, got in _iter_chunks(store, section["chunk_bytes"]):
        if k >= len(want) or got != want[k]:
            raise QvlError(f"artifact weight store {store.name} does not match its manifest digest "
                           f"(chunk {k} at offset {off}: corrupt or modified)",
                           hint="re-export the artifact or copy it again from a good source")
    after = store.stat()
    if (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (before.st_mtime_ns, before.st_ctime_ns, before.st_size):
        write_record(store, after, section["digest"])
    return "verified"


def verify_sha256(path: Path, sha256: str, what: str) -> str:
    """A large file recorded by sha256 (a TensorRT engine): 'cached' when its verified record matches, else hashed."""
    import hashlib

    path = Path(path)
    if has_record(path, sha256):
        return "cached"
    before = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise QvlError(f"{what} {path.name} does not match its recorded sha256 (corrupt or modified)",
                       hint="rebuild it with `qvl-compile build-engine`")
    if path.stat().st_mtime_ns == before.st_mtime_ns:
        write_record(path, before, sha256)
    return "verified"


# -- paths -------------------------------------------------------------------------------------------------


def contained(root: Path, rel, what: str) -> Path:
    """`root / rel` for a manifest path that stays inside the artifact directory `root` (else a QvlError)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise QvlError(f"corrupt manifest: {what} is not a file name ({rel!r})")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise QvlError(f"artifact manifest {what} {rel!r} is an absolute path: every file must be inside the artifact directory",
                       hint="the manifest was edited or is not from qvl-compile; re-export the artifact")
    if ".." in PurePosixPath(rel).parts or ".." in PureWindowsPath(rel).parts:
        raise QvlError(f"artifact manifest {what} {rel!r} leaves the artifact directory ('..')",
                       hint="the manifest was edited or is not from qvl-compile; re-export the artifact")
    path = Path(root) / rel
    try:
        inside = path.resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        raise QvlError(f"artifact {what} {rel!r} cannot be resolved: {exc}") from None
    if not inside:
        raise QvlError(f"artifact {what} {rel!r} resolves outside the artifact directory (a symlink?)",
                       hint="copy the file into the artifact instead of linking to it")
    return path


# -- whole-artifact check (`qvl-compile verify`) -------------------------------------------------------------


def verify_artifact(artifact: Path) -> dict:
    """Full check regardless of any record: schema, paths, every graph, side file and weight chunk. Returns a
    summary (files, bytes, seconds, digest); any problem is a QvlError. Refreshes the verified record."""
    from qvl.artifacts.manifest import read_manifest

    t0 = time.perf_counter()
    summary: dict = {}
    manifest = read_manifest(artifact, weights="full", summary=summary)
    summary["seconds"] = time.perf_counter() - t0
    summary["digest"] = manifest.weights.digest
    summary["chunks"] = len(manifest.weights.chunks)
    return summary
