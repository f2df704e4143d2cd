"""Standalone multi-threaded memory read bandwidth, as `qvl-compile bench` measures it.

    python benchmarks/membw.py [--threads N] [--mib 1024] [--samples 10] [--json]

N threads (default: physical cores) OR-reduce their slice of a buffer far larger than the last-level
cache; one sample = one full pass. Prints min / median / max GB/s (1e9 B/s). On shared or virtualised
hosts the number swings run to run (33-56 GB/s has been seen on one box), so look at the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics


def main() -> None:
    from qvl.runtime.backends.ort import physical_cores
    from qvl.toolchain.eval.hardware import llc_bytes, measure_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: physical cores)")
    ap.add_argument("--mib", type=int, default=1024, help="buffer size in MiB (keep it >> LLC)")
    ap.add_argument("--samples", type=int, default=10, help="full passes to time")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    samples = measure_bandwidth(threads, args.mib << 20, args.samples)
    out = {
        "threads": threads,
        "buffer_bytes": args.mib << 20,
        "llc_bytes": llc_bytes(),
        "best_gbs": max(samples),
        "spread_gbs": [min(samples), statistics.median(samples), max(samples)],
        "samples_gbs": samples,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        lo, med, hi = out["spread_gbs"]
        print(f"{threads} threads, {args.mib} MiB buffer: best {hi:.1f} GB/s (min {lo:.1f}, median {med:.1f})")


if __name__ == "__main__":
    main()
