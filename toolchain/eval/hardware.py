"""What the host is and how fast it reads memory: CPU model and SIMD flags, LLC size, measured read bandwidth.

`qvl-compile bench` reports these next to its timings (decode on CPU is memory-bound, so the roofline is
bandwidth / bytes read per token); `benchmarks/membw.py` calls `measure_bandwidth` directly.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from qvl.runtime.backends.ort import physical_cores
from qvl.runtime.cpu_flags import cpu_model_and_flags

BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_SAMPLES = 7  # per phase (before and after the engines)


def cpu_info(threads: int) -> dict:
    """CPU model, the SIMD flags that decide which kernels run, core counts and the LLC size."""
    model, flags = cpu_model_and_flags() or ("", set())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "llc_bytes": llc_bytes(),
        "flags": {f: f in flags for f in wanted},
        "mlas_isa": isa,
        "note": (
            f"ONNX Runtime's MLAS picks its kernels from CPUID at run time: {isa} kernels on this host; "
            "on the target i5-10210U (Comet Lake: AVX2 + FMA, no AVX-512) it takes the AVX2/FMA3 ones, "
            "so these numbers describe this host, not the laptop."
        ),
    }


def llc_bytes() -> int | None:
    """Size of the largest CPU cache (sysfs), None where unknown."""
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            raw = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
        try:
            size = int(raw.rstrip("KMG")) * mult
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


def measure_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, samples: int = BANDWIDTH_SAMPLES) -> list[float]:
    """Multi-threaded read bandwidth in GB/s (1e9 B/s), one value per full pass over the buffer.

    `threads` Python threads each OR-reduce their slice of a `nbytes` buffer viewed as uint64 (numpy's
    integer reductions are SIMD loops that release the GIL; ~50 GB/s per core from cache, so DRAM is
    the limit). The buffer is written first so every page is backed (an untouched `np.empty` reads
    the shared zero page). Use a buffer far larger than the last-level cache.
    """
    threads = max(1, int(threads))
    words = max(threads * 512, int(nbytes) // 8)
    buf = np.empty(words, dtype=np.uint64)
    buf.fill(0x0101010101010101)  # write every page so it is backed (no temporaries)
    parts = np.array_split(buf, threads)
    results: list[float] = []
    for _ in range(max(1, samples) + 1):  # the first pass warms page tables and thread start-up
        barrier = threading.Barrier(threads + 1)
        done = threading.Barrier(threads + 1)

        def work(part):
            barrier.wait()
            np.bitwise_or.reduce(part)
            done.wait()

        workers = [threading.Thread(target=work, args=(p,), daemon=True) for p in parts]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        done.wait()
        dt = time.perf_counter() - t0
        for w in workers:
            w.join()
        results.append(buf.nbytes / dt / 1e9)
    del buf, parts
    return results[1:]


def spread(values: list[float]) -> list[float]:
    """[min, median, max]."""
    return [min(values), statistics.median(values), max(values)]
