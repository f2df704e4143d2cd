"""Accuracy-budgeted precision assignment: quantize what the budget allows, keep the rest fp32, per layer.

Given an fp32 artifact, a `PrecisionConfig` and an `AccuracyBudget`, measured against the unquantized
artifact itself (same runtime, same prompts, greedy `Model.generate_ids(..., keep_logits=True)`):

1. quantize every eligible layer (`passes/precision.py` on the vision and decoder graphs) -> measure;
2. within budget: done. Otherwise measure each layer quantized *alone* (every other layer fp32) and
   score it by how much of the budget it uses on its own;
3. roll back (keep fp32) the highest-scoring layers one at a time, re-measuring the mix after each,
   until the mix is within budget (all layers fp32 is the reference itself, so this terminates).

The returned `BudgetResult` (layer decisions, the final and all-quantized measurements, every layer's own
score, the roll-back order) is also written into the final artifact's manifest under `"precision"`.

Measurement: both artifacts generate greedily from the same calibration prompts (default: the parity
suite, `toolchain/eval/parity.py`). At step k the two logit vectors are comparable only while the two token
prefixes agree, so KL(p_fp32 || p_quant) and |delta logit| are taken over the steps up to and including
the first divergence; greedy agreement is the fraction of reference tokens reproduced before the first
divergence (a strict prefix measure: one early flip costs all later steps).

Artifact writing (`quantize_artifact`) reloads the fp32 graphs with onnx_ir, runs the pass, rewrites
the shared weight store, copies the side files and writes a manifest whose `embedding` entry points at
the lm_head's MatMulNBits buffers when the tied lm_head was quantized (`format: "matmulnbits"`, read by
`runtime/quantized_embedding.py`) and at the fp32 matrix otherwise.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from qvl.artifacts import manifest as mf
from qvl.artifacts.writer import load_graphs, publish_candidate, write_derived_artifact
from qvl.passes.base import TargetCapabilities
from qvl.passes.precision import PrecisionConfig
from qvl.toolchain.compile.pipelines import PipelineOptions, run_stage
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.compile.targets import get_target
from qvl.toolchain.compile.ort_optimize import ort_optimizer

CPU_AVX2 = get_target("cpu-avx2")  # the laptop CPU: AVX2 int8 dot products, ORT contrib ops


# -- writing a quantized artifact -----------------------------------------------------------------------------


def quantize_artifact(
    src: Path,
    out: Path,
    config: PrecisionConfig,
    target: TargetCapabilities = CPU_AVX2,
    overwrite: bool = False,
    extra_manifest: dict | None = None,
) -> dict:
    """Write `out`: the fp32 artifact `src` with the precision pass applied. Returns the manifest's precision record."""

    def record(reports: dict) -> dict:
        return {**precision_record(config, target, reports), **(extra_manifest or {})}

    return derive_artifact(src, out, target, "weights", PipelineOptions(precision=config), "precision", record,
                           overwrite, updates={"target": target.name}, refuse_quantized=True)


def derive_artifact(src: Path, out: Path, target: TargetCapabilities, stage: str, options: PipelineOptions,
                    section: str, make_record: Callable[[dict], dict], overwrite: bool, updates: dict | None = None,
                    refuse_quantized: bool = False) -> dict:
    """Write `out`: the artifact `src` with one approximate stage of the target's pipeline applied, its record
    (`make_record(pass reports)`) as `manifest[section]`. Returns the record."""
    t0 = time.perf_counter()
    src = Path(src)
    manifest = mf.read_manifest(src)
    if refuse_quantized and manifest.embedding.quantized:
        raise ValueError(f"{src} is already quantized; start from the fp32 artifact")
    graphs = load_graphs(manifest)
    reports = run_stage(target, graphs, stage, options)
    record = make_record(reports)
    write_derived_artifact(manifest, graphs, Path(out), section, record, reports, t0, overwrite,
                           updates=updates, optimize=ort_optimizer(target))
    return record


