"""Which bound decode meets: read bandwidth sampled right before and after each decode run, next to the decode
speed of that run and the compute bound, all in one process run.

    python benchmarks/decode_vs_bandwidth.py ART [--rounds 10] [--threads 2] [--new-tokens 48] [--json OUT]

The bench's roofline divides the best bandwidth sample of the whole run by the bytes a token reads; on a host whose
read bandwidth swings (the 2-core VMs here: ~35 or ~55-60 GB/s, minutes apart) that says little about the minute a
decode ran in. Here every round samples bandwidth (3 passes over 1 GiB, 2 threads) just before and just after a
64-token text decode, so each run gets the roofline of its own minute; the correlation of decode speed with that
bandwidth says whether decode follows it. The compute bound (`decode_bound.decode_compute_bound`: the decoder's
linears timed with cache-resident weights) is measured in the same run. Per round: efficiency against the
bandwidth roofline of its minute and against the compute bound, and which of the two is lower (binds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from qvl.runtime import GenerationStats, load
from qvl.toolchain.eval.bench import decoder_weight_bytes
from qvl.toolchain.eval.bench_inputs import build_inputs
from qvl.toolchain.eval.decode_bound import decode_compute_bound
from qvl.toolchain.eval.hardware import cpu_info, measure_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    bpt = decoder_weight_bytes(a.artifact)["bytes"]
    compute = decode_compute_bound(a.artifact, a.threads)
    model = load(a.artifact, device="cpu", threads=a.threads)
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        prompt = model.prepare(build_inputs(a.artifact, Path(work))["text"]["messages"])
        list(model.generate_ids(prompt, 4, ignore_stop=True))  # warm-up
        for _ in range(a.rounds):
            before = max(measure_bandwidth(a.threads, 1 << 30, 3))
            st = GenerationStats()
            list(model.generate_ids(prompt, a.new_tokens, ignore_stop=True, stats=st))
            after = max(measure_bandwidth(a.threads, 1 << 30, 3))
            tok_s = (a.new_tokens - 1) / st.decode_seconds
            bw = max(before, after)
            roof = bw * 1e9 / bpt
            binds = "bandwidth" if roof < compute["tok_s"] else "compute"
            rounds.append({"bandwidth_before_gbs": before, "bandwidth_after_gbs": after, "decode_tok_s": tok_s,
                           "streamed_gbs": tok_s * bpt / 1e9, "roofline_tok_s": roof,
                           "efficiency_vs_bandwidth": tok_s / roof,
                           "efficiency_vs_compute": tok_s / compute["tok_s"], "binding": binds,
                           "efficiency_vs_binding": tok_s / min(roof, compute["tok_s"])})
            print(json.dumps(rounds[-1]), flush=True)
    bws = [max(r["bandwidth_before_gbs"], r["bandwidth_after_gbs"]) for r in rounds]
    toks = [r["decode_tok_s"] for r in rounds]
    out = {
        "artifact": str(a.artifact), "threads": a.threads, "new_tokens": a.new_tokens, "bytes_per_token": bpt,
        "decoder_linear_kernel": getattr(model.engine, "kernel_note", None), "cpu": cpu_info(a.threads),
        "compute_bound_tok_s": compute["tok_s"], "compute_bound": compute,
        "correlation_bandwidth_vs_decode": float(np.corrcoef(bws, toks)[0, 1]) if len(rounds) > 2 else None,
        "median": {k: statistics.median(r[k] for r in rounds)
                   for k in ("decode_tok_s", "streamed_gbs", "efficiency_vs_bandwidth", "efficiency_vs_compute",
                             "efficiency_vs_binding")},
        "bandwidth_gbs": {"min": min(bws), "median": statistics.median(bws), "max": max(bws)},
        "rounds": rounds,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
