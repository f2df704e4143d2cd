"""Accuracy-budgeted MLP channel sparsity, with the speed and size gain measured, not assumed.

Given an fp32 artifact, a `SparsityConfig` and an `AccuracyBudget`, measured against the unpruned
artifact itself with the precision budget's own machinery (`toolchain/quant/accuracy_budget.py`: `trace`,
`compare`, the parity suite as calibration prompts, greedy agreement / KL / |delta logit|):

1. prune every eligible decoder layer's SwiGLU MLP (`passes/sparsity.py`) -> measure;
2. within budget: done. Otherwise measure each layer pruned *alone* (every other layer dense) and score
   it by how much of the budget it uses on its own;
3. roll back (keep dense) the highest-scoring layers one at a time, re-measuring the mix after each,
   until the mix is within budget (all layers dense is the reference itself, so this terminates).

Then the gain of the chosen artifact over the unpruned one is *measured*:

* `bytes_per_token`: the decoder graph's initializer bytes (`bench.decoder_weight_bytes`: what one
  decode step streams, lm_head included), before and after;
* decode tok/s: both artifacts loaded side by side (same `threads`), the same fixed text prompt,
  `Model.generate_ids(..., ignore_stop=True)` for `new_tokens` tokens, one warm-up each, then `repeats`
  alternating runs (dense, pruned, dense, ...) so drift on a shared host hits both; the medians give
  `speedup = pruned / dense`. `noise` is the larger relative spread (max - min) / median of the two
  series (at least 2%). Only `speedup > 1 + noise` is reported as a gain; otherwise the record says
  "no measured speed gain" in plain words (a smaller model can still be slower or equal: small MLPs,
  overhead-bound steps, a busy machine).

`sparsify_artifact` writes one pruned artifact (weight store rewritten, side files copied, manifest
`"sparsity"` record + a `steps` entry); `apply_sparsity_with_budget` adds `budget_search`, `decisions`
and `gain` to that record in the final artifact's manifest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from qvl.toolchain.staging import scratch_dir
from qvl.passes.base import TargetCapabilities
from qvl.passes.sparsity import SparsityConfig
from qvl.toolchain.compile.pipelines import PipelineOptions
from qvl.toolchain.quant.accuracy_budget import (
    CPU_AVX2,
    AccuracyBudget,
    BudgetResult,
    budget_search,
    derive_artifact,
    layer_totals,
)
from qvl.artifacts.writer import publish_candidate

SPEED_PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle, "
                "and describe the sea, the weather and the keeper's daily routine in detail.")
MIN_NOISE = 0.02  # a speed ratio within 2% of 1.0 is never called a gain


# -- writing a pruned artifact --------------------------------------------------------------------------------


def sparsify_artifact(
    src: Path,
    out: Path,
    config: SparsityConfig,
    target: TargetCapabilities = CPU_AVX2,
    overwrite: bool = False,
) -> dict:
    """Write `out`: the artifact `src` with MLP channel sparsity applied. Returns the manifest's sparsity record."""
    return derive_artifact(src, out, target, "sparsity", PipelineOptions(sparsity=config), "sparsity",
                           lambda reports: sparsity_record(config, target, reports), overwrite)


def sparsity_record(config: SparsityConfig, target: TargetCapabilities, reports: dict) -> dict:
    """Per-layer channel counts and MLP weight bytes over all graphs (what the manifest records)."""
    keys = ("decision", "channels_before", "channels_after", "bytes_before", "bytes_after", "bytes_saved", "reason")
    layers, before, after, skipped = layer_totals(reports, lambda d: {k: d[k] for k in keys if k in d})
    return {
        "config": config.to_dict(),
        "target": target.name,
        "score": "||Wd[f,:]|| * ||Wg[:,f]|| * ||Wu[:,f]||",
        "layers": layers,
        "mlp_weight_bytes_before": before,
        "mlp_weight_bytes_after": after,
        "layers_pruned": sum(r.counts.get("layers_pruned", 0) for r in reports.values()),
        "channels_removed": sum(r.counts.get("channels_removed", 0) for r in reports.values()),
        "skipped": skipped,
    }


# -- measuring the gain ---------------------------------------------------------------------------------------