def layer_totals(reports: dict, entry: Callable[[dict], dict]) -> tuple[dict, int, int, list[dict]]:
    """Over the per-graph reports of one weight pass: {layer: entry(layer details)}, total bytes before and after,
    and every skip as {"graph", "where", "reason"} (what the precision / sparsity / Q/DQ records share)."""
    layers, skipped = {}, []
    before = after = 0
    for name, r in reports.items():
        for layer, d in r.details.get("layers", {}).items():
            layers[layer] = entry(d)
        before += r.details.get("bytes_before", 0)
        after += r.details.get("bytes_after", 0)
        skipped += [{"graph": name, "where": s.where, "reason": s.reason} for s in r.skipped]
    return layers, before, after, skipped


def precision_record(config: PrecisionConfig, target: TargetCapabilities, reports: dict) -> dict:
    """Per-layer decisions and byte counts over all graphs (what the manifest records)."""
    layers, before, after, skipped = layer_totals(reports, lambda d: {
        "decision": ("int8-dynamic" if d.get("kernel") == "dynamic_int8" else f"int{config.weight_bits}")
        if d["decision"] == "quantized" else d["decision"],
        "bytes_before": d["bytes_before"], "bytes_after": d["bytes_after"]})
    return {
        "config": config.to_dict(),
        "target": target.name,
        "layers": layers,
        "linear_weight_bytes_before": before,
        "linear_weight_bytes_after": after,
        "converted": sum(r.counts.get("matmulnbits", 0) + r.counts.get("dynamic_int8", 0) for r in reports.values()),
        "skipped": skipped,
    }


# -- measuring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyBudget:
    max_mean_kl: float | None = 0.01  # mean KL(p_fp32 || p_quant) over comparable steps (nats)
    max_rel_logit_diff: float | None = None  # max |delta logit| / max |fp32 logit|, over comparable steps
    min_greedy_agreement: float | None = 0.9  # fraction of fp32 greedy tokens reproduced before divergence
    decode_steps: int = 16


@dataclass
class Trace:
    name: str
    tokens: list[int]
    logits: list[np.ndarray]


@dataclass
class Measurement:
    mean_kl: float
    max_kl: float
    max_abs_logit_diff: float
    max_rel_logit_diff: float
    greedy_agreement: float
    compared_steps: int
    reference_steps: int
    cases: dict = field(default_factory=dict)  # name -> {"agree": int, "steps": int, "max_abs": float}

    def within(self, budget: AccuracyBudget) -> bool:
        return not self.violations(budget)

    def violations(self, budget: AccuracyBudget) -> list[str]:
        v = []
        if budget.max_mean_kl is not None and not self.mean_kl <= budget.max_mean_kl:
            v.append(f"mean KL {self.mean_kl:.3g} > {budget.max_mean_kl:.3g}")
        if budget.max_rel_logit_diff is not None and not self.max_rel_logit_diff <= budget.max_rel_logit_diff:
            v.append(f"relative logit diff {self.max_rel_logit_diff:.3g} > {budget.max_rel_logit_diff:.3g}")
        if budget.min_greedy_agreement is not None and not self.greedy_agreement >= budget.min_greedy_agreement:
            v.append(f"greedy agreement {self.greedy_agreement:.3f} < {budget.min_greedy_agreement:.3f}")
        return v

    def score(self, budget: AccuracyBudget) -> float:
        """How much of the budget this measurement uses (1.0 = exactly at the limit of its tightest criterion)."""
        parts = [self.mean_kl / max(budget.max_mean_kl, 1e-12) if budget.max_mean_kl is not None else 0.0]
        if budget.max_rel_logit_diff is not None:
            parts.append(self.max_rel_logit_diff / max(budget.max_rel_logit_diff, 1e-12))
        if budget.min_greedy_agreement is not None:
            parts.append((1.0 - self.greedy_agreement) / max(1.0 - budget.min_greedy_agreement, 1e-6))
        return float(max(parts))

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_cases(work_dir: Path) -> list[tuple[str, list[dict], int]]:
    """The parity suite's prompts (text-only, three image shapes, two images, chunked prefill)."""
    from qvl.toolchain.eval.parity import suite_cases, suite_images

    return suite_cases(suite_images(Path(work_dir)))


