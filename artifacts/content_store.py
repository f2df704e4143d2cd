"""The content-addressed weight cache: tensor payloads stored once by blake3 digest, shared through hard links.

Layout of a cache (default `integrity.cache_dir() / "weights"`: `$QVL_CACHE`, `$XDG_CACHE_HOME/qvl-compile` or
`~/.cache/qvl-compile`; `--cache-dir` elsewhere):

    qvl-weight-cache.json          marker (format, version): gc never touches a directory without it
    objects/<hex[:2]>/<hex>        one file per distinct tensor payload, named by the blake3 of its bytes, written
                                   once (temp file + fsync + link), never modified
    artifacts/<key>.json           registry: one file per artifact that went through the cache (path, objects)
    tmp/                           payloads being written (removed by `gc`: it holds the lock no writer holds)
    lock                           flock: writers shared, `gc` exclusive

A cached artifact is **format 2** (`manifest_checks.FORMAT_VERSION_OBJECTS`): its weights are `weights/<hex>`, one
file per payload, each a *hard link* to the cache's object, and every graph references them through standard ONNX
external data (`location: weights/<hex>`, offset 0), so ONNX Runtime, onnx-ir and TensorRT's parser read it as
they read `weights.bin` -- inside the model directory, no absolute path, no `..`, no symlink. Consequences:

* sharing is per tensor: two artifacts from one checkpoint share every byte-identical tensor (the fp32 export
  and the fp32 sm61 kit nearly all; int4 and int8 the fp32 leftovers), and `du` counts a shared payload once;
* the artifact directory is self-contained by construction: `cp -r` / `rsync` / `tar` of it copies the bytes;
  `qvl-compile pack` writes the format-1 equivalent (one `weights.bin`, no links) for older readers;
* deleting a cache object can never break an artifact (its link keeps the bytes); `gc` deletes only objects that
  no registered, still-existing artifact lists and that nothing else links (link count 1), so it frees exactly
  the payloads nobody uses and keeps sharing for artifacts that were moved;
* a payload modified in place is modified for every artifact linking it: every reader checks each object's
  blake3 (per-inode verified records, `integrity.verify_object`, make warm starts a stat per payload), so
  the damage is found, and the next compile through the cache replaces the damaged object;
* on another file system than the artifact, hard links are impossible: the artifact is then left
  self-contained (format 1) with a note, rather than doubling the bytes.

Every tool writes format 1 (`weights.bin`) as before; `intern(artifact, cache)` converts a finished artifact into
format 2 through the cache (the CLI's `--cache`, `qvl-compile cache add`), in a staging copy published by
rename (`fsutil.atomic_output_dir`), so a crash leaves the old artifact or the new one, never a mix. `pack` is
the reverse. Per-tensor files are also what the runtime's later residency work wants: each payload can be
memory-mapped, prefetched or evicted on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qvl.artifacts import integrity
from qvl.artifacts import manifest as mf
from qvl.artifacts.integrity import OBJECTS_DIR, OBJECTS_LAYOUT, object_file
from qvl.artifacts.schema import SIDE_FILES, WEIGHTS, Manifest
from qvl.errors import QvlError

CACHE_FORMAT = "qvl-weight-cache"
CACHE_VERSION = 1
MARKER = "qvl-weight-cache.json"
REGISTRY_FORMAT = "qvl-weight-cache-artifact"


def default_root() -> Path:
    return integrity.cache_dir() / "weights"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# -- the cache --------------------------------------------------------------------------------------------------


class WeightCache:
    """One cache directory (see the module docstring). `open(root, create=...)` checks the marker."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.registry = self.root / "artifacts"

    @classmethod
    def open(cls, root: Path | None = None, create: bool = False) -> "WeightCache":
        root = Path(root) if root is not None else default_root()
        cache = cls(root)
        marker = cache.root / MARKER
        if marker.is_file():
            try:
                data = json.loads(marker.read_text("utf-8"))
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
                raise QvlError(f"{cache.root} has a corrupt or unsupported {MARKER}",
                               hint="point --cache-dir at another directory")
        elif not create:
            raise QvlError(f"no weight cache at {cache.root}",
                           hint="compile with --cache (or --cache-dir DIR) to create one")
        else:
            ours = {"objects", "tmp", "artifacts", "lock", MARKER}  # a concurrent first writer is creating it
            if cache.root.exists() and (not cache.root.is_dir() or any(
                    e.name not in ours and not e.name.startswith(".tmp-") for e in cache.root.iterdir())):
                raise QvlError(f"{cache.root} is not empty and not a qvl-compile weight cache",
                               hint="choose an empty or new directory for --cache-dir")
            try:
                for d in (cache.objects, cache.tmp, cache.registry):
                    d.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(marker, json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION}) + "\n")
            except OSError as exc:
                raise QvlError(f"cannot create the weight cache {cache.root}: {exc.strerror}",
                               hint="choose a writable --cache-dir") from None
        return cache

    # -- locking: writers share, gc excludes -----------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False):
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- objects ------------------------------------------------------------------------------------------------

    def object_path(self, name: str) -> Path:
        return self.objects / name[:2] / name

    def iter_objects(self):
        """(name, lstat) of every object file."""
        try:
            shards = sorted(os.scandir(self.objects), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            for e in sorted(os.scandir(shard.path), key=lambda e: e.name):
                if len(e.name) == 64 and e.is_file(follow_symlinks=False):
                    yield e.name, e.stat(follow_symlinks=False)

    def _good(self, name: str, path: Path, size: int) -> bool:
        """The existing object at `path` is a regular file of `size` bytes holding payload `name`."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        if integrity.has_object_record(name, st):
            return True
        if integrity.hash_file(path) != name:
            return False
        integrity.write_object_record(name, path.stat())
        return True

    def ensure(self, name: str, data=None, src: Path | None = None) -> tuple[Path, bool]:
        """Make object `name` present and verified: (its path, whether it was written now). The payload comes from
        `data` (bytes / memoryview, already hashed to `name`) or is hard-linked from the verified file `src`
        (same file system). Written once: a temp file, fsynced, then linked to its name (never replaced
        when it exists -- a concurrent writer of the same payload wins, and its object is as good); an existing
        object that fails its check (truncated, flipped) is replaced, so a re-compile repairs the cache."""
        from qvl.toolchain.fsutil import fault_point
        from qvl.toolchain.staging import owner_tag

        size = len(data) if data is not None else src.stat().st_size
        final = self.object_path(name)
        for _ in range(8):
            if final.exists() or final.is_symlink():
                if self._good(name, final, size):
                    return final, False
                replace = True
            else:
                replace = False
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp / f"{name[:16]}.{owner_tag()}"
            if src is not None and not replace:
                os.link(src, tmp)
            else:
                with open(tmp, "wb") as f:
                    if data is not None:
                        f.write(data)
                    else:
                        with open(src, "rb") as s:
                            shutil.copyfileobj(s, f, 1 << 22)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
            fault_point("cache:object")  # a payload is complete in tmp/, not yet named
            try:
                if replace:
                    os.replace(tmp, final)
                else:
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        continue  # a concurrent writer named it first: check theirs
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(final.parent)
            return final, True
        raise QvlError(f"weight cache {self.root}: object {name[:16]} keeps failing its check while being written",
                       hint="another process is modifying the cache: stop it, then `qvl-compile cache verify`")

    # -- registry ----------------------------------------------------------------------------------------------

    def _registry_file(self, artifact: Path) -> Path:
        return self.registry / (integrity.hash_bytes(str(Path(artifact).absolute()).encode())[:32] + ".json")

    def register(self, artifact: Path, manifest: Manifest) -> None:
        self.registry.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self._registry_file(artifact), json.dumps({
            "format": REGISTRY_FORMAT, "path": str(Path(artifact).absolute()), "target": manifest.target,
            "digest": manifest.weights.digest, "bytes": manifest.weights.bytes,
            "objects": sorted(needed_objects(manifest.to_json())), "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }) + "\n")

    def registered(self) -> list[tuple[Path, dict]]:
        out = []
        try:
            entries = sorted(os.scandir(self.registry), key=lambda e: e.name)
        except FileNotFoundError:
            return out
        for e in entries:
            if not e.name.endswith(".json"):
                continue
            try:
                rec = json.loads(Path(e.path).read_text("utf-8"))
            except (OSError, ValueError):
                rec = None
            if isinstance(rec, dict) and rec.get("format") == REGISTRY_FORMAT and isinstance(rec.get("path"), str):
                out.append((Path(e.path), rec))
        return out


def same_file_system(cache: WeightCache, artifact: Path) -> bool:
    probe = Path(artifact).absolute()
    while not probe.exists():
        probe = probe.parent
    return os.stat(cache.root).st_dev == os.stat(probe).st_dev


# -- reading and re-pointing an artifact's weight references -----------------------------------------------------


def _onnx():
    """The `onnx` package (graph protos are re-pointed without loading their weights), or a one-line error."""
    try:
        import onnx
    except ImportError:
        raise QvlError("moving an artifact into or out of the weight cache needs the `onnx` package",
                       hint="install the toolchain: pip install 'qvl-compile[export]'") from None
    return onnx


def _walk_tensors(model):
    """Every TensorProto of an onnx ModelProto: initializers, sparse ones, node attributes, subgraphs, functions."""
    def graph(g):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from nodes(g.node)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                for s in a.sparse_tensors:
                    yield s.values
                    yield s.indices
                if a.HasField("g"):
                    yield from graph(a.g)
                for sub in a.graphs:
                    yield from graph(sub)

    yield from graph(model.graph)
    for fn in model.functions:
        yield from nodes(fn.node)


class _Payloads:
    """Read-only memory maps of an artifact's weight files, sliced by (location, offset, length)."""

    def __init__(self, artifact: Path, allowed: dict[str, int]):
        self.artifact = Path(artifact)
        self.allowed = allowed
        self._maps: dict[str, tuple] = {}

    def size(self, location: str) -> int:
        return self.allowed[location]

    def view(self, location: str, offset: int, length: int) -> memoryview:
        if location not in self.allowed:
            raise QvlError(f"artifact {self.artifact} references weights in {location!r}, not one of its weight files")
        if offset < 0 or length < 0 or offset + length > self.allowed[location]:
            raise QvlError(f"artifact {self.artifact}: a weight reference reaches past the end of {location}")
        if location not in self._maps:
            f = open(self.artifact / location, "rb")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.allowed[location] else None
            self._maps[location] = (f, m, memoryview(m) if m is not None else memoryview(b""))
        return self._maps[location][2][offset:offset + length]

    def close(self) -> None:
        for f, m, v in self._maps.values():
            v.release()
            if m is not None:
                m.close()
            f.close()
        self._maps.clear()


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _external_info(t) -> dict:
    return {e.key: e.value for e in t.external_data}


def _external_refs(model, size_of):
    """(tensor, location, offset, length) of every external-data tensor of `model`; a reference without a length
    runs to the end of its file (`size_of(location)`)."""
    onnx = _onnx()
    for t in _walk_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        loc = info.get("location")
        off = int(info.get("offset", 0))
        yield t, loc, off, (int(info["length"]) if "length" in info else size_of(loc) - off)


def _ranges(m: Manifest, payloads: _Payloads) -> list[tuple[str, int, int]]:
    """Every distinct (location, offset, length) the artifact's graphs and embedding read, in first-use order."""
    onnx = _onnx()

    order: dict[tuple, None] = {}
    entries = [("graphs", n, g) for n, g in m.graphs.items()]
    if m.ort_optimized is not None:
        entries += [("ort_optimized", n, g) for n, g in m.ort_optimized.graphs.items()]
    for _, _, g in entries:
        model = onnx.load(str(m.path(g.file)), load_external_data=False)
        for _, loc, off, ln in _external_refs(model, payloads.size):
            order[(loc, off, ln)] = None
    for loc, off, ln in _embedding_refs(m):
        order[(loc, off, ln)] = None
    return list(order)


def _embedding_parts(emb: dict) -> list[dict]:
    if emb.get("format") == "matmulnbits":
        return [emb[k] for k in ("packed", "scales", "zero_points") if emb.get(k) is not None]
    return [emb]


def _embedding_refs(m: Manifest):
    emb = m.embedding.to_json()
    default = emb.get("file") or m.weights.file
    for part in _embedding_parts(emb):
        n = _itemsize(part["dtype"])
        for d in part["shape"]:
            n *= int(d)
        yield part.get("file") or default, int(part["offset"]), n


def _relocate(m: Manifest, staging: Path, placed: dict, objects: bool) -> dict:
    """Save the artifact's graphs into `staging` with every weight reference moved to `placed[(loc, off, len)]`
    = (new location, new offset); the manifest fields that change (graph hashes, the embedding's references)."""
    onnx = _onnx()

    payload_size: dict[str, int] = {}

    def file_size(loc: str) -> int:
        if loc not in payload_size:
            payload_size[loc] = (m.artifact_dir / loc).stat().st_size
        return payload_size[loc]

    fields: dict = {}
    graphs = {n: g.to_json() for n, g in m.graphs.items()}
    optimized = m.ort_optimized.to_json() if m.ort_optimized is not None else None
    for section, table in (("graphs", graphs), ("ort_optimized", (optimized or {}).get("graphs", {}))):
        for name, entry in table.items():
            model = onnx.load(str(m.path(entry["file"])), load_external_data=False)
            for t, loc, off, ln in _external_refs(model, file_size):
                new_loc, new_off = placed[(loc, off, ln)]
                kept = [(e.key, e.value) for e in t.external_data if e.key not in ("location", "offset", "length")]
                del t.external_data[:]
                for k, v in (("location", new_loc), ("offset", str(new_off)), ("length", str(ln)), *kept):
                    t.external_data.add(key=k, value=v)
            path = staging / entry["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(path))
            entry["sha256"] = mf.sha256_file(path)
    fields["graphs"] = graphs
    if optimized is not None:
        fields["ort_optimized"] = optimized
    emb = m.embedding.to_json()
    quantized = emb.get("format") == "matmulnbits"
    for (loc, off, ln), part in zip(_embedding_refs(m), _embedding_parts(emb)):
        new_loc, new_off = placed[(loc, off, ln)]
        part["offset"] = new_off
        if objects or not quantized:
            part["file"] = new_loc
        else:
            part.pop("file", None)  # format 1: the parts read the entry's file, the store
    if quantized:
        if objects:
            emb.pop("file", None)  # format 2: each part names its object
        else:
            emb["file"] = WEIGHTS
    fields["embedding"] = emb
    return fields


def _carry_extras(m: Manifest, staging: Path) -> None:
    """Hard-link (else copy) every file the artifact holds beyond its manifest, graphs, weights and side files
    (engines/ of a kit, dump/ of `compile --dump-after`) into `staging`."""
    skip = {mf.MANIFEST, *SIDE_FILES, *m.weights.files}
    skip |= {g.file for g in m.graphs.values()}
    if m.ort_optimized is not None:
        skip |= {g.file for g in m.ort_optimized.graphs.values()}
    root = m.artifact_dir
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path(OBJECTS_DIR) and m.weights.is_objects:
            dirnames[:] = []
            continue
        for fn in filenames:
            rel = (rel_dir / fn).as_posix()
            if rel in skip or (rel_dir == Path(".") and fn.startswith(".")):
                continue
            src, dst = root / rel, staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


# -- intern: an artifact into the cache ---------------------------------------------------------------------------


@dataclass
class InternReport:
    artifact: Path
    cache: Path
    objects: int = 0
    bytes: int = 0
    new_objects: int = 0
    new_bytes: int = 0
    seconds: float = 0.0
    converted: bool = False  # format 1 -> 2
    note: str | None = None  # set when the artifact was left as it was (and why)

    @property
    def shared_bytes(self) -> int:
        return self.bytes - self.new_bytes

    def summary(self) -> str:
        if self.note:
            return f"weight cache: {self.note}"
        return (f"weight cache {self.cache}: {self.objects} payloads, {_mb(self.bytes)}: {_mb(self.new_bytes)} new "
                f"({self.new_objects} payloads), {_mb(self.shared_bytes)} already cached and shared "
                f"(hard links; `qvl-compile pack` makes a standalone copy)")

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "cache": str(self.cache), "objects": self.objects, "bytes": self.bytes,
                "new_objects": self.new_objects, "new_bytes": self.new_bytes, "shared_bytes": self.shared_bytes,
                "converted": self.converted, "seconds": round(self.seconds, 2), "note": self.note}


def intern(artifact: Path, cache: WeightCache, step=None) -> InternReport:
    """Put `artifact`'s weights into `cache` and make it reference them (format 2, hard links), then register it.
    A format-1 artifact is rewritten through a staging copy (published by rename); a format-2 one has each
    payload swapped for a link to the cache's identical, verified object in place. Verifies the artifact first."""
    say = step or (lambda msg: None)
    t0 = time.perf_counter()
    artifact = Path(artifact).absolute()
    report = InternReport(artifact, cache.root)
    say("verifying the artifact")
    m = mf.read_manifest(artifact)
    if not same_file_system(cache, artifact):
        report.note = (f"{cache.root} is on another file system than {artifact}: hard links are impossible, so the "
                       f"artifact stays self-contained (format {m.format_version}) and shares nothing; "
                       f"use --cache-dir on the artifact's file system")
        return report
    with cache.lock():
        if m.weights.is_objects:
            _relink(m, cache, report, say)
        else:
            _convert(m, cache, report, say)
        cache.register(artifact, mf.read_manifest(artifact, verify_graphs=False))
    report.seconds = time.perf_counter() - t0
    return report


def _convert(m: Manifest, cache: WeightCache, report: InternReport, say) -> None:
    from qvl.toolchain.fsutil import atomic_output_dir, check_space

    artifact = m.artifact_dir
    payloads = _Payloads(artifact, dict(m.weights.files))
    try:
        say("hashing tensor payloads")
        ranges = _ranges(m, payloads)
        digests = {r: integrity.hash_bytes(payloads.view(*r)) for r in ranges}
        sizes = {d: r[2] for r, d in digests.items()}
        missing = sum(n for d, n in sizes.items() if not cache.object_path(d).exists())
        with atomic_output_dir(artifact, overwrite=True) as staging:
            check_space([(staging, missing + (16 << 20))])
            (staging / OBJECTS_DIR).mkdir()
            say("writing payloads into the weight cache")
            done: set[str] = set()
            for r, name in digests.items():
                if name in done:
                    continue
                path, new = cache.ensure(name, data=payloads.view(*r))
                os.link(path, staging / object_file(name))
                done.add(name)
                report.new_objects += new
                report.new_bytes += sizes[name] if new else 0
            placed = {r: (object_file(name), 0) for r, name in digests.items()}
            for side, rec in m.side_files.items():  # tokenizer, templates: identical across a checkpoint's artifacts
                path, new = cache.ensure(rec.blake3, data=(artifact / side).read_bytes())
                os.link(path, staging / side)
            say("re-pointing the graphs at the cached payloads")
            fields = m.derive()
            fields.update(_relocate(m, staging, placed, objects=True))
            fields["weights"] = {"layout": OBJECTS_LAYOUT}
            if m.created:
                fields["created"] = m.created
            _carry_extras(m, staging)
            mf.write_manifest(staging, fields)
    finally:
        payloads.close()
    report.converted = True
    report.objects, report.bytes = len(sizes), sum(sizes.values())
    _record_objects(artifact)


def _relink(m: Manifest, cache: WeightCache, report: InternReport, say) -> None:
    """A format-2 artifact: link each payload into the cache, or swap it for the cache's verified object."""
    from qvl.toolchain.fsutil import output_lock
    from qvl.toolchain.staging import owner_tag

    artifact = m.artifact_dir
    say("linking payloads into the weight cache")
    with output_lock(artifact):
        for name, size in m.weights.objects.items():
            mine = artifact / object_file(name)
            report.objects += 1
            report.bytes += size
            target = cache.object_path(name)
            try:
                if os.path.samefile(mine, target):
                    continue
            except FileNotFoundError:
                pass
            path, new = cache.ensure(name, src=mine)
            if new:
                report.new_objects += 1
                report.new_bytes += size
            if not os.path.samefile(mine, path):
                tmp = mine.parent / f".{name[:16]}.{owner_tag()}"
                os.link(path, tmp)
                os.replace(tmp, mine)  # the same verified bytes, now the cache's inode
        for side, rec in m.side_files.items():
            mine, cached = artifact / side, cache.object_path(rec.blake3)
            if cached.exists() and os.path.samefile(mine, cached):
                continue
            path, _ = cache.ensure(rec.blake3, data=mine.read_bytes())
            tmp = artifact / f".{side}.{owner_tag()}"
            os.link(path, tmp)
            os.replace(tmp, mine)
    _record_objects(artifact)


def _record_objects(artifact: Path) -> None:
    """After publishing: record every payload's inode as verified (linking and publishing changed its ctime)."""
    m = mf.read_manifest(artifact, verify_graphs=False)
    for name in m.weights.objects:
        with contextlib.suppress(OSError):
            integrity.write_object_record(name, (artifact / object_file(name)).stat())


# -- pack: a standalone format-1 copy ----------------------------------------------------------------------------------


@dataclass
class PackReport:
    artifact: Path
    out: Path
    bytes: int
    files: int
    seconds: float
    dropped: list = field(default_factory=list)

    def summary(self) -> str:
        dropped = f"; not copied: {', '.join(self.dropped)}" if self.dropped else ""
        return (f"packed {self.artifact} -> {self.out}: self-contained format-1 artifact, {self.files} files, "
                f"{_mb(self.bytes)} of weights in one weights.bin, in {self.seconds:.1f} s{dropped}")


def pack(artifact: Path, out: Path, overwrite: bool = False, step=None) -> PackReport:
    """Write `out`: `artifact` (format 1 or 2, verified first) as a format-1 artifact -- one page-aligned
    `weights.bin`, real copies of every file, nothing linked to a cache -- for copying to another machine."""
    from qvl.artifacts.weight_store import WeightStoreWriter
    from qvl.toolchain.fsutil import atomic_output_dir, check_space

    say = step or (lambda msg: None)
    t0 = time.perf_counter()
    artifact = Path(artifact).absolute()
    say("verifying the artifact")
    m = mf.read_manifest(artifact)
    listed = {mf.MANIFEST, *m.side_files, *m.weights.files, *(g.file for g in m.graphs.values()),
              *((g.file for g in m.ort_optimized.graphs.values()) if m.ort_optimized is not None else ())}
    dropped = sorted({Path(p).relative_to(artifact).parts[0] for p in artifact.rglob("*")
                      if p.is_file() and Path(p).relative_to(artifact).as_posix() not in listed
                      and not Path(p).relative_to(artifact).parts[0].startswith(".")})
    payloads = _Payloads(artifact, dict(m.weights.files))
    try:
        with atomic_output_dir(Path(out), overwrite=overwrite, sources=(artifact,)) as staging:
            check_space([(staging, m.weights.bytes + (64 << 20))])
            say("copying weights into weights.bin")
            ranges = _ranges(m, payloads)
            placed = {}
            with WeightStoreWriter(staging / WEIGHTS) as store:
                for r in ranges:
                    placed[r] = (WEIGHTS, store.add(payloads.view(*r)).offset)
            fields = m.derive()
            fields.update(_relocate(m, staging, placed, objects=False))
            fields["weights"] = {"file": WEIGHTS}
            if m.created:
                fields["created"] = m.created
            mf.copy_side_files(artifact, staging)
            written = mf.write_manifest(staging, fields)
            files = 1 + len(written.graphs) + len(written.side_files) + 1 + (
                len(written.ort_optimized.graphs) if written.ort_optimized is not None else 0)
            nbytes = written.weights.bytes
    finally:
        payloads.close()
    return PackReport(artifact, Path(out).absolute(), nbytes, files, time.perf_counter() - t0, dropped)


# -- ls / verify / gc -------------------------------------------------------------------------------------------------


def needed_objects(raw: dict) -> set[str]:
    """The cache objects a format-2 manifest (parsed JSON) needs: its weight payloads and its side files."""
    return set(raw["weights"]["objects"]) | {s["blake3"] for s in (raw.get("side_files") or {}).values()}


def _needs(cache: WeightCache) -> tuple[list[dict], dict[str, list[str]]]:
    """Registered artifacts (with their state and the objects they need) and object -> artifact paths."""
    arts, used_by = [], {}
    for reg_file, rec in cache.registered():
        path = Path(rec["path"])
        state, objects, target = "ok", set(rec.get("objects") or []), rec.get("target")
        if not path.is_dir():
            state, objects = "missing", set()
        else:
            try:
                raw = json.loads((path / mf.MANIFEST).read_text("utf-8"))
                w = raw["weights"]
                if w.get("layout") == OBJECTS_LAYOUT:
                    objects = needed_objects(raw)
                    target = raw.get("target", target)
                else:
                    state, objects = "not cached", set()  # replaced by a self-contained artifact
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                state = "unreadable"  # keep what the registry says it needs
        arts.append({"path": str(path), "registry": reg_file, "state": state, "target": target, "objects": objects})
        for name in objects:
            used_by.setdefault(name, []).append(str(path))
    return arts, used_by


def listing(cache: WeightCache) -> dict:
    """Everything `cache ls` shows: objects (bytes, disk bytes, links, users), artifacts, totals."""
    objects = {name: {"bytes": st.st_size, "disk_bytes": st.st_blocks * 512, "links": st.st_nlink}
               for name, st in cache.iter_objects()}
    arts, used_by = _needs(cache)
    for name, o in objects.items():
        o["artifacts"] = used_by.get(name, [])
    artifacts = []
    for a in arts:
        names = a["objects"]
        present = [n for n in names if n in objects]
        unique = [n for n in present if len(used_by.get(n, [])) == 1]
        artifacts.append({
            "path": a["path"], "state": a["state"], "target": a["target"], "objects": len(names),
            "bytes": sum(objects[n]["bytes"] for n in present),
            "unique_bytes": sum(objects[n]["bytes"] for n in unique),
            "shared_bytes": sum(objects[n]["bytes"] for n in present) - sum(objects[n]["bytes"] for n in unique),
            "not_in_cache": len(names) - len(present),
        })
    garbage = [n for n, o in objects.items() if not o["artifacts"] and o["links"] == 1]
    foreign = [n for n, o in objects.items() if not o["artifacts"] and o["links"] > 1]
    return {
        "cache": str(cache.root),
        "totals": {
            "objects": len(objects), "bytes": sum(o["bytes"] for o in objects.values()),
            "disk_bytes": sum(o["disk_bytes"] for o in objects.values()),
            "artifacts": sum(a["state"] in ("ok", "unreadable") for a in artifacts),
            "unreferenced_objects": len(garbage), "unreferenced_bytes": sum(objects[n]["bytes"] for n in garbage),
            "linked_elsewhere_objects": len(foreign), "linked_elsewhere_bytes": sum(objects[n]["bytes"] for n in foreign),
        },
        "artifacts": artifacts,
        "objects": [{"digest": n, **o} for n, o in sorted(objects.items())],
    }


def verify_cache(cache: WeightCache) -> dict:
    """Re-hash every object regardless of any record. Damage is one QvlError naming the first bad object and
    the artifacts that use it."""
    t0 = time.perf_counter()
    with cache.lock():
        _, used_by = _needs(cache)
        n = nbytes = 0
        bad = []
        for name, st in cache.iter_objects():
            n += 1
            nbytes += st.st_size
            path = cache.object_path(name)
            if integrity.hash_file(path) != name:
                bad.append(name)
            else:
                integrity.write_object_record(name, path.stat())
    if bad:
        users = used_by.get(bad[0]) or ["no registered artifact"]
        raise QvlError(f"weight cache {cache.root}: {len(bad)} of {n} objects do not match their blake3 digest "
                       f"(first: {bad[0][:16]}, used by {', '.join(users)})",
                       hint="every artifact linking a damaged payload is damaged too: re-compile them with --cache "
                            "(that replaces the damaged objects) or copy them again from a good source")
    return {"cache": str(cache.root), "objects": n, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def gc(cache: WeightCache, dry_run: bool = False) -> dict:
    """Delete the objects no registered, still-existing artifact lists and nothing else links (link count 1);
    prune registry entries of deleted or no-longer-cached artifacts; drop stale temp files. Holds the lock
    exclusively, so no compile is writing into the cache meanwhile."""
    with cache.lock(exclusive=True):
        info = listing(cache)
        deleted, freed = [], 0
        for o in info["objects"]:
            if o["artifacts"] or o["links"] > 1:
                continue
            deleted.append(o["digest"])
            freed += o["disk_bytes"]
            if not dry_run:
                path = cache.object_path(o["digest"])
                try:
                    st = path.stat()
                    path.unlink()
                    integrity.forget_object_records(o["digest"], st)
                except FileNotFoundError:
                    pass
        pruned = [a for a in _needs(cache)[0] if a["state"] in ("missing", "not cached")]
        tmp = [e for e in (os.scandir(cache.tmp) if cache.tmp.is_dir() else ())]
        if not dry_run:
            for a in pruned:
                a["registry"].unlink(missing_ok=True)
            for e in tmp:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
            with contextlib.suppress(OSError):
                for shard in os.scandir(cache.objects):
                    with contextlib.suppress(OSError):
                        os.rmdir(shard.path)  # only if empty
    kept = [o for o in info["objects"] if o["digest"] not in set(deleted)]
    return {
        "cache": str(cache.root), "dry_run": dry_run, "deleted_objects": len(deleted), "freed_bytes": freed,
        "deleted": deleted, "kept_objects": len(kept), "kept_bytes": sum(o["bytes"] for o in kept),
        "kept_linked_elsewhere": sum(1 for o in kept if not o["artifacts"]),
        "pruned_artifacts": [a["path"] for a in pruned], "temp_files": len(tmp),
    }


__all__ = ["WeightCache", "default_root", "intern", "InternReport", "pack", "PackReport", "listing", "verify_cache",
           "gc", "same_file_system", "CACHE_FORMAT", "MARKER"]
