"""CLI body of `qvl-compile compile --target sm61|sm75+ [--weights int8]`: write the kit, print its summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from qvl.errors import QvlError
from qvl.toolchain.tensorrt.int8_kit import make_int8_engine_kit
from qvl.toolchain.tensorrt.kit import KitReport, make_engine_kit
from qvl.toolchain.tensorrt.memory_fit import MiB, format_memory_fit


def kit_command(source: Path, target: str = "sm61", out: Path | None = None, *, overwrite: bool = False,
                card: str | None = None, echo: Callable[[str], None] | None = None,
                step: Callable[[str], None] | None = None, weights: str = "fp32", budget=None,
                threads: int | None = None) -> KitReport:
    """CLI body of `qvl-compile compile --target sm61|sm75+ [--weights int8]`: write the kit and print its summary."""
    echo = echo or (lambda s: print(s, file=sys.stderr))
    if weights == "int8":
        report = make_int8_engine_kit(source, target, out, budget=budget, card=card, overwrite=overwrite,
                                      threads=threads, step=step)
    elif weights == "fp32":
        report = make_engine_kit(source, target, out, card=card, overwrite=overwrite, step=step)
    else:
        raise QvlError(f"TensorRT kits have no {weights} path", hint="use --weights fp32 or --weights int8 (explicit Q/DQ)")
    kit = report.kit
    for r in report.lowering:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if v) or "no change"
        echo(f"  {r['name']:<24} {r['graph']:<8} {counts}")
    for name, g in kit["graphs"].items():
        profs = "; ".join(f"{p['name']}: " + ", ".join(f"{k} {v[0]}..{v[2]}" for k, v in p["dims"].items() if v[0] != v[2])
                          for p in g["profiles"])
        echo(f"  {name:<8} opset {g['opset']}  profiles {profs}")
    if report.precision is not None:
        p = report.precision
        counts = p["counts"]
        kept = sum("keep_fp32" in s["reason"] for s in p["skipped"])
        other = len(p["skipped"]) - kept
        echo(f"  int8 Q/DQ: {counts.get('quantized', 0)} linear layers ({counts.get('smoothing_folded', 0)} smoothing vectors "
             f"folded into norms, {counts.get('smoothing_mul', 0)} as Mul); {kept} kept fp32 by the budget, {other} other "
             f"skips (the tied lm_head is INT8 in the engine; its fp32 table stays the host embedding table); calibration on "
             f"{len(p['calibration']['cases'])} prompts, SmoothQuant alpha {p['calibration']['alpha']}")
        search = p.get("budget_search")
        if search:
            meas = search["measured"]
            back = search.get("rolled_back") or []
            echo(f"  accuracy budget {'met' if search['within_budget'] else 'NOT met'} vs the fp32 kit: mean KL "
                 f"{meas['mean_kl']:.4g}, greedy agreement {meas['greedy_agreement']:.3f}, max |dlogit| "
                 f"{meas['max_abs_logit_diff']:.3g}; layers kept fp32: {', '.join(back) or 'none'}")
        else:
            echo("  no accuracy budget (--no-budget): every eligible layer is INT8, unmeasured")
    b = kit["build"]
    echo(f"  build: {b['precision']}, fp16={'on' if b['fp16'] else 'off'}, int8={'on' if b['int8'] else 'off'}, "
         f"refit, workspace {b['workspace_bytes'] // MiB} MiB, TensorRT {b['tensorrt']}")
    fit = kit["memory_fit"]
    if fit["cards"]:
        echo(format_memory_fit(fit))
    sel = fit["selected"]
    dtype = "int8" if report.precision is not None else "fp32"
    if sel.get("card") and not sel["fits"]:
        echo(f"warning: the model does not fit the {sel['name']} at {dtype} in any placement; "
             f"profiles sized for {kit['context_length']} positions (see the memory-fit table)")
    elif sel.get("card") and not sel["fits_as_built"]:
        echo(f"note: on the {sel['name']} keep on the CPU: {', '.join(sel['on_cpu'])}")
    echo(f"wrote engine kit {report.out} for {report.target} in {report.seconds:.1f} s "
         f"(context {kit['context_length']}, build with `qvl-compile build-engine {report.out}`)")
    return report


def kit_summary(kit: dict) -> dict:
    """Small JSON-able summary (for --json outputs)."""
    return {"target": kit["target"], "context_length": kit["context_length"], "prefill_chunk": kit["prefill_chunk"],
            "graphs": {k: {"opset": g["opset"], "profiles": [p["name"] for p in g["profiles"]]} for k, g in kit["graphs"].items()},
            "build": kit["build"], "selected": kit["memory_fit"]["selected"]}


__all__ = ["kit_command", "kit_summary"]
