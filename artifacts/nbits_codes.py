"""The packed-code layout of ORT's `com.microsoft.MatMulNBits` weights, as stored in artifacts.

Codes (and packed zero points) are packed along the last axis low bits first: for 4 bits, element 2j is
the low nibble of byte j (an odd length is padded with a 0 nibble); 8-bit codes are one byte each. The
precision pass writes this layout (`pack_codes`) and the runtime's quantized embedding lookup reads it
(`unpack_codes`), so both sides share this one definition. numpy only (the runtime imports it).
"""

from __future__ import annotations

import numpy as np


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis low-bits-first (4-bit: element 2j -> low nibble of byte j); odd lengths pad 0."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if bits != 4:
        raise ValueError(f"unsupported bits {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first `count` codes of the last axis, uint8."""
    if bits == 8:
        return packed[..., :count]
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]
