"""The artifact's one external weight store, shared by every graph.

All initializers of all graphs of an artifact live in one file (`weights.bin`), each at an aligned offset
and referenced from the ONNX graphs through standard ONNX external data (location/offset/length), so
ONNX Runtime and TensorRT's parser read it natively. Byte-identical tensors are stored once, whichever
graph they come from. The runtime memory-maps the same file for host-side lookups (the token embedding).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGNMENT = 4096  # page-aligned offsets: mmap-friendly for ORT and numpy alike
SMALL_TENSOR_BYTES = 1024  # tiny constants stay inline in the graph


@dataclass(frozen=True)
class StoredTensor:
    offset: int
    length: int


class WeightStoreWriter:
    """Append-only writer with content deduplication."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = self.path.open("wb")
        self._by_digest: dict[bytes, StoredTensor] = {}
        self.bytes_written = 0
        self.bytes_deduplicated = 0
        self.tensors_deduplicated = 0

    def add(self, data: bytes | memoryview) -> StoredTensor:
        digest = hashlib.blake2b(data, digest_size=20).digest()
        hit = self._by_digest.get(digest)
        if hit is not None and hit.length == len(data):
            self.bytes_deduplicated += len(data)
            self.tensors_deduplicated += 1
            return hit
        pad = (-self._f.tell()) % ALIGNMENT
        if pad:
            self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(data)
        self.bytes_written += len(data)
        rec = StoredTensor(offset, len(data))
        self._by_digest[digest] = rec
        return rec

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def externalize_initializers(model, writer: WeightStoreWriter, location: str, always: set[str] = frozenset()) -> int:
    """Move every non-trivial initializer of an onnx-ir model into the store; return bytes referenced.

    Tiny constants stay inline, except those named in `always`: tensors the runtime memory-maps from the store
    itself (the embedding table's parts: a small vocabulary's lm_head scales can be under the threshold)."""
    referenced = 0
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or (tensor.nbytes < SMALL_TENSOR_BYTES and name not in always):
            continue
        referenced += externalize_value(value, writer, location)
    return referenced


def externalize_value(value, writer: WeightStoreWriter, location: str) -> int:
    """Write one constant Value's tensor into the store and point the Value at it (ONNX external data); its length."""
    import onnx_ir as ir

    tensor = value.const_value
    rec = writer.add(tensor_bytes(tensor))
    value.const_value = ir.ExternalTensor(
        location=location,
        offset=rec.offset,
        length=rec.length,
        dtype=tensor.dtype,
        shape=tensor.shape,
        name=value.name,
        base_dir=str(writer.path.parent),
    )
    return rec.length


def tensor_bytes(tensor) -> bytes | memoryview:
    """The bytes `tensor.tobytes()` returns, as a view of the tensor's own memory when they are that memory as it is
    (an onnx-ir Tensor over a C-contiguous numpy array of a whole-byte dtype, on a little-endian machine): writing
    the 2B's 1.2 GB fp32 embedding table would otherwise hold a second copy of it. Anything else (packed 4-bit
    types, strided views such as the exporter's folded transposes, torch-backed tensors) goes through `tobytes()`."""
    import onnx_ir as ir

    raw = tensor.raw if type(tensor) is ir.Tensor else None
    if (
        sys.byteorder == "little"
        and isinstance(raw, np.ndarray)
        and raw.flags.c_contiguous
        and raw.dtype.kind not in "OUS"
        and raw.dtype.fields is None
        and tensor.dtype != ir.DataType.STRING
        and tensor.dtype.bitwidth == 8 * raw.dtype.itemsize
    ):
        return memoryview(raw.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def map_tensor(path: Path, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Read-only memory map of one stored tensor (no copy into Python memory)."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))


def map_embedding(manifest) -> np.ndarray:
    """The dense `[vocab, hidden]` embedding table of an artifact (`schema.Manifest`), memory-mapped from its store."""
    emb = manifest.embedding
    return map_tensor(manifest.path(emb.file or manifest.weights.file), emb.offset, tuple(emb.shape), emb.dtype)
