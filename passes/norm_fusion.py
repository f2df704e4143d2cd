"""Normalization and GELU fusion for ORT targets, built on onnxscript's `ort_fusions` rule sets.

Rewrites, in this order (each step sees the previous one's output):

* `rms_normalization`: `scale * (x * 1/sqrt(mean(x^2) + eps))` (decoder RMSNorms)
  -> `SimplifiedLayerNormalization` (an ORT op, registered in the "" domain)
* `skip_rms_normalization`: `Add(x, skip)` -> SimplifiedLayerNormalization
  -> `com.microsoft.SkipSimplifiedLayerNormalization` (its sum output replaces the Add)
* `skip_layer_normalization`: `Add(x, skip)` -> LayerNormalization (vision blocks, merger)
  -> `com.microsoft.SkipLayerNormalization`
* `gelu`: erf / tanh GELU decompositions -> `com.microsoft.Gelu` / `com.microsoft.FastGelu`
* `bias_gelu`: `Add(x, bias[D])` -> Gelu -> `com.microsoft.BiasGelu` (erf) / `com.microsoft.FastGelu(x, bias)` (tanh)

The rules are onnxscript's own (`rms_normalization`, `skip_normalization`, `gelu`, `erfgelu`,
`bias_gelu`). Two local additions:

* onnxscript's Skip*Normalization checks require `[batch, seq, hidden]` operands; the vision tower works
  on packed 2-D `[patches, hidden]` tensors, which ORT's SkipLayerNormalization /
  SkipSimplifiedLayerNormalization also accept (`(token_count, hidden_size)`), so the checks are widened
  to rank 2 (rank 3 still goes through onnxscript's own check).
* `Add(x, bias) -> Gelu(approximate="tanh")` becomes `FastGelu(x, bias)` (onnxscript's BiasGelu rule
  declines the tanh form because BiasGelu is the erf form).

onnxscript's `_pre_optimize` (ONNX shape inference + the general optimizer + shape rules) is NOT run:
the exported graphs already carry every value's shape and constant epsilons/exponents, the rewriter
itself does the basic constant propagation the patterns need, and the general optimizer would also
rewrite unrelated parts of the graph (constant folding over the memory-mapped weight store). The pass
reproduces `optimize_for_ort`'s counts on the decoder (17 RMSNorm, 7 SkipRMSNorm) and fuses the
vision residual LayerNorms that `optimize_for_ort` leaves alone.

The patterns rely on recorded value shapes (the Skip* checks compare operand shapes) and on the
exporter's explicit attributes (onnxscript's RMSNorm pattern spells out `ReduceMean(keepdims=1,
noop_with_empty_axes=0)`). Standard ONNX `Gelu` (opset 20, what the exporter emits for the vision MLPs)
is left as is: ORT runs it with a native kernel, so only decomposed GELUs and bias+GELU pairs are fused.

Sites that match a pattern's structure but fail its condition (non-constant epsilon, mismatched
operand shapes, a non-vector bias, ...) are listed in `report.skipped` with the rule's reason.
TensorRT targets (`ort_contrib_ops=False`) are skipped: every emitted op is an ORT extension.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, pattern
# onnxscript's ORT fusion rules are used as a library, not through a stable API: `_SkipLayerNorm` /
# `_SkipRmsNorm` subclass its Skip*NormFusion rules, override `check` with their exact signature and read
# their private `_has_bias`. That ties this file to onnxscript 0.7.x (pin: onnxscript>=0.7.2,<0.8); the
# matcher types (MatchResult, MatchingTracer, MatchStatus) come from the public `onnxscript.rewriter`.
from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules
from onnxscript.rewriter.ort_fusions.erfgelu import rules as erf_gelu_rules
from onnxscript.rewriter.ort_fusions.gelu import gelu_rules
from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_rules
from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion, SkipRmsNormFusion

from qvl.passes.base import GraphPass, PassReport, Skip, check_shape

KINDS = ("rms_normalization", "skip_rms_normalization", "skip_layer_normalization", "gelu", "bias_gelu")
FUSED_OPS = (  # (domain, op_type) of every op the pass emits
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "Gelu"),
    ("com.microsoft", "FastGelu"),
    ("com.microsoft", "BiasGelu"),
)


@dataclass(frozen=True)
class NormFusionConfig:
    graphs: tuple[str, ...] = ("vision", "decoder")
    rms_norm: bool = True  # rms_normalization + skip_rms_normalization
    layer_norm: bool = True  # skip_layer_normalization
    gelu: bool = True  # gelu + bias_gelu


def _packed_2d_check(rule, input, skip, gamma, beta, bias) -> MatchResult:
    """Rank-2 `[tokens, hidden]` operands, as ORT's Skip*Normalization kernels accept them."""
    result = MatchResult()
    bindings: dict = {}
    operands = [("input", input, ["S", "D"]), ("skip", skip, ["S", "D"]), ("gamma", gamma, ["D"])]
    if beta is not None:
        operands.append(("beta", beta, ["D"]))
    if rule._has_bias:
        operands.append(("bias", bias, ["D"]))
    for name, value, dims in operands:
        if not check_shape(bindings, value, dims):
            shapes = ", ".join(f"{n} {None if v is None else v.shape}" for n, v, _ in operands)
            return result.fail(f"{name} does not fit {dims} (needs equal [tokens, hidden] operands; {shapes})", value)
    return result


