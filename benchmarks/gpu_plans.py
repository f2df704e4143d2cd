"""`run --vram-budget` on a GPU at several budgets (issue #15 item 4, last bullet): each plan runs, its answer against
all-CPU greedy and the whole-decoder CUDA run, TTFT and decode tok/s per plan, and how close the planner was.

    python benchmarks/gpu_plans.py WHOLE_ART PARTITIONED_ART [--budgets 2GiB,4GiB,max] [--context 1024]
        [--max-new-tokens 64] [--threads N] [--json OUT.json]

Cases, each a fresh `qvl-compile` process through the console script, same prompt (a ~130-token text prompt), greedy:
* `cpu`: the whole artifact on the CPU (`--device cpu`): the all-CPU greedy reference;
* `cuda whole`: the whole artifact on ORT's CUDA provider (`--device cuda`);
* `vram <B>`: the partitioned artifact with `--vram-budget B --device cuda` (B = `max`: the GPU's memory, NVML or
  nvidia-smi), after `qvl-compile plan ... --json` for the same budget (the prediction and the placement).
Per case: TTFT, decode tok/s, the answer's tokens equal to the CPU's (and the first position where they differ:
on random weights near-tied logits can flip between CPU and GPU kernels), the plan's parts per device, its predicted
TTFT / tok/s and the ratios measured / predicted. Nothing here is needed on a user's machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("You are looking at a harbour early in the morning. Fishing boats are tied to the pier, gulls circle over "
          "the water, a man is repairing a net, two children are running along the quay with a dog, the sun is "
          "rising behind the lighthouse and the cafe on the corner is opening its shutters. Describe the scene in "
          "detail: the colours, the sounds, the people and what each of them is doing, and what the weather will "
          "probably be like later in the day. Then write a short poem about it.")
CLI = [sys.executable, "-c", "from qvl.cli import main; main()"]


def _cli(*args: str) -> tuple[dict | None, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, proc.stderr.strip()[-800:], wall
    return json.loads(proc.stdout), proc.stderr, wall


def _gpu_memory() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) << 20
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def _first_difference(a: str, b: str) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("whole", type=Path)
    ap.add_argument("partitioned", type=Path)
    ap.add_argument("--budgets", default="2GiB,4GiB,max")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    threads = ["--threads", str(a.threads)] if a.threads else []
    gen = ["--prompt", PROMPT, "--greedy", "--json", "--max-new-tokens", str(a.max_new_tokens), *threads]
    cases = []

    def record(name: str, result, err: str, wall: float, **extra) -> dict:
        c = {"case": name, "ok": result is not None, "wall_s": round(wall, 2), **extra}
        if result is None:
            c["error"] = err
        else:
            c.update(ttft_s=result["time_to_first_token_s"], decode_tok_s=result["decode_tokens_per_s"],
                     prompt_tokens=result["prompt_tokens"], generated_tokens=result["generated_tokens"],
                     text=result["text"], notes=[l for l in err.splitlines() if l.startswith("note:")])
        cases.append(c)
        print(json.dumps({k: v for k, v in c.items() if k != "text"}), flush=True)
        return c

    cpu = record("cpu", *_cli("run", str(a.whole), "--device", "cpu", *gen))
    record("cuda whole", *_cli("run", str(a.whole), "--device", "cuda", *gen))
    gpu_mem = _gpu_memory()
    for b in a.budgets.split(","):
        budget = str(gpu_mem) if b == "max" else b
        plan, perr, _ = _cli("plan", str(a.partitioned), "--vram", budget, "--device", "cuda", "--context",
                             str(a.context), "--prompt-tokens", str(cpu.get("prompt_tokens") or 128), "--text-only",
                             "--json", *threads)
        placed = None
        if plan is not None:
            placed = {"cuda_parts": [p["name"] for p in plan["parts"] if p["placement"]["device"] == "cuda"],
                      "cpu_parts": [p["name"] for p in plan["parts"] if p["placement"]["device"] == "cpu"],
                      "prefill_on_cuda": [p["name"] for p in plan["parts"] if p["placement"]["prefill_device"] == "cuda"],
                      "vram_bytes": plan["vram_bytes"], "predicted": plan["predicted"], "notes": plan["notes"]}
        c = record(f"vram {b}", *_cli("run", str(a.partitioned), "--device", "cuda", "--vram-budget", budget,
                                      "--context", str(a.context), *gen),
                   budget=budget, plan=placed, plan_error=None if plan is not None else perr)
        if c["ok"] and placed:
            c["decode_measured_over_predicted"] = round(c["decode_tok_s"] / placed["predicted"]["decode_tok_s"], 3)
            c["ttft_measured_over_predicted"] = round(c["ttft_s"] / placed["predicted"]["ttft_s"], 3)
    for c in cases:
        if c["ok"] and cpu["ok"]:
            c["same_as_cpu"] = c["text"] == cpu["text"]
            c["first_difference_char"] = _first_difference(c["text"], cpu["text"])
    report = {"gpu_memory_bytes": gpu_mem, "context": a.context, "max_new_tokens": a.max_new_tokens, "cases": cases}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
