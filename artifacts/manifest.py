"""Artifact manifest: what the toolchain writes and the runtime trusts.

An artifact directory holds `manifest.json`, the ONNX graphs, the shared weight store and the tokenizer,
template and preprocessor files. The manifest records the format version, the source checkpoint (hash
and config), each graph's file hash and I/O signature, tool versions and the report of every step that
produced it, and the digests of every other file (`artifacts/integrity.py`: blake3 chunk digests of the weight
store, blake3 of each side file). `read_manifest` is the one gate: it validates the types of every field the
runtime reads, keeps every path inside the artifact directory, checks that the graphs read their weights from
the manifest's store only and that `model` agrees with the graphs' I/O, and verifies the hashes. Every problem is
a one-line QvlError. The manifest's shape (sections, types, schema version) is `artifacts/schema.py`'s;
`read_manifest` returns its typed `Manifest`, and `write_manifest` checks what it writes against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from qvl.artifacts import integrity
from qvl.artifacts.onnx_refs import scan_graph
from qvl.artifacts.schema import (FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_OBJECTS, MANIFEST,  # noqa: F401 (re-exported)
                                  SIDE_FILES, WEIGHTS, Manifest)
from qvl.errors import QvlError


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the `SIDE_FILES` that `src` has (checkpoint or artifact) into `dst`."""
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("qvl-compile", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def side_file_digests(out_dir: Path) -> dict:
    """`manifest["side_files"]`: blake3 and size of every `SIDE_FILES` member present in `out_dir`."""
    out = {}
    for name in SIDE_FILES:
        f = Path(out_dir) / name
        if f.is_file():
            out[name] = {"blake3": integrity.file_digest(f), "bytes": f.stat().st_size}
    return out


def write_manifest(out_dir: Path, manifest: "dict | Manifest") -> Manifest:
    """Write `manifest.json` (fields as a dict, or a `Manifest`), with the weight store's chunk digests and the
    side files' digests computed from the files actually in `out_dir` (so every writer records them; whatever
    the caller passed is replaced). The result is checked against the schema before it replaces anything, so a
    writer cannot produce a manifest the readers refuse; returns it typed."""
    out_dir = Path(out_dir)
    if isinstance(manifest, Manifest):
        manifest = manifest.derive()
    if (manifest.get("weights") or {}).get("layout") == integrity.OBJECTS_LAYOUT:
        # format 2: content-addressed objects in weights/ (artifacts/content_store.py)
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION_OBJECTS, **manifest}
        manifest["weights"] = integrity.objects_section(out_dir)
    else:
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest}
        name = (manifest.get("weights") or {}).get("file", WEIGHTS)
        manifest["weights"] = {"file": name, **integrity.weights_digests(out_dir / name)}
    manifest["side_files"] = side_file_digests(out_dir)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = json.dumps(manifest, indent=2, sort_keys=False)
    typed = Manifest.from_json(json.loads(text), out_dir)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out_dir / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return typed


MAX_MANIFEST_BYTES = 64 << 20


def _verify_files(m: Manifest, weights: str, summary: dict) -> None:
    artifact = m.artifact_dir
    files = nbytes = 0
    for name, s in m.side_files.items():
        f = artifact / name
        if not f.is_file():
            raise QvlError(f"artifact side file missing: {name}")
        if f.stat().st_size != s.bytes or integrity.file_digest(f) != s.blake3:
            raise QvlError(f"artifact side file {name} does not match its manifest hash (corrupt or modified)")
        files, nbytes = files + 1, nbytes + s.bytes
    optimized = m.ort_optimized.graphs if m.ort_optimized is not None else {}
    weight_files = m.weights.files
    for name, g in [*m.graphs.items(), *optimized.items()]:
        f = artifact / g.file
        if not f.is_file():
            raise QvlError(f"artifact graph missing: {g.file}")
        if sha256_file(f) != g.sha256:
            raise QvlError(f"artifact graph {g.file} does not match its manifest hash (corrupt or modified)")
        refs = scan_graph(f)
        bad = {loc for loc in refs.external.values() if loc not in weight_files}
        if bad:
            raise QvlError(f"artifact graph {g.file} reads weights from {sorted(map(str, bad))[0]!r}, " + (
                "not one of the manifest's weight objects" if m.weights.is_objects
                else f"not the manifest's weight store {m.weights.file!r}"))
        sig = m.graphs[name]  # an optimized graph has its plain graph's I/O
        if refs.inputs != sig.input_names or refs.outputs != sig.output_names:
            raise QvlError(f"artifact graph {g.file} does not have the inputs/outputs its manifest entry records")
        files, nbytes = files + 1, nbytes + f.stat().st_size
    if m.weights.is_objects:
        summary["weights"] = integrity.verify_objects(artifact, m.weights.record, use_record=weights != "full")
        files += len(m.weights.objects)
    else:
        summary["weights"] = integrity.verify_weights(artifact / m.weights.file, m.weights.record, use_record=weights != "full")
        files += 1
    summary.update(files=files + 1, bytes=nbytes + m.weights.bytes + (artifact / MANIFEST).stat().st_size)


def _check_objects_present(m: Manifest) -> None:
    """Format 2: every weight object is a regular file (no symlink: a hard link into the cache is one) of its size."""
    import stat

    d = m.artifact_dir / m.weights.dir
    for name, size in m.weights.objects.items():
        shown = f"{m.weights.dir}/{name[:16]}"
        try:
            st = os.lstat(d / name)
        except FileNotFoundError:
            raise QvlError(f"artifact weight object missing: {shown}",
                           hint="the artifact is incomplete: copy it again (e.g. `cp -r`), or re-compile it") from None
        if not stat.S_ISREG(st.st_mode):
            raise QvlError(f"artifact weight object {shown} is not a regular file (a symlink?)",
                           hint="copy the file into the artifact instead of linking to it")
        if st.st_size != size:
            raise QvlError(f"artifact weight object {shown} has {st.st_size} bytes, manifest says {size}",
                           hint="it is truncated or modified: re-compile the artifact")


def read_manifest(artifact: Path, verify_graphs: bool = True, weights: str = "cached", summary: dict | None = None) -> Manifest:
    """Load, check and type a manifest (`schema.Manifest`); every problem is a one-line QvlError.

    Always: schema, path containment, model vs graph signatures, weight store size. With `verify_graphs`:
    also every graph's and side file's hash, the graphs' weight references, and the weight store's chunk
    digests (`weights="cached"`: skipped when this machine's verified record matches; `"full"`: always)."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise QvlError(f"artifact directory not found: {artifact}", hint="create one with `qvl-compile export`")
    path = artifact / MANIFEST
    if not path.is_file():
        raise QvlError(f"{artifact} has no {MANIFEST}: not a qvl-compile artifact (or an interrupted export)")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise QvlError(f"corrupt manifest {path}: {str(exc)[:200]}") from None
    manifest = Manifest.from_json(raw, artifact, where=str(path))
    if manifest.weights.is_objects:
        _check_objects_present(manifest)
        if verify_graphs:
            _verify_files(manifest, weights, summary if summary is not None else {})
        return manifest
    store = artifact / manifest.weights.file
    if not store.is_file():
        raise QvlError(f"artifact weight store missing: {manifest.weights.file}")
    if store.stat().st_size != manifest.weights.bytes:
        raise QvlError(f"artifact weight store {store.name} has {store.stat().st_size} bytes, "
                       f"manifest says {manifest.weights.bytes}")
    if verify_graphs:
        _verify_files(manifest, weights, summary if summary is not None else {})
    return manifest