class _SkipLayerNorm(SkipLayerNormFusion):
    """onnxscript's SkipLayerNormFusion, also for packed 2-D `[patches, hidden]` residual streams."""

    def check(self, op, input, skip, gamma, beta, bias, layer_norm, **kwargs) -> MatchResult:
        if input is not None and input.shape is not None and input.shape.rank() == 2:
            result = _packed_2d_check(self, input, skip, gamma, beta, bias)
            if result and layer_norm.producer().attributes.get_int("stash_type", 1) != 1:
                return result.fail("LayerNormalization stash_type is not float32 (1)")
            return result
        return super().check(op, input, skip, gamma, beta, bias, layer_norm, **kwargs)


class _SkipRmsNorm(SkipRmsNormFusion):
    """onnxscript's SkipRmsNormFusion, also for packed 2-D `[tokens, hidden]` residual streams."""

    def check(self, op, input, skip, gamma, bias, simplified_layer_norm, **kwargs) -> MatchResult:
        if input is not None and input.shape is not None and input.shape.rank() == 2:
            result = _packed_2d_check(self, input, skip, gamma, None, bias)
            if result and simplified_layer_norm.producer().attributes.get_int("stash_type", 1) != 1:
                return result.fail("SimplifiedLayerNormalization stash_type is not float32 (1)")
            return result
        return super().check(op, input, skip, gamma, bias, simplified_layer_norm, **kwargs)


class _BiasFastGelu(pattern.RewriteRuleClassBase):
    """`Gelu(Add(x, bias), approximate="tanh")` -> `com.microsoft.FastGelu(x, bias)` (bias is [hidden])."""

    def pattern(self, op, x, bias):
        return op.Gelu(op.Add(x, bias), _outputs=["gelu"])

    def check(self, op, x, bias, gelu, **_) -> MatchResult:
        result = MatchResult()
        if gelu.producer().attributes.get_string("approximate", "none") != "tanh":
            return result.fail("Gelu is the erf form (handled by BiasGelu)")
        if bias is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("bias is not a 1-D [hidden] tensor", bias)
        if x.shape is None or x.shape.rank() < 1 or x.shape[-1] != bias.shape[0]:
            return result.fail("bias length does not equal the input's last dimension", bias)
        return result

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain="com.microsoft")


def _skip_rules(cls, name: str) -> list:
    # Same variants, same order as onnxscript's skip_normalization rule sets.
    return [
        cls.rule(f"{name}PreBias", has_bias=True, bias_pre_add=True),
        cls.rule(f"{name}Bias", has_bias=True, bias_pre_add=False),
        cls.rule(name, has_bias=False),
    ]


def _rule_sets(config: NormFusionConfig) -> list[tuple[str, pattern.RewriteRuleSet]]:
    sets = []
    if config.rms_norm:
        sets.append(("rms_normalization", pattern.RewriteRuleSet(rms_normalization_rules)))
        sets.append(("skip_rms_normalization", pattern.RewriteRuleSet(_skip_rules(_SkipRmsNorm, "SkipRmsNorm"))))
    if config.layer_norm:
        sets.append(("skip_layer_normalization", pattern.RewriteRuleSet(_skip_rules(_SkipLayerNorm, "SkipLayerNorm"))))
    if config.gelu:
        sets.append(("gelu", pattern.RewriteRuleSet([*gelu_rules.rules, *erf_gelu_rules.rules])))
        bias_rules = [*bias_gelu_rules.rules, *_BiasFastGelu.rule("BiasFastGelu").commute()]
        sets.append(("bias_gelu", pattern.RewriteRuleSet(bias_rules)))
    return sets


class _FailureLog(MatchingTracer):
    """Records, per root node, every rule whose structure matched but whose condition failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[ir.Node, list[tuple[int, str, str]]] = {}

    def log(self, rule, container, node, match_result, status) -> None:
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            entry = (len(match_result.nodes), str(rule), match_result.reason or "condition failed")
            self.failures.setdefault(node, []).append(entry)


def explain_failures(model: ir.Model, rule_sets) -> list[Skip]:
    """Dry-run the rule sets (no changes) and return one Skip per root node whose match failed its check."""
    log = _FailureLog()
    for _, rules in rule_sets:
        rules.apply_to_model(model, tracer=log)
    skips = []
    for node, entries in log.failures.items():
        size = max(e[0] for e in entries)  # keep the most specific (largest) matches
        reasons = dict.fromkeys(f"{rule}: {reason}" for n, rule, reason in entries if n == size)
        skips.append(Skip(node.name or node.outputs[0].name or node.op_type, "; ".join(reasons)))
    return skips


class NormFusionPass(GraphPass):
    """RMSNorm / residual+norm / GELU fusions into ORT's fused normalization and activation ops."""

    name = "norm_fusion"
    config_type = NormFusionConfig
    scope = "norm fusion"
    contrib_ops_note = (" (SimplifiedLayerNormalization, Skip*Normalization, FastGelu/BiasGelu are ORT extensions); "
                        "graph left as standard ONNX")
    count_keys = KINDS

    def run(self, model, report: PassReport) -> None:
        rule_sets = _rule_sets(self.config)
        for kind, rules in rule_sets:
            report.counts[kind] = rules.apply_to_model(model)
        report.skipped.extend(explain_failures(model, rule_sets))
        if any(report.counts.values()):
            model.opset_imports.setdefault("com.microsoft", 1)
            RemoveUnusedNodesPass()(model)  # the replaced subgraphs' exponent/epsilon constants
        ops = Counter((n.domain, n.op_type) for n in model.graph)
        report.details["fused_ops"] = {op: ops[(dom, op)] for dom, op in FUSED_OPS if ops[(dom, op)]}