def measure_gain(
    dense: Path,
    pruned: Path,
    threads: int | None = 1,
    repeats: int = 5,
    new_tokens: int = 32,
    prompt: str = SPEED_PROMPT,
) -> dict:
    """Decode tok/s and bytes per token of `pruned` vs `dense` (same prompt, same threads, alternating runs)."""
    from qvl.runtime.model import GenerationStats, Model
    from qvl.toolchain.eval.bench import decoder_weight_bytes

    bpt_dense = decoder_weight_bytes(Path(dense))["bytes"]
    bpt_pruned = decoder_weight_bytes(Path(pruned))["bytes"]
    models = {"dense": Model(Path(dense), threads=threads), "pruned": Model(Path(pruned), threads=threads)}
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    prepared = {k: m.prepare(messages) for k, m in models.items()}

    def decode(which: str) -> float:
        stats = GenerationStats()
        for _ in models[which].generate_ids(prepared[which], new_tokens, stats=stats, ignore_stop=True):
            pass
        return stats.decode_tokens_per_second

    for k in models:  # warm-up (ORT first-run allocations, page cache)
        decode(k)
    runs: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(max(1, repeats)):
        for k in ("dense", "pruned"):
            runs[k].append(decode(k))
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = {k: (max(v) - min(v)) / med[k] if med[k] > 0 else float("inf") for k, v in runs.items()}
    speedup = med["pruned"] / med["dense"] if med["dense"] > 0 else 0.0
    noise = max(MIN_NOISE, *spread.values())
    gain = speedup > 1.0 + noise
    if gain:
        statement = (f"measured decode speedup x{speedup:.3f} ({med['pruned']:.2f} vs {med['dense']:.2f} tok/s, "
                     f"median of {repeats}, threads={threads}); noise {noise:.1%}")
    else:
        statement = (f"no measured speed gain: decode x{speedup:.3f} ({med['pruned']:.2f} vs {med['dense']:.2f} tok/s, "
                     f"median of {repeats}, threads={threads}) is "
                     + ("below 1.0" if speedup < 1.0 else f"within noise ({noise:.1%})"))
    return {
        "decode_tok_s_dense": med["dense"],
        "decode_tok_s_pruned": med["pruned"],
        "decode_speedup": speedup,
        "noise": noise,
        "speed_gain": gain,
        "statement": statement,
        "runs": runs,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "prompt_tokens": len(prepared["dense"]),
        "threads": threads,
        "bytes_per_token_dense": bpt_dense,
        "bytes_per_token_pruned": bpt_pruned,
        "bytes_per_token_ratio": bpt_pruned / bpt_dense if bpt_dense else 1.0,
    }


# -- the budgeted search --------------------------------------------------------------------------------------


def apply_sparsity_with_budget(
    fp32_artifact: Path,
    out: Path,
    config: SparsityConfig = SparsityConfig(),
    budget: AccuracyBudget = AccuracyBudget(),
    threads: int | None = 1,
    progress: Callable[[str], None] | None = None,
    cases: list | None = None,
    target: TargetCapabilities = CPU_AVX2,
    overwrite: bool = False,
    speed_repeats: int = 5,
    speed_tokens: int = 32,
) -> BudgetResult:
    """Prune all -> measure -> if over budget, keep dense the layers that cost most alone until within;
    then measure decode speed and bytes per token of the result against the unpruned artifact."""
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    fp32_artifact = Path(fp32_artifact)
    with scratch_dir("qvl-sparsity-") as work:
        result, best = budget_search(
            fp32_artifact,
            lambda path, restored: sparsify_artifact(fp32_artifact, path, replace(config, keep=config.keep | restored), target),
            lambda rec: [k for k, v in rec["layers"].items() if v["decision"] == "pruned" and "reason" not in v],
            budget, ("all pruned", "dense"), Path(work), cases, threads, say, all_applied_key="all_pruned")
        say("measuring decode speed (dense vs pruned)")
        result.gain = measure_gain(fp32_artifact, best, threads=threads, repeats=speed_repeats, new_tokens=speed_tokens)
        say(result.gain["statement"])
        result.seconds = time.perf_counter() - t0
        publish_candidate(best, Path(out), "sparsity", {"budget_search": result.to_manifest(budget),
                                                        "decisions": result.decisions, "gain": result.gain}, overwrite)
        result.artifact = str(Path(out))
    return result
