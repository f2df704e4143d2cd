"""Host-side token embedding lookup from a MatMulNBits-quantized `[vocab, hidden]` table (numpy only).

When the precision pass quantizes the tied lm_head, the fp32 `[vocab, hidden]` matrix leaves the artifact:
it is stored once, as the MatMulNBits weight of the lm_head (`B` uint8 `[vocab, blocks, blob]`, `scales`
float32 `[vocab * blocks]`, optional packed `zero_points`). The runtime then embeds tokens by dequantizing
just the requested rows, with the op's own formula `(code - zero_point) * scale` in float32, so a token's
embedding is bit-identical to the column the decoder's lm_head multiplies with (ORT, accuracy_level 0).
An untied model's table is quantized on its own into the same layout (tensors no graph node reads; the lm_head
has its own `lm_head.weight.q`), and is read here the same way: the manifest entry names whichever it is.

The manifest entry (`embedding`, typed `schema.Embedding`) that selects this path:

    {"format": "matmulnbits", "file": "weights.bin", "shape": [vocab, hidden], "dtype": "float32",
     "bits": 4 | 8, "block_size": 32 | 64 | 128, "initializer": "embed_tokens.weight.q",
     "packed":      {"offset": int, "shape": [vocab, blocks, blob], "dtype": "uint8", "initializer": ...},
     "scales":      {"offset": int, "shape": [vocab * blocks], "dtype": "float32", "initializer": ...},
     "zero_points": {"offset": int, "shape": [vocab * zp_bytes], "dtype": "uint8", "initializer": ...} | null}

Each part may name its own "file"; by default the entry's "file" (the artifact's weight store).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qvl.artifacts.nbits_codes import unpack_codes
from qvl.artifacts.schema import WEIGHTS, Embedding, TensorRef
from qvl.errors import QvlError

FORMAT = "matmulnbits"


class QuantizedEmbedding:
    """Row lookup over memory-mapped MatMulNBits buffers; `emb[ids]` works like indexing the fp32 matrix."""

    def __init__(self, packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                 block_size: int, hidden: int):
        if bits not in (4, 8):
            raise QvlError(f"quantized embedding: unsupported bits {bits}")
        vocab, n_blocks, blob = packed.shape
        if n_blocks * block_size != hidden or blob * 8 != block_size * bits:
            raise QvlError(f"quantized embedding: packed shape {list(packed.shape)} does not match hidden={hidden}, "
                           f"bits={bits}, block_size={block_size}")
        if scales.size != vocab * n_blocks:
            raise QvlError(f"quantized embedding: {scales.size} scales for {vocab} x {n_blocks} blocks")
        self.packed = packed
        self.scales = scales.reshape(vocab, n_blocks)
        self.zero_points = None
        if zero_points is not None:
            zp_bytes = -(-n_blocks * bits // 8)
            if zero_points.size != vocab * zp_bytes:
                raise QvlError(f"quantized embedding: {zero_points.size} zero-point bytes, expected {vocab * zp_bytes}")
            self.zero_points = zero_points.reshape(vocab, zp_bytes)
        self.bits = bits
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.shape = (vocab, hidden)
        self.dtype = np.dtype(np.float32)

    @classmethod
    def from_manifest(cls, artifact: Path, entry: Embedding) -> "QuantizedEmbedding":
        """From the manifest's typed `embedding` entry (`format: "matmulnbits"`)."""
        if entry.format != FORMAT:
            raise QvlError(f"embedding format {entry.format!r} is not {FORMAT!r}")
        try:
            vocab, hidden = (int(d) for d in entry.shape)
            parts = {k: _map(Path(artifact), entry, getattr(entry, k)) if getattr(entry, k) is not None else None
                     for k in ("packed", "scales", "zero_points")}
            return cls(parts["packed"], parts["scales"], parts["zero_points"], int(entry.bits),
                       int(entry.block_size), hidden)
        except (TypeError, ValueError) as exc:
            raise QvlError(f"corrupt quantized embedding entry in the manifest: {exc}") from None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        return self.lookup(ids)

    def lookup(self, ids) -> np.ndarray:
        """float32 `[*ids.shape, hidden]`: `(code - zero_point) * scale` for just the requested rows."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.shape[0] or flat.max() >= self.shape[0]):
            raise IndexError(f"token id out of range for a vocabulary of {self.shape[0]}")
        codes = unpack_codes(np.asarray(self.packed[flat]), self.bits, self.block_size).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(1 << (self.bits - 1))
        else:
            zp = unpack_codes(np.asarray(self.zero_points[flat]), self.bits, self.n_blocks).astype(np.float32)[..., None]
        scales = np.asarray(self.scales[flat], dtype=np.float32)[..., None]
        rows = (codes - zp) * scales  # [n, blocks, block_size], float32 like the op
        return rows.reshape(ids.shape + (self.shape[1],))


def _map(artifact: Path, entry: Embedding, part: TensorRef) -> np.ndarray:
    path = artifact / (part.file or entry.file or WEIGHTS)
    if not path.is_file():
        raise QvlError(f"artifact weight store missing: {path.name}")
    shape = tuple(int(d) for d in part.shape)
    dtype = np.dtype(part.dtype)
    need = int(part.offset) + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise QvlError(f"artifact weight store {path.name} is truncated (quantized embedding needs {need} bytes)")
    return np.memmap(path, dtype=dtype, mode="r", offset=int(part.offset), shape=shape)
