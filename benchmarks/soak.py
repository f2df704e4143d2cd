"""Soak benchmark (not a test): does the runtime leak over many generations or many load/unload cycles?

    python benchmarks/soak.py ART [--generations 1000] [--loads 100] [--threads 1]

In one process: `--generations` short greedy generations (max_new_tokens 8, prompts cycling over a few short
texts) on one loaded model, VmRSS sampled every 100; then `--loads` load → one generation → unload cycles,
VmRSS sampled every 10 cycles (scaled to growth per 100). Prints one JSON object. Growth is measured from the
first sample (after warm-up: ORT arenas and caches fill on the first runs) to the last, so a steady state
reads ~0 and a leak reads as a constant per-100 slope.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

PROMPTS = ["Hi.", "What is two plus two?", "Name a colour.", "Say something short.", "Count to three."]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _growth(samples: list[tuple[int, int]], per: int = 100) -> dict:
    (i0, r0), (i1, r1) = samples[0], samples[-1]
    slope = (r1 - r0) / (i1 - i0) * per if i1 > i0 else 0.0
    # the second half alone: a one-off step early on (allocator, ORT arena) is not a leak; a slope here is
    (ih, rh) = samples[len(samples) // 2]
    tail = (r1 - rh) / (i1 - ih) * per if i1 > ih else 0.0
    return {"samples": [{"at": i, "rss_kib": r} for i, r in samples], "first_kib": r0, "last_kib": r1,
            "max_kib": max(r for _, r in samples), f"growth_kib_per_{per}": round(slope, 1),
            f"second_half_growth_kib_per_{per}": round(tail, 1)}


def _message(i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]


def soak_generations(artifact: Path, n: int, threads: int | None, max_new_tokens: int) -> dict:
    from qvl.runtime import load

    model = load(artifact, threads=threads)
    for i in range(5):  # warm-up, not sampled
        model.generate(_message(i), max_new_tokens=max_new_tokens)
    samples = [(0, rss_kib())]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        model.generate(_message(i), max_new_tokens=max_new_tokens)
        if i % 100 == 0:
            samples.append((i, rss_kib()))
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return {"generations": n, "max_new_tokens": max_new_tokens, "seconds": round(seconds, 2),
            "ms_per_generation": round(1000 * seconds / max(n, 1), 2), **_growth(samples)}


def soak_loads(artifact: Path, n: int, threads: int | None, max_new_tokens: int) -> dict:
    from qvl.runtime import load

    def cycle(i: int) -> None:
        model = load(artifact, threads=threads)
        model.generate(_message(i), max_new_tokens=max_new_tokens)
        del model
        gc.collect()

    for i in range(3):
        cycle(i)
    samples = [(0, rss_kib())]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        cycle(i)
        if i % 10 == 0:
            samples.append((i, rss_kib()))
    seconds = time.perf_counter() - t0
    return {"cycles": n, "seconds": round(seconds, 2), "ms_per_cycle": round(1000 * seconds / max(n, 1), 1),
            **_growth(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--loads", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    import onnxruntime

    report = {
        "artifact": str(args.artifact),
        "threads": args.threads,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "rss_at_start_kib": rss_kib(),
        "generation_soak": soak_generations(args.artifact, args.generations, args.threads, args.max_new_tokens),
        "load_unload_soak": soak_loads(args.artifact, args.loads, args.threads, args.max_new_tokens),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