def trace(artifact: Path, cases, steps: int, threads: int | None = 1, prompts: dict | None = None) -> list[Trace]:
    """Greedy tokens and per-step logits of an artifact on every case (prompts prepared once, reusable)."""
    from qvl.runtime.model import Model

    model = Model(Path(artifact), threads=threads)
    out = []
    for name, messages, chunk in cases:
        prompt = prompts.get(name) if prompts is not None else None
        if prompt is None:
            prompt = model.prepare(messages)
            if prompts is not None:
                prompts[name] = prompt
        gen = list(model.generate_ids(prompt, steps, keep_logits=True, prefill_chunk=chunk))
        out.append(Trace(name, [t for t, _ in gen], [np.asarray(l, dtype=np.float32) for _, l in gen]))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def compare(reference: list[Trace], candidate: list[Trace]) -> Measurement:
    kls, abs_diffs, rel_diffs = [], [], []
    agree_total = ref_total = 0
    cases = {}
    for r, c in zip(reference, candidate, strict=True):
        n = min(len(r.tokens), len(c.tokens))
        agree = 0
        while agree < n and r.tokens[agree] == c.tokens[agree]:
            agree += 1
        compared = min(agree + 1, n)  # logits at the first divergent step still share the prefix
        case_abs = 0.0
        for k in range(compared):
            lr, lc = _log_softmax(r.logits[k]), _log_softmax(c.logits[k])
            kls.append(float(np.sum(np.exp(lr) * (lr - lc))))
            d = float(np.abs(r.logits[k] - c.logits[k]).max())
            abs_diffs.append(d)
            rel_diffs.append(d / max(float(np.abs(r.logits[k]).max()), 1e-12))
            case_abs = max(case_abs, d)
        agree_total += agree
        ref_total += len(r.tokens)
        cases[r.name] = {"agree": agree, "steps": len(r.tokens), "compared": compared, "max_abs_logit_diff": case_abs}
    return Measurement(
        mean_kl=float(np.mean(kls)) if kls else 0.0,
        max_kl=float(np.max(kls)) if kls else 0.0,
        max_abs_logit_diff=float(np.max(abs_diffs)) if abs_diffs else 0.0,
        max_rel_logit_diff=float(np.max(rel_diffs)) if rel_diffs else 0.0,
        greedy_agreement=agree_total / ref_total if ref_total else 1.0,
        compared_steps=len(kls),
        reference_steps=ref_total,
        cases=cases,
    )


# -- the budgeted search --------------------------------------------------------------------------------------


@dataclass
class BudgetResult:
    """Outcome of a per-layer budget search, for every approximate step (precision, sparsity, INT8 Q/DQ)."""

    decisions: dict[str, str]  # layer -> "int8" | "int4" | "pruned" | ... applied, or the restored decision
    measured: Measurement  # the final mix
    all_applied: Measurement  # every eligible layer applied
    layer_scores: dict[str, dict] = field(default_factory=dict)  # layer -> {"score", "measurement"} (alone)
    rolled_back: list[str] = field(default_factory=list)
    within_budget: bool = False
    evaluations: int = 0
    seconds: float = 0.0
    artifact: str | None = None
    all_applied_key: str = "all_quantized"  # its manifest key: "all_quantized" (precision) | "all_pruned" (sparsity)
    gain: dict = field(default_factory=dict)  # sparsity: measure_gain() of the final artifact vs the dense one

    @property
    def all_quantized(self) -> Measurement:
        return self.all_applied

    @property
    def all_pruned(self) -> Measurement:
        return self.all_applied

    def to_manifest(self, budget: AccuracyBudget) -> dict:
        return search_record(self, budget)


def search_record(result: BudgetResult, budget: AccuracyBudget) -> dict:
    """The manifest record of a per-layer budget search (precision: "all_quantized", sparsity: "all_pruned")."""
    return {
        "budget": asdict(budget),
        "decisions": result.decisions,
        "within_budget": result.within_budget,
        "measured": result.measured.to_dict(),
        result.all_applied_key: result.all_applied.to_dict(),
        "layer_scores": {k: {"score": v["score"], **{m: v["measurement"][m] for m in
                             ("mean_kl", "max_abs_logit_diff", "greedy_agreement")}}
                         for k, v in result.layer_scores.items()},
        "rolled_back": result.rolled_back,
        "evaluations": result.evaluations,
        "seconds": round(result.seconds, 2),
    }


