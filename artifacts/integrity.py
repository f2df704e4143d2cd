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
* **Weight objects** (format 2, `artifacts/content_store.py`): one file per distinct tensor payload,
  `weights/<blake3 hex>`, the name being the blake3 of the whole file; `manifest["weights"]` lists
  `objects` {hex: bytes} and `digest`, the set's digest (`objects_digest`). Their verified records are per
  inode, not per path -- `verified/objects/<hex[:2]>/<hex>.<st_dev>.<st_ino>.<size>.<mtime_ns>.<ctime_ns>`,
  empty files -- so every artifact hard-linking one cached payload shares one record, and a warm start costs a
  stat of the payload and one of its record. Making a hard link changes the inode's ctime: the writer that
  links refreshes the record afterwards (`write_object_record`), and any other change makes the next load
  hash that payload (only that one) again.
"""

from __future__ import annotations

import contextlib
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
STATS = {"weight_store_hashes": 0, "weight_objects_hashed": 0}
# Hashing a store chunk by chunk drops each chunk's pages from the process once hashed (they stay in the page
# cache): otherwise every page of the mapped store counts in the RSS until the map closes. None: no madvise here.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None) if hasattr(mmap.mmap, "madvise") else None


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
                    # each slice released before the next: the map cannot close while a view of it is exported
                    # (seen on Python 3.12 with blake3's threaded hasher: "cannot close exported pointers exist")
                    with view[off:off + chunk_bytes] as chunk:
                        hasher = _blake3()
                        hasher.update(chunk)
                        digest = hasher.hexdigest()
                        del hasher
                    if _DONTNEED is not None:  # unmap the chunk's pages: a mapped 8.5 GB store counts in our RSS
                        m.madvise(_DONTNEED, off, min(chunk_bytes, size - off))
                    yield k, off, digest
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


# -- weight objects (format 2) ------------------------------------------------------------------------------

OBJECTS_LAYOUT = "objects"
OBJECTS_DIR = "weights"
_SET_TAG = b"qvl-weight-objects-v1\0"


def hash_file(path: Path) -> str:
    """blake3 of a whole file of any size, from a read-only memory map (multi-threaded, no copy into Python)."""
    h = _blake3()
    with Path(path).open("rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    h.update(view)
                finally:
                    view.release()
    return h.hexdigest()


def hash_bytes(data) -> str:
    return _blake3(data).hexdigest()


def objects_digest(objects: dict) -> str:
    """The digest of a set of weight objects {hex: bytes} (order-independent)."""
    h = _blake3(_SET_TAG)
    for name in sorted(objects):
        h.update(f"{name}:{objects[name]}\n".encode())
    return h.hexdigest()


def object_file(name: str) -> str:
    """The artifact-relative path of the weight object `name` (its blake3 hex)."""
    return f"{OBJECTS_DIR}/{name}"


def objects_section(out_dir: Path) -> dict:
    """`manifest["weights"]` of a format-2 artifact: every file in `out_dir/weights` (each named by the blake3 of
    its bytes: the writers put only verified payloads there), its size, the total and the set's digest."""
    import re

    objects = {}
    for e in sorted(os.scandir(Path(out_dir) / OBJECTS_DIR), key=lambda e: e.name):
        if not re.fullmatch(r"[0-9a-f]{64}", e.name) or not e.is_file(follow_symlinks=False):
            raise QvlError(f"{OBJECTS_DIR}/{e.name} is not a weight object (a blake3-named regular file)")
        objects[e.name] = e.stat(follow_symlinks=False).st_size
    return {"layout": OBJECTS_LAYOUT, "dir": OBJECTS_DIR, "algorithm": ALGORITHM, "bytes": sum(objects.values()),
            "objects": objects, "digest": objects_digest(objects)}


def _object_record_dir(name: str) -> Path:
    return cache_dir() / "verified" / "objects" / name[:2]


def _object_record_name(name: str, st: os.stat_result) -> str:
    return f"{name}.{st.st_dev}.{st.st_ino}.{st.st_size}.{st.st_mtime_ns}.{st.st_ctime_ns}"


def has_object_record(name: str, st: os.stat_result) -> bool:
    """A verified record for exactly this inode (device, inode, size, times) holding the payload `name`."""
    return (_object_record_dir(name) / _object_record_name(name, st)).is_file()


def write_object_record(name: str, st: os.stat_result) -> bool:
    """Record that the inode `st` describes holds the payload `name` (replacing that inode's older records);
    False if the cache is unwritable."""
    d = _object_record_dir(name)
    rec = _object_record_name(name, st)
    stale = f"{name}.{st.st_dev}.{st.st_ino}."
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.close(os.open(d / rec, os.O_WRONLY | os.O_CREAT, 0o644))  # empty: complete as soon as it exists
        for e in os.scandir(d):
            if e.name.startswith(stale) and e.name != rec:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
    except OSError:
        return False
    return True


def forget_object_records(name: str, st: os.stat_result | None = None) -> None:
    """Drop the records of payload `name` (of one inode if `st` is given), e.g. when the cache deletes it."""
    d = _object_record_dir(name)
    prefix = f"{name}.{st.st_dev}.{st.st_ino}." if st is not None else f"{name}."
    with contextlib.suppress(OSError):
        for e in os.scandir(d):
            if e.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def verify_object(path: Path, name: str, size: int, use_record: bool = True) -> str:
    """One weight object against its name (blake3 hex) and size: 'cached' or 'verified' (then recorded)."""
    path = Path(path)
    shown = f"{path.parent.name}/{name[:16]}"
    try:
        before = path.stat()
    except FileNotFoundError:
        raise QvlError(f"artifact weight object missing: {shown}",
                       hint="the artifact is incomplete: copy it again, or re-compile it") from None
    if before.st_size != size:
        raise QvlError(f"artifact weight object {shown} has {before.st_size} bytes, manifest says {size}",
                       hint="it is truncated or modified: re-compile the artifact (it may be shared through the weight cache: "
                            "`qvl-compile cache verify`)")
    if use_record and has_object_record(name, before):
        return "cached"
    STATS["weight_objects_hashed"] += 1
    if hash_file(path) != name:
        raise QvlError(f"artifact weight object {shown} does not match its blake3 digest (corrupt or modified)",
                       hint="re-compile the artifact or copy it again from a good source (a payload shared through the "
                            "weight cache is damaged for every artifact using it: `qvl-compile cache verify`)")
    after = path.stat()
    if (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (before.st_mtime_ns, before.st_ctime_ns, before.st_size):
        write_object_record(name, after)
    return "verified"


def verify_objects(artifact: Path, section: dict, use_record: bool = True) -> str:
    """Every weight object of a format-2 artifact: 'cached' (every payload's record matched) or 'verified'."""
    states = {verify_object(Path(artifact) / section["dir"] / name, name, size, use_record)
              for name, size in section["objects"].items()}
    if "verified" in states:
        STATS["weight_store_hashes"] += 1
        return "verified"
    return "cached"


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
    summary["objects"] = len(manifest.weights.objects)
    summary["format_version"] = manifest.format_version
    return summary
