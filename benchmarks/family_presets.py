"""Compile the dense Qwen3-VL family presets (2b, 4b, 8b; random weights in real HF format) and measure each step.

    python benchmarks/family_presets.py WORK --presets 4b,8b [--weights int4] [--json OUT.json]

Per preset, through the real console script: `make-checkpoint`, `export` (fp32), `compile --target cpu --weights
int4 --no-budget` (random weights have no accuracy to budget), then `run --json` on a text prompt for the decode
speed. Each step's wall time and its process's peak RSS (`wait4`'s ru_maxrss of that child), the bytes on disk of the
checkpoint, the export and the compiled artifact, and the host's CPU (model, cores, SIMD flags) go into the JSON.
Steps already done in WORK are skipped (their numbers are then absent), so a run can be resumed; `--cleanup`
deletes a preset's files once measured (an 8B fp32 export alone is 35 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _cli() -> list[str]:
    exe = shutil.which("qvl-compile")
    return [exe] if exe else [sys.executable, "-c", "from qvl.cli import main; main()"]


def _step(args: list[str], log: Path) -> dict:
    """Run one console-script step; its wall time, peak RSS and exit code (stderr to `log`)."""
    t0 = time.monotonic()
    with open(log, "ab") as err:
        proc = subprocess.Popen(_cli() + args, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    return {"seconds": round(time.monotonic() - t0, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "rc": os.waitstatus_to_exitcode(status), "stdout": out.decode(errors="replace")}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _cpu() -> dict:
    from qvl.runtime.cpu_flags import cpu_model_and_flags

    model, flags = cpu_model_and_flags() or (platform.processor(), set())
    simd = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    return {"model": model, "cores": os.cpu_count(), "simd": simd}


def measure(work: Path, preset: str, weights: str, threads: list[int] | None, log: Path, cleanup: bool = False) -> dict:
    ckpt, export, art = work / f"ckpt-{preset}", work / f"export-{preset}", work / f"{preset}-cpu-{weights}"
    row: dict = {"preset": preset, "weights": weights}
    steps = (("make_checkpoint", ckpt, ["make-checkpoint", "--preset", preset, "--out", str(ckpt)]),
             ("export", export, ["export", str(ckpt), "--out", str(export)]),
             ("compile", art, ["compile", str(export), "--target", "cpu", "--weights", weights, "--no-budget",
                               "--out", str(art)]))
    for name, out, args in steps:
        if (out / ("config.json" if name == "make_checkpoint" else "manifest.json")).exists():
            continue
        result = _step(args, log)
        result.pop("stdout")
        row[name] = result
        if result["rc"] != 0:
            row["error"] = f"{name} failed (rc {result['rc']}), see {log}"
            return row
        print(f"{preset} {name}: {result}", file=sys.stderr, flush=True)
        if name == "make_checkpoint" or "tie_word_embeddings" not in row:
            config = json.loads((ckpt / "config.json").read_text())
            row["tie_word_embeddings"] = config.get("tie_word_embeddings",
                                                    config.get("text_config", {}).get("tie_word_embeddings"))
            row["checkpoint_bytes"] = _bytes(ckpt)
        if name == "export" and cleanup:  # the export is self-contained: the checkpoint's disk goes to the compile
            shutil.rmtree(ckpt)
        if name == "compile":
            row["bytes"] = {"export": _bytes(export), "artifact": _bytes(art)}
            if cleanup:  # an 8B fp32 export is 35 GB: free it before the next preset's
                shutil.rmtree(export)
    row["runs"] = []
    for n in threads or [None]:  # one decode measurement per thread count asked for
        run = ["run", str(art), "--prompt", "Describe a sunny day at the beach in detail.", "--max-new-tokens",
               "32", "--device", "cpu", "--json"] + (["--threads", str(n)] if n else [])
        result = _step(run, log)
        measured = {"threads": n, **{k: result[k] for k in ("seconds", "peak_rss_gb", "rc")}}
        if result["rc"] == 0:
            stats = json.loads(result["stdout"].strip().splitlines()[-1])
            measured.update({k: stats[k] for k in ("prompt_tokens", "generated_tokens", "time_to_first_token_s",
                                                   "decode_tokens_per_s")})
        row["runs"].append(measured)
    if cleanup:
        for path in (ckpt, export, art):
            shutil.rmtree(path, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--presets", default="4b,8b")
    ap.add_argument("--weights", default="int4", choices=["int4", "int8"])
    ap.add_argument("--threads", type=lambda v: [int(n) for n in v.split(",")], default=None,
                    help="decode thread counts, comma-separated (one run each; default: ORT's)")
    ap.add_argument("--cleanup", action="store_true", help="delete each preset's files once measured (disk)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (also printed)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    report = {"host": _cpu(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "threads": a.threads, "rows": []}
    for preset in a.presets.split(","):
        report["rows"].append(measure(a.work, preset, a.weights, a.threads, a.work / f"{preset}.log", a.cleanup))
        if a.json:
            a.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if all("error" not in r for r in report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
