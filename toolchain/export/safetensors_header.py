"""Parse and fully validate a safetensors header without reading (or trusting) the tensor data.

A safetensors file is `u64 little-endian header length | JSON header | tensor bytes`. The header maps
tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
section) plus an optional `"__metadata__"` str -> str map. The rules checked here are the ones the
`safetensors` library itself enforces when it opens a file (known dtype, `end - begin == numel *
itemsize`, tensors tile the data section with no gap or overlap, the data section ends exactly at the
end of the file), so a file that passes here loads there; everything that fails is one `QvlError`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit (N_HEADER_MAX)

# Byte sizes of the safetensors dtypes (sub-byte float formats are left out: no Qwen3-VL weight uses them).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_bytes: int  # the JSON header's length (the data section starts at 8 + header_bytes)

    @property
    def file_size(self) -> int:
        """The exact size the file must have."""
        return 8 + self.header_bytes + max((t.end for t in self.tensors.values()), default=0)

    def raw(self) -> dict:
        """The header as the JSON it came from (what `_safetensors_header` callers used to get)."""
        out: dict = {"__metadata__": dict(self.metadata)} if self.metadata else {}
        for name, t in self.tensors.items():
            out[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
        return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are Python bools, and bool <: int


def _entry(name: str, meta: object, where: str) -> TensorEntry:
    def bad(what: str) -> QvlError:
        return QvlError(f"corrupt safetensors file {where}: tensor {name!r} {what}")

    if not isinstance(meta, dict):
        raise bad("is not described by a JSON object")
    dtype = meta.get("dtype")
    if not isinstance(dtype, str):
        raise bad("has no dtype")
    if dtype not in DTYPE_SIZES:
        raise bad(f"has unknown dtype {dtype!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    offsets = meta.get("data_offsets")
    if offsets is None:
        raise bad("has no data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise bad(f"has data_offsets {offsets} that end before they begin")
    t = TensorEntry(dtype, tuple(shape), begin, end)
    if end - begin != t.numel * DTYPE_SIZES[dtype]:
        raise bad(f"spans {end - begin} bytes but shape {list(shape)} of {dtype} needs {t.numel * DTYPE_SIZES[dtype]}")
    return t


def parse_header(prefix: bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Validate a safetensors file from its first bytes (at least 8 + header length) and its size.

    `where` names the file in messages. Pass the whole file as `prefix` to validate bytes in memory.
    """
    if len(prefix) < 8 or file_size < 8:
        raise QvlError(f"truncated safetensors file {where}: {file_size} bytes")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise QvlError(f"corrupt safetensors file {where}: header length {n} is over the 100 MiB limit")
    if n > file_size - 8 or len(prefix) < 8 + n:
        raise QvlError(f"corrupt safetensors file {where}: header length {n} exceeds file size {file_size}")
    try:
        header = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise QvlError(f"corrupt safetensors file {where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise QvlError(f"corrupt safetensors file {where}: header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QvlError(f"corrupt safetensors file {where}: __metadata__ must map strings to strings")
    tensors = {name: _entry(name, meta, where) for name, meta in header.items()}

    # Tensors must tile the data section: sorted by offset, each starts where the previous ended.
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < pos:
            raise QvlError(f"corrupt safetensors file {where}: tensor {name!r} overlaps the previous tensor")
        if t.begin > pos:
            raise QvlError(f"corrupt safetensors file {where}: {t.begin - pos} unused bytes before tensor {name!r}")
        pos = t.end
    expected = 8 + n + pos
    if file_size < expected:
        raise QvlError(f"truncated safetensors file {where}: {file_size} bytes, header says {expected}")
    if file_size > expected:
        raise QvlError(f"corrupt safetensors file {where}: {file_size - expected} bytes after the last tensor")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_bytes=n)


def read_header(path: Path) -> SafetensorsHeader:
    """`parse_header` on a file, reading only its first 8 + header-length bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= min(MAX_HEADER_BYTES, size - 8):
                    head += f.read(n)
    except OSError as exc:
        raise QvlError(f"cannot read safetensors file {path}: {exc}") from exc
    return parse_header(head, size, path.name)
