"""Artifact manifest: what the toolchain writes and the runtime trusts.

An artifact directory holds `manifest.json`, the ONNX graphs, the shared weight store and the tokenizer,
template and preprocessor files. The manifest records the format version, the source checkpoint (hash
and config), each graph's file hash and I/O signature, tool versions and the report of every step that
produced it. The runtime refuses an artifact whose format version or graph hashes do not match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from qvl.errors import QvlError

FORMAT_NAME = "qvl-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
# Files the runtime needs besides graphs and weights, copied from the checkpoint.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


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


def write_manifest(out_dir: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest}
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def read_manifest(artifact: Path, verify_graphs: bool = True) -> dict:
    """Load and check a manifest; every problem is a one-line QvlError."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise QvlError(f"artifact directory not found: {artifact}", hint="create one with `qvl-compile export`")
    path = artifact / MANIFEST
    if not path.is_file():
        raise QvlError(f"{artifact} has no {MANIFEST}: not a qvl-compile artifact (or an interrupted export)")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise QvlError(f"corrupt manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise QvlError(f"{path} is not a qvl-compile manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QvlError(
            f"artifact format version {manifest.get('format_version')} is not supported (this qvl-compile reads {FORMAT_VERSION})",
            hint="re-export the checkpoint with this qvl-compile version",
        )
    for key in ("graphs", "weights", "model"):
        if key not in manifest:
            raise QvlError(f"corrupt manifest {path}: missing {key!r}")
    weights = artifact / manifest["weights"]["file"]
    if not weights.is_file():
        raise QvlError(f"artifact weight store missing: {weights.name}")
    if weights.stat().st_size != manifest["weights"]["bytes"]:
        raise QvlError(
            f"artifact weight store {weights.name} has {weights.stat().st_size} bytes, manifest says {manifest['weights']['bytes']}"
        )
    if verify_graphs:
        optimized = manifest.get("ort_optimized", {}).get("graphs", {})
        for name, g in [*manifest["graphs"].items(), *optimized.items()]:
            f = artifact / g["file"]
            if not f.is_file():
                raise QvlError(f"artifact graph missing: {g['file']}")
            if sha256_file(f) != g["sha256"]:
                raise QvlError(f"artifact graph {g['file']} does not match its manifest hash (corrupt or modified)")
    return manifest
