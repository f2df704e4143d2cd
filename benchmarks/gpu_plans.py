"""`run --vram-budget` on a GPU at several budgets (issue #15 item 4, last bullet): each plan runs, its answer against
all-CPU greedy and the whole-decoder CUDA run, TTFT and decode tok/s per plan, and how close the planner was.

    python benchmarks/gpu_plans.py WHOLE_ART PARTITIONED_ART [--budgets 2GiB,4GiB,max] [--context 1024]
        [--max-new-tokens 64] [--threads N] [--json OUT.json] [--peer-checkpoint CKPT] [--no-join]

Cases, each a fresh `qvl-compile` process through the console script, same prompt (a ~130-token text prompt), greedy:
* `cpu`: the whole artifact on the CPU (`--device cpu`): the all-CPU greedy reference;
* `cuda whole`: the whole artifact on ORT's CUDA provider (`--device cuda`);
* `vram <B>`: the partitioned artifact with `--vram-budget B --device cuda` (B = `max`: the GPU's memory, NVML or
  nvidia-smi), after `qvl-compile plan ... --json` for the same budget (the prediction and the placement).
Per case: TTFT, decode tok/s, the answer's tokens equal to the CPU's (and the first position where they differ:
on random weights near-tied logits can flip between CPU and GPU kernels), the plan's parts per device, its predicted
TTFT / tok/s and the ratios measured / predicted. `--no-join` (QVL_PART_JOIN=0) runs every part in its own session
(the runner before consecutive parts were joined), for the before/after.

`--peer-checkpoint CKPT` (the checkpoint the artifacts came from) adds llama.cpp's GPU split in the same run, the
anchor of issue #15: a CUDA build (`peer_llamacpp` flavour `cuda`), CKPT as GGUF Q4_0, and per budget the `-ngl`
llama.cpp's own fitting picks (`llama-fit-params -fitt MARGIN`, MARGIN = the card's free MiB - the budget: its
automatic choice on a card of that size), plus `-ngl 0` (layers on the CPU, its large-batch matmuls offloaded to
the GPU) and all layers; each timed with `llama-bench -p <our prompt tokens> -n <max-new-tokens>` at the same
threads, its VRAM from `llama-fit-params -fitp on` (model / context / compute MiB on the card).
"""

from __future__ import annotations

import argparse
import json
import os
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


def _peer_rows(checkpoint: Path, budgets: list, gpu_mem: int | None, prompt_tokens: int, new_tokens: int,
               threads: int, context: int) -> dict:
    """llama.cpp's CUDA split on the same checkpoint: {"build", "gguf", "rows": [...]} (module docstring)."""
    import re

    from qvl.toolchain.eval import peer_gguf, peer_llamacpp, peer_run

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    build = peer_llamacpp.build("cuda", progress=log)
    cache = peer_llamacpp.cache_root()
    gg = peer_gguf.ensure_ggufs(checkpoint, build.source, "Q4_0", cache, build.tool("llama-quantize"), build.version,
                                progress=log)
    text = Path(gg["text"])
    work = Path(gg["dir"])

    def fit_params(*args: str) -> str:
        proc = subprocess.run([str(build.tool("llama-fit-params")), "-m", str(text), "-c", str(context), *args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-fit-params {' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
        return proc.stdout

    def free_mib() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    cases = [("ngl 0", 0, None)]
    for b in budgets:
        if b == "max":
            continue
        from qvl.runtime.placement import parse_size

        budget_mib = parse_size(b, "--budgets") // (1 << 20)
        margin = max(0, free_mib() - budget_mib)
        chosen = fit_params("-fitc", str(context), "-fitt", str(margin))
        m = re.search(r"-ngl (-?\d+)", chosen)
        ngl = int(m.group(1)) if m else None
        # -1: the default left as it is, i.e. every layer (and the output) fits the margin
        cases.append((f"fit {b}", 99 if ngl == -1 else ngl, {"margin_mib": margin, "printed": chosen.strip()}))
    cases.append(("all layers", 99, None))
    rows = []
    for name, ngl, fit in cases:
        row = {"case": name, "ngl": ngl, "fit": fit}
        if ngl is None:
            row["error"] = "llama-fit-params printed no -ngl"
            rows.append(row)
            continue
        mem = fit_params("-ngl", str(ngl), "-fitp", "on")
        row["memory_mib"] = {l.split()[0]: dict(zip(("model", "context", "compute"), map(int, l.split()[1:4])))
                             for l in mem.splitlines() if len(l.split()) == 4 and l.split()[1].isdigit()}
        out = work / f"bench-ngl{ngl}.json"
        cmd = [str(build.tool("llama-bench")), "-m", str(text), "-ngl", str(ngl), "-p", str(prompt_tokens), "-n",
               str(new_tokens), "-t", str(threads), "-r", "3", "-o", "json"]
        res = peer_run.run_measured(cmd, work / f"bench-ngl{ngl}.log", threads, stdout=out)
        if res["rc"] != 0:
            row["error"] = (work / f"bench-ngl{ngl}.log").read_text(errors="replace")[-600:]
        else:
            parsed = peer_run.parse_llama_bench(out.read_text())
            row.update(prefill_tok_s=parsed["pp"]["tok_s"], decode_tok_s=parsed["tg"]["tok_s"],
                       ttft_s=prompt_tokens / parsed["pp"]["tok_s"], peak_rss_bytes=res["peak_rss_bytes"],
                       meta=parsed.get("meta"), command=cmd)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("meta", "command")}), flush=True)
    return {"build": {"label": build.label, "bin_dir": str(build.bin_dir), **build.record}, "gguf": gg, "rows": rows}


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
    ap.add_argument("--peer-checkpoint", type=Path)
    ap.add_argument("--no-join", action="store_true")
    a = ap.parse_args()
    if a.no_join:
        os.environ["QVL_PART_JOIN"] = "0"
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
                      "vram_bytes": plan["vram_bytes"], "predicted": plan["predicted"], "notes": plan["notes"],
                      "vram_limits": [p["placement"]["vram_limit"] for p in plan["parts"]],
                      "reasons": {p["name"]: p["reason"] for p in plan["parts"][:2] + plan["parts"][-1:]},
                      "speeds": {k: v for k, v in plan["speeds"].items() if k.startswith(("gpu", "cpu"))}}
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
    report = {"gpu_memory_bytes": gpu_mem, "context": a.context, "max_new_tokens": a.max_new_tokens,
              "joined_parts": not a.no_join, "cases": cases}
    if a.peer_checkpoint:
        from qvl.runtime.backends.ort import physical_cores

        report["llama_cpp"] = _peer_rows(a.peer_checkpoint, a.budgets.split(","), gpu_mem,
                                         cpu.get("prompt_tokens") or 128, a.max_new_tokens,
                                         a.threads or physical_cores(), a.context)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