def apply_with_budget(
    fp32_artifact: Path,
    out: Path,
    config: PrecisionConfig,
    budget: AccuracyBudget = AccuracyBudget(),
    target: TargetCapabilities = CPU_AVX2,
    cases: list | None = None,
    threads: int | None = 1,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BudgetResult:
    """Quantize all -> measure -> if over budget, roll back the layers that cost most alone until within."""
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    fp32_artifact = Path(fp32_artifact)
    with scratch_dir("qvl-budget-") as work:
        result, best = budget_search(
            fp32_artifact,
            lambda path, restored: quantize_artifact(
                fp32_artifact, path, replace(config, keep_fp32=config.keep_fp32 | restored), target),
            lambda rec: [k for k, v in rec["layers"].items() if v["decision"].startswith("int")],
            budget, ("all quantized", "fp32"), Path(work), cases, threads, say)
        result.seconds = time.perf_counter() - t0
        publish_candidate(best, Path(out), "precision",
                          {"budget_search": result.to_manifest(budget), "decisions": result.decisions}, overwrite)
        result.artifact = str(Path(out))
    return result


def budget_search(fp32_artifact: Path, apply, eligible, budget: AccuracyBudget, labels: tuple[str, str],
                  work: Path, cases, threads, say, all_applied_key: str = "all_quantized") -> tuple[BudgetResult, Path]:
    """The driver every approximate step shares: `rollback_search`, then the per-layer decisions (a rolled-back
    layer gets `labels[1]`, e.g. "fp32" / "dense") in a `BudgetResult`. Returns it and the chosen candidate."""
    full, final, record, best, rolled_back, scores, evaluations = rollback_search(
        fp32_artifact, apply, eligible, budget, labels, work, cases, threads, say)
    decisions = {k: (labels[1] if k in rolled_back else v["decision"]) for k, v in record["layers"].items()}
    result = BudgetResult(decisions, final, full, scores, rolled_back, final.within(budget), evaluations,
                          all_applied_key=all_applied_key)
    return result, best


def rollback_search(fp32_artifact: Path, apply, eligible, budget: AccuracyBudget, labels: tuple[str, str],
                    work: Path, cases, threads, say):
    """The per-layer budget search shared by every approximate pass.

    `apply(candidate_dir, restored: frozenset) -> record` writes the fp32 artifact with the pass applied to
    every eligible layer except `restored`. Apply to all and measure against the fp32 traces; if over budget,
    measure each layer applied alone, then restore layers costliest-first until within budget. Returns
    (all_applied, final, final_record, final_dir, restored_in_order, per_layer_scores, evaluations)."""
    cases = cases if cases is not None else calibration_cases(work / "images")
    prompts: dict = {}
    say("reference (fp32) traces")
    reference = trace(fp32_artifact, cases, budget.decode_steps, threads, prompts)
    evaluations = 0

    def evaluate(restored: frozenset, tag: str) -> tuple[Measurement, dict, Path]:
        nonlocal evaluations
        evaluations += 1
        path = work / f"candidate-{evaluations}"
        record = apply(path, restored)
        m = compare(reference, trace(path, cases, budget.decode_steps, threads, prompts))
        say(f"{tag}: KL {m.mean_kl:.3g}, |dlogit| {m.max_abs_logit_diff:.3g}, agreement {m.greedy_agreement:.3f}")
        return m, record, path

    full, record, best = evaluate(frozenset(), labels[0])
    layers = eligible(record)
    final, rolled_back, scores = full, [], {}
    if not full.within(budget):
        for layer in layers:
            m, _, path = evaluate(frozenset(layers) - {layer}, f"only {layer}")
            shutil.rmtree(path, ignore_errors=True)
            scores[layer] = {"score": m.score(budget), "measurement": m.to_dict()}
        order = sorted(layers, key=lambda k: (-scores[k]["score"], -scores[k]["measurement"]["mean_kl"], k))
        for layer in order:
            rolled_back.append(layer)
            shutil.rmtree(best, ignore_errors=True)
            final, record, best = evaluate(frozenset(rolled_back), f"{labels[1]} {', '.join(rolled_back)}")
            if final.within(budget):
                break
    return full, final, record, best, rolled_back, scores, evaluations
