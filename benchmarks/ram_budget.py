"""`run --ram-budget` below the model's size (issue #15 item 4): it still answers, slower, with the same output, and
the process RSS stays within the budget plus a stated overhead. One run, one machine, each case in its own process.

    python benchmarks/ram_budget.py WHOLE_ART PARTITIONED_ART [--fractions 0.5,0.35] [--threads 2]
        [--max-new-tokens 64] [--context 512] [--json OUT.json]

Cases, each `qvl-compile run ... --greedy --json --device cpu` through the real console script:
* `whole`: the unpartitioned artifact (one decoder session), no budget: the reference answer, speed and RSS;
* `budget <f>`: the partitioned artifact with `--ram-budget` = f x the model's size (its weight files' bytes: vision
  encoder, decoder, embedding / lm_head), page cache warm (the budget bounds the process, not the kernel's page
  cache: see runtime/residency.py).

Per case: peak RSS (the child's `ru_maxrss` from wait4), TTFT, decode tok/s, bytes the child read from storage
(`ru_inblock`), the answer, whether it equals `whole`'s, and the plan's note (kept / streamed parts). The stated
overhead is what a budget does not control: the Python interpreter + numpy + onnxruntime + tokenizers import and
the runtime's own buffers, measured here as the RSS of a child that imports them and loads the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Describe a quiet morning at the harbour in a few sentences."
_BASELINE = ("import numpy, onnxruntime, tokenizers, sys; from qvl.runtime import Model; "
             "tokenizers.Tokenizer.from_file(sys.argv[1] + '/tokenizer.json')")


def _child(argv: list[str]) -> dict:
    """Run a child to completion: its stdout, stderr, exit code and its own rusage (wait4 on its pid: peak RSS and
    storage reads of that child alone, not a running max over all children)."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errs:
        proc = subprocess.Popen(argv, stdout=out, stderr=errs, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        errs.seek(0)
        return {"rc": proc.returncode, "stdout": out.read(), "stderr": errs.read(),
                "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
                "read_bytes": usage.ru_inblock * 512}


def _run_case(artifact: Path, threads: int, max_new: int, budget: int | None, context: int) -> dict:
    argv = [sys.executable, "-c", "from qvl.cli import main; main()", "run", str(artifact), "--prompt", PROMPT,
            "--greedy", "--json", "--device", "cpu", "--threads", str(threads), "--max-new-tokens", str(max_new)]
    if budget is not None:
        argv += ["--ram-budget", str(budget), "--context", str(context)]
    r = _child(argv)
    if r["rc"] != 0:
        raise SystemExit(f"case failed ({' '.join(argv[3:])}): {r['stderr'].strip()[-500:]}")
    out = json.loads(r["stdout"])
    predicted = None
    if budget is not None:  # the planner's prediction for the same budget, measured the same way `run` measures
        plan = _child(argv[:3] + ["plan", str(artifact), "--ram", str(budget), "--context", str(context), "--device",
                                  "cpu", "--threads", str(threads), "--text-only", "--json",
                                  "--prompt-tokens", str(out["prompt_tokens"])])
        p = json.loads(plan["stdout"])
        predicted = {"ttft_s": p["predicted"]["ttft_s"], "prompt_tokens": p["predicted"]["prompt_tokens"],
                     "decode_tok_s": p["predicted"]["decode_tok_s"], "ram_bytes": p["ram_bytes"]}
    notes = [l[len("note: "):] for l in r["stderr"].splitlines() if l.startswith("note: placement")]
    return {"budget_bytes": budget, "peak_rss_bytes": r["peak_rss_bytes"], "read_bytes": r["read_bytes"],
            "wall_s": r["wall_s"], "ttft_s": out["time_to_first_token_s"], "decode_tok_s": out["decode_tokens_per_s"],
            "generated_tokens": out["generated_tokens"], "prompt_tokens": out["prompt_tokens"], "text": out["text"],
            "plan": notes[0] if notes else None, "predicted": predicted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("whole", type=Path)
    ap.add_argument("partitioned", type=Path)
    ap.add_argument("--fractions", default="0.5,0.35")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=512, help="KV positions the budgeted plans hold (run --context)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.cpu_flags import cpu_model_and_flags

    m = read_manifest(a.partitioned, verify_graphs=False)
    part = m.partition
    model_bytes = sum((a.partitioned / rel).stat().st_size for rel in m.weights.files)  # the weights on disk
    fractions = [float(f) for f in a.fractions.split(",")]
    overhead = _child([sys.executable, "-c", _BASELINE, str(a.whole)])["peak_rss_bytes"]
    cases = []
    for f in fractions:
        budget = int(model_bytes * f)
        c = _run_case(a.partitioned, a.threads, a.max_new_tokens, budget, a.context)
        cases.append({"case": f"budget {f:g}", "fraction": f, **c})
    whole = _run_case(a.whole, a.threads, a.max_new_tokens, None, a.context)
    cases.append({"case": "whole", "fraction": None, **whole})
    for c in cases:
        c["same_answer_as_whole"] = c["text"] == whole["text"] and c["generated_tokens"] == whole["generated_tokens"]
        if c["budget_bytes"]:
            c["rss_over_budget_bytes"] = c["peak_rss_bytes"] - c["budget_bytes"]
            c["within_budget_plus_overhead"] = c["peak_rss_bytes"] <= c["budget_bytes"] + overhead
        c["decode_vs_whole"] = round(c["decode_tok_s"] / whole["decode_tok_s"], 3) if whole["decode_tok_s"] else None
    cpu = cpu_model_and_flags()
    report = {
        "machine": {"cpu": cpu[0] if cpu else None,
                    "simd": sorted(f for f in (cpu[1] if cpu else ()) if f.startswith(("avx", "amx"))),
                    "cores": os.cpu_count(), "threads": a.threads},
        "whole_artifact": str(a.whole), "partitioned_artifact": str(a.partitioned),
        "parts": len(part.parts), "model_bytes": model_bytes, "context": a.context,
        "max_new_tokens": a.max_new_tokens, "prompt": PROMPT,
        "stated_overhead_bytes": overhead,
        "stated_overhead_is": "peak RSS of a child importing numpy + onnxruntime + tokenizers + qvl.runtime and "
                              "loading the tokenizer (what no budget controls)",
        "cases": cases,
    }
    print(f"{'case':<12} {'budget MB':>10} {'plan MB':>8} {'peak RSS MB':>12} {'TTFT s':>8} {'decode tok/s':>13} "
          f"{'predicted':>10} {'same':>5}  plan")
    for c in cases:
        b = f"{c['budget_bytes'] / 1e6:.0f}" if c["budget_bytes"] else "-"
        rss = f"{c['peak_rss_bytes'] / 1e6:.0f}"
        pr = c["predicted"] or {}
        pm = f"{pr['ram_bytes'] / 1e6:.0f}" if pr else "-"
        pd = f"{pr['decode_tok_s']:.2f}" if pr else "-"
        print(f"{c['case']:<12} {b:>10} {pm:>8} {rss:>12} {c['ttft_s']:>8.2f} {c['decode_tok_s']:>13.2f} {pd:>10} "
              f"{str(c['same_answer_as_whole']):>5}  {c['plan'] or ''}")
    print(f"model {model_bytes / 1e6:.0f} MB; stated overhead {overhead / 1e6:.0f} MB")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
