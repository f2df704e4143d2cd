"""Decode speed of qvl and llama.cpp in alternating rounds: paired ratios on a host whose speed drifts.

    python benchmarks/decode_ab_vs_llamacpp.py ART GGUF BIN_DIR [BIN_DIR ...] [--rounds 8] [--threads 2] [--json OUT]

`qvl-compile bench --peer llama.cpp` runs each engine once, minutes apart; on the 2-core VMs here the read
bandwidth sits at ~35 or ~60 GB/s and moves between the two within minutes, so an engine that happened to run in
the fast minutes looks better. Here every round runs, back to back, qvl's decode (the bench's 128-token text
prompt, 64 new tokens, greedy, past any stop id) and `llama-bench -p 16 -n 64 -r 1` of each llama.cpp build given
(the bench's own tg64), with a bandwidth sample (2 passes over 1 GiB) before the round. The ratio of each round
is qvl / that build in the same minute; the medians of those ratios are the result. Builds and GGUFs are the ones
the bench made (`~/.cache/qvl/peers`); say which kernels each ran from the bench JSON of the same host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from qvl.runtime import GenerationStats, load
from qvl.toolchain.eval.bench_inputs import build_inputs
from qvl.toolchain.eval.hardware import cpu_info, measure_bandwidth
from qvl.toolchain.eval.peer_run import parse_llama_bench


def llama_tg(bin_dir: Path, gguf: Path, threads: int, new_tokens: int) -> float:
    # -p 16: parse_llama_bench wants a prompt row too; tg is timed on its own from an empty context, as the bench's
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "16", "-n", str(new_tokens), "-t", str(threads),
           "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(parse_llama_bench(out)["tg"]["tok_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("bin_dirs", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model = load(a.artifact, device="cpu", threads=a.threads)
    labels = [d.parent.parent.name for d in a.bin_dirs]  # llama.cpp-<version>-<flavour>/build/bin
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        prompt = model.prepare(build_inputs(a.artifact, Path(work))["text"]["messages"])
        list(model.generate_ids(prompt, 4, ignore_stop=True))  # warm-up
        for d in a.bin_dirs:
            llama_tg(d, a.gguf, a.threads, 8)  # warm-up: the GGUF into the page cache
        for _ in range(a.rounds):
            row = {"bandwidth_gbs": max(measure_bandwidth(a.threads, 1 << 30, 2))}
            st = GenerationStats()
            list(model.generate_ids(prompt, a.new_tokens, ignore_stop=True, stats=st))
            row["qvl_tok_s"] = (a.new_tokens - 1) / st.decode_seconds
            for label, d in zip(labels, a.bin_dirs):
                row[label] = llama_tg(d, a.gguf, a.threads, a.new_tokens)
                row[f"ratio_vs_{label}"] = row["qvl_tok_s"] / row[label]
            rounds.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    keys = ["qvl_tok_s", *labels, *(f"ratio_vs_{lb}" for lb in labels), "bandwidth_gbs"]
    out = {"artifact": str(a.artifact), "gguf": str(a.gguf), "threads": a.threads, "new_tokens": a.new_tokens,
           "decoder_linear_kernel": getattr(model.engine, "kernel_note", None), "cpu": cpu_info(a.threads),
           "median": {k: statistics.median(r[k] for r in rounds) for k in keys},
           "min": {k: min(r[k] for r in rounds) for k in keys}, "max": {k: max(r[k] for r in rounds) for k in keys},
           "rounds": rounds}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
