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

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from qvl.artifacts import manifest as mf
from qvl.passes.base import TargetCapabilities
from qvl.passes.precision import LM_HEAD_LAYER, PrecisionConfig, PrecisionPass
from qvl.toolchain.fsutil import atomic_output_dir
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.compile.targets import get_target

CPU_AVX2 = get_target("cpu-avx2")  # the laptop CPU: AVX2 int8 dot products, ORT contrib ops


# -- writing a quantized artifact -----------------------------------------------------------------------------


def embedding_entry(decoder_model, weights_file: str = mf.WEIGHTS) -> dict:
    """manifest["embedding"] for a saved decoder: the fp32 matrix if it is still there, else the tied lm_head's
    MatMulNBits buffers (`format: "matmulnbits"`, read by `runtime/quantized_embedding.py`)."""
    import onnx_ir as ir

    from qvl.toolchain.export.exporter import EMBEDDING_NAME, embedding_location

    graph = decoder_model.graph
    if EMBEDDING_NAME in graph.initializers:
        return embedding_location(decoder_model)
    head = next((n for n in graph if n.domain == "com.microsoft" and n.op_type == "MatMulNBits"
                 and n.metadata_props.get("qvl.layer") == LM_HEAD_LAYER), None)
    if head is None:
        raise RuntimeError(f"decoder has neither {EMBEDDING_NAME} nor a quantized lm_head to embed tokens from")
    attrs = {k: a.value for k, a in head.attributes.items()}

    def part(value) -> dict | None:
        if value is None:
            return None
        t = value.const_value
        if not isinstance(t, ir.ExternalTensor):
            raise RuntimeError(f"{value.name} is not in the weight store (save the graphs first)")
        return {"offset": int(t.offset), "shape": [int(d) for d in t.shape], "dtype": t.dtype.numpy().name,
                "initializer": value.name}

    inputs = list(head.inputs) + [None] * 2
    return {
        "format": "matmulnbits",
        "file": weights_file,
        "shape": [int(attrs["N"]), int(attrs["K"])],
        "dtype": "float32",
        "bits": int(attrs.get("bits", 4)),
        "block_size": int(attrs["block_size"]),
        "initializer": inputs[1].name,
        "packed": part(inputs[1]),
        "scales": part(inputs[2]),
        "zero_points": part(inputs[3]),
    }


def quantize_artifact(
    src: Path,
    out: Path,
    config: PrecisionConfig,
    target: TargetCapabilities = CPU_AVX2,
    overwrite: bool = False,
    extra_manifest: dict | None = None,
) -> dict:
    """Write `out`: the fp32 artifact `src` with the precision pass applied. Returns the manifest's precision record."""
    import onnx_ir as ir

    t0 = time.perf_counter()
    src = Path(src)
    manifest = mf.read_manifest(src)
    if manifest.get("embedding", {}).get("format") == "matmulnbits":
        raise ValueError(f"{src} is already quantized; start from the fp32 artifact")
    graphs = {name: ir.load(src / g["file"]) for name, g in manifest["graphs"].items()}
    pass_ = PrecisionPass(config)
    reports = {name: pass_(model, target, name).report for name, model in graphs.items()}
    record = precision_record(config, target, reports)
    record.update(extra_manifest or {})
    write_derived_artifact(src, manifest, graphs, Path(out), target, "precision", record, reports, t0, overwrite,
                           updates={"target": target.name})
    return record


