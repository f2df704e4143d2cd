"""Validate a Hugging Face Qwen3-VL checkpoint directory before anything heavy touches it.

Every user-facing problem (missing directory, wrong model_type, pickle-only weights, a truncated
safetensors shard) becomes a one-line `QvlError`, so the CLI exits 2 instead of dumping a traceback.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict
    weight_files: tuple[Path, ...]

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; return (header, expected file size). Raises QvlError if unreadable."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise QvlError(f"truncated safetensors file {path.name}: {size} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise QvlError(f"corrupt safetensors file {path.name}: header length {n} exceeds file size")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise QvlError(f"cannot read safetensors file {path}: {exc}") from exc
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        end = max(end, meta["data_offsets"][1])
    return header, 8 + n + end


def validate_checkpoint(path: Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise QvlError(f"checkpoint directory not found: {path}", hint="pass a Hugging Face model directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QvlError(f"{path} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise QvlError(f"cannot parse {cfg_path}: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QvlError(
            f"unsupported model_type {model_type!r} in {cfg_path} (qvl-compile supports: {', '.join(SUPPORTED_MODEL_TYPES)})",
            hint="qvl-compile targets Qwen3-VL checkpoints such as Qwen/Qwen3-VL-2B-Instruct",
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise QvlError(f"{cfg_path} lacks {key}: not a complete Qwen3-VL config")

    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise QvlError(f"cannot parse {index}: {exc}") from exc
        files = tuple(path / f for f in sorted(set(weight_map.values())))
    elif single.is_file():
        files = (single,)
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise QvlError(
                f"{path} has only pickle weights ({pickles[0]}); qvl-compile loads safetensors only",
                hint="convert the checkpoint to safetensors with transformers' save_pretrained(safe_serialization=True)",
            )
        raise QvlError(f"{path} has no model.safetensors or model.safetensors.index.json")

    for f in files:
        if not f.is_file():
            raise QvlError(f"checkpoint shard missing: {f.name} (listed in the index)")
        _, expected = _safetensors_header(f)
        actual = f.stat().st_size
        if actual != expected:
            raise QvlError(f"truncated safetensors file {f.name}: {actual} bytes, header says {expected}")
    if not (path / "tokenizer.json").is_file():
        raise QvlError(f"{path} has no tokenizer.json", hint="copy the tokenizer files next to the weights")
    return CheckpointInfo(path=path, config=config, weight_files=files)
