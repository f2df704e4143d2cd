"""Overlapped streaming (issue #15 item 2), measured: the same streamed parts with and without the next part's session
made on a background thread while the current part computes. One process per case, same placement, same greedy
decode; nothing here is needed on a user's machine.

    python benchmarks/overlap_streaming.py PARTITIONED_ART [--stream 8] [--threads 2] [--tokens 16] [--json OUT]

`--stream N`: the last N layer parts stream (made per use, dropped after); the rest and the head stay resident. Per
case: decode ms per token, the streamed parts' session loads, peak RSS (VmHWM), how many sessions were made ahead;
and the planner's view of the same host (`measure_host`): a layer part's load against its compute, i.e. how much
of a load one part's compute can hide at most.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
import numpy as np
from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement
art, n_stream, threads, tokens, overlap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
from qvl.artifacts.manifest import read_manifest
layers = [p.name for p in read_manifest(art).partition.parts if p.kind == "layers"]
placement = {n: PartPlacement("cpu", "stream") for n in layers[len(layers) - n_stream:]}
e = PartitionedEngine(art, placement, threads=threads, overlap=overlap, vision=False)
rng = np.random.default_rng(0)
cache = e.new_cache(64)
x = rng.standard_normal((1, 8, e.hidden_size)).astype(np.float32) * 0.1
pos = np.broadcast_to(np.arange(8)[None, None], (3, 1, 8)).copy()
e.greedy_step(cache, x, pos)
times, ids = [], []
for t in range(tokens):
    x = rng.standard_normal((1, 1, e.hidden_size)).astype(np.float32) * 0.1
    pos = np.full((3, 1, 1), cache.length, np.int64)
    t0 = time.perf_counter()
    ids.append(int(np.asarray(e.greedy_step(cache, x, pos)).ravel()[0]))
    times.append(time.perf_counter() - t0)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"overlap": overlap, "streamed": len(placement), "ms_per_token": 1e3 * sorted(times)[len(times) // 2],
                  "mean_ms_per_token": 1e3 * sum(times) / len(times), "made_ahead": e.overlapped,
                  "max_live_streamed_sessions": e.max_live_per_use, "peak_rss_bytes": hwm, "tokens": ids}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("partitioned", type=Path)
    ap.add_argument("--stream", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.cpu_flags import cpu_model_and_flags
    from qvl.runtime.host_speeds import measure_host

    m = read_manifest(a.partitioned)
    speeds = measure_host(m, threads=a.threads, device="cpu")
    layer = next(p for p in m.partition.parts if p.kind == "layers")
    load_s = layer.weight_bytes / speeds.load.value + speeds.cpu_session.value
    compute_s = layer.weight_bytes / speeds.cpu_decode.value
    cases = []
    for overlap in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(a.partitioned), str(a.stream), str(a.threads),
                               str(a.tokens), overlap], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        cases.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in cases[-1].items() if k != "tokens"}), flush=True)
    model, flags = cpu_model_and_flags() or ("unknown", set())
    report = {"artifact": str(a.partitioned), "threads": a.threads, "stream": a.stream,
              "cpu": {"model": model, **{k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}},
              "layer_part": {"name": layer.name, "weight_bytes": layer.weight_bytes, "load_s": load_s,
                             "compute_s": compute_s, "load_over_compute": load_s / compute_s,
                             "load_how": speeds.load.how, "compute_how": speeds.cpu_decode.how},
              "same_tokens": cases[0]["tokens"] == cases[1]["tokens"],
              "speedup": cases[0]["ms_per_token"] / cases[1]["ms_per_token"], "cases": cases}
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}), flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
