"""The host CPU's model name and feature flags from /proc/cpuinfo (Linux), read in one place.

The runtime uses the flags to explain what ONNX Runtime's MLAS will do (VNNI or not: `backends/select.py`), and the
bench reports them next to every speed (`toolchain/eval/hardware.py`): MLAS picks its kernels from CPUID at run time,
and /proc/cpuinfo's `flags` line is what the kernel saw of it.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model_and_flags(path: Path = CPUINFO) -> tuple[str, set[str]] | None:
    """(model name, flags) of the first CPU listed; None when the file cannot be read (not Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return model, flags or set()


def has_vnni(flags: set[str]) -> bool:
    """An int8 dot product that accumulates in int32 (AVX-512 VNNI or AVX-VNNI)."""
    return "avx512_vnni" in flags or "avx_vnni" in flags