def write_derived_artifact(src: Path, manifest: dict, graphs: dict, out: Path, target: TargetCapabilities,
                           section: str, record: dict, reports: dict, t0: float, overwrite: bool,
                           updates: dict | None = None) -> None:
    """Write `out` (atomically): the artifact `src` (whose manifest is `manifest`) with `graphs` as one approximate
    pass left them -- a new weight store, the side files, ORT's optimized graphs for the new graphs (never the
    source's), `manifest[section] = record` and one more step (`section`, seconds since `t0`, pass reports)."""
    from qvl.toolchain.export.exporter import save_graphs
    from qvl.toolchain.compile.ort_optimize import ort_optimized_section

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        entries, store = save_graphs(graphs, tmp)
        mf.copy_side_files(src, tmp)
        new = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created", "ort_optimized")}
        new.update(ort_optimized_section(tmp, entries, target))
        new.update(updates or {})
        new.update(
            graphs=entries,
            weights={"file": mf.WEIGHTS, "bytes": (tmp / mf.WEIGHTS).stat().st_size},
            embedding=embedding_entry(graphs["decoder"]),
            steps=list(manifest.get("steps", [])) + [{
                "name": section,
                "seconds": round(time.perf_counter() - t0, 2),
                "weight_bytes_written": store.bytes_written,
                "reports": {k: r.to_dict() for k, r in reports.items()},
            }],
        )
        new[section] = record
        mf.write_manifest(tmp, new)


def precision_record(config: PrecisionConfig, target: TargetCapabilities, reports: dict) -> dict:
    """Per-layer decisions and byte counts over all graphs (what the manifest records)."""
    layers, skipped = {}, []
    before = after = 0
    for name, r in reports.items():
        for layer, d in r.details.get("layers", {}).items():
            layers[layer] = {"decision": f"int{config.weight_bits}" if d["decision"] == "quantized" else d["decision"],
                             "bytes_before": d["bytes_before"], "bytes_after": d["bytes_after"]}
        before += r.details.get("bytes_before", 0)
        after += r.details.get("bytes_after", 0)
        skipped += [{"graph": name, "where": s.where, "reason": s.reason} for s in r.skipped]
    return {
        "config": config.to_dict(),
        "target": target.name,
        "layers": layers,
        "linear_weight_bytes_before": before,
        "linear_weight_bytes_after": after,
        "converted": sum(r.counts.get("matmulnbits", 0) for r in reports.values()),
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
    decisions: dict[str, str]  # layer -> "int8" | "int4" | "fp32"
    measured: Measurement  # the final mix
    all_quantized: Measurement
    layer_scores: dict[str, dict] = field(default_factory=dict)  # layer -> {"score", "measurement"} (alone)
    rolled_back: list[str] = field(default_factory=list)
    within_budget: bool = False
    evaluations: int = 0
    seconds: float = 0.0
    artifact: str | None = None

    def to_manifest(self, budget: AccuracyBudget) -> dict:
        return search_record(self, budget, "all_quantized", self.all_quantized)


def search_record(result, budget: AccuracyBudget, all_applied_key: str, all_applied: Measurement) -> dict:
    """The manifest record of a per-layer budget search (precision: "all_quantized", sparsity: "all_pruned")."""
    return {
        "budget": asdict(budget),
        "decisions": result.decisions,
        "within_budget": result.within_budget,
        "measured": result.measured.to_dict(),
        all_applied_key: all_applied.to_dict(),
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
        work = Path(work)
        full, final, record, best, rolled_back, scores, evaluations = rollback_search(
            fp32_artifact,
            lambda path, restored: quantize_artifact(
                fp32_artifact, path, replace(config, keep_fp32=config.keep_fp32 | restored), target),
            lambda rec: [k for k, v in rec["layers"].items() if v["decision"].startswith("int")],
            budget, ("all quantized", "fp32"), work, cases, threads, say)
        decisions = {k: ("fp32" if k in rolled_back else v["decision"]) for k, v in record["layers"].items()}
        result = BudgetResult(decisions, final, full, scores, rolled_back, final.within(budget), evaluations)
        result.seconds = time.perf_counter() - t0
        publish_candidate(best, Path(out), "precision",
                          {"budget_search": result.to_manifest(budget), "decisions": decisions}, overwrite)
        result.artifact = str(Path(out))
    return result


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


def publish_candidate(best: Path, out: Path, section: str, updates: dict, overwrite: bool) -> None:
    """Record the search in the chosen candidate's manifest section, then move it atomically to `out`."""
    manifest = json.loads((best / mf.MANIFEST).read_text())
    manifest[section].update(updates)
    for key in ("format", "format_version"):
        manifest.pop(key, None)
    mf.write_manifest(best, manifest)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        for f in best.iterdir():
            shutil.move(str(f), tmp / f.name)
