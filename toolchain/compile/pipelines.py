"""The per-target pass pipelines: every pass that rewrites graphs for a target, in order, here and only here.

Each target's list is a sequence of (stage, pass class). Stages are run at different points of the job,
because artifacts are written in between (the approximate stages are measured against the exact artifact):

| stage      | run by                                                        | included                          |
|------------|---------------------------------------------------------------|-----------------------------------|
| `fusion`   | `toolchain/compile/pipeline.py: compile_artifact`             | always (passes skip with reasons) |
| `lowering` | `toolchain/tensorrt/kit.py: make_engine_kit`                  | always                            |
| `sparsity` | `toolchain/quant/sparsity_budget.py: sparsify_artifact`       | only with a `SparsityConfig`      |
| `weights`  | `toolchain/quant/accuracy_budget.py: quantize_artifact` (ORT: MatMulNBits) / `toolchain/tensorrt/int8_kit.py: write_qdq_kit` (TensorRT: Q/DQ) | only with that pass's config |
| `packing`  | `toolchain/compile/pipeline.py: apply_packing` (after `weights`)                 | CUDA targets (CPU: issue #16 measures it first) |
| `activations` | `toolchain/compile/pipeline.py: apply_activations` (after `weights`: the quantizer reads fp32 weights) | targets that compute in fp16 (`cuda`) |

`pipeline_for(target, graph, ...)` builds the pass instances for one artifact graph ("vision" / "decoder")
bound to the target; `run_pipeline` runs them through `onnx_ir.passes.PassManager` and returns onnx-ir's
result plus every pass's report. A pass that does not apply to a graph or target still runs and reports
why (`GraphPass.applies_to`), so the manifest explains what each target skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import onnx_ir as ir

from qvl.passes.attention_fusion import AttentionFusionPass
from qvl.passes.base import GraphPass, PassReport, TargetCapabilities
from qvl.passes.device_argmax import DeviceArgmaxPass
from qvl.passes.float16_activations import Float16ActivationsPass
from qvl.passes.linear_fusion import SiblingLinearFusionPass
from qvl.passes.norm_fusion import NormFusionPass
from qvl.passes.opset_lowering import OpsetLoweringPass
from qvl.passes.precision import PrecisionConfig, PrecisionPass
from qvl.passes.qdq_int8 import QdqInt8Config, QdqInt8Pass
from qvl.passes.rotary_fusion import RotaryFusionPass
from qvl.passes.sparsity import MlpChannelSparsityPass, SparsityConfig
from qvl.passes.vision_attention_fusion import VisionAttentionFusionPass
from qvl.toolchain.compile.targets import get_target

STAGES = ("fusion", "lowering", "sparsity", "weights", "packing", "activations")

_FUSIONS = (
    ("fusion", AttentionFusionPass),
    ("fusion", RotaryFusionPass),
    ("fusion", VisionAttentionFusionPass),
    ("fusion", NormFusionPass),
)

# ONNX Runtime CPU: contrib-op fusions, then the approximate steps (MLP channel sparsity runs before the
# weight-only quantization because it needs fp32 [K, F] weights).
CPU_PIPELINE = (*_FUSIONS, ("sparsity", MlpChannelSparsityPass), ("weights", PrecisionPass))
# TensorRT: the fusions only report why they skip (no contrib ops); the parser's opset ceiling; explicit
# calibrated INT8 Q/DQ (needs the lowered opset).
TRT_PIPELINE = (*_FUSIONS, ("lowering", OpsetLoweringPass), ("weights", QdqInt8Pass))

# ONNX Runtime CUDA: the same fusions (attention_fusion emits the target's KV form: TensorScatter + Attention in
# fp32 for Pascal, fp16 GroupQueryAttention for SM 7.5+) and weight-only MatMulNBits (fp32 and fp16 CUDA kernels).
# `device_argmax` adds the decoder's `next_token` output so greedy decoding reads 8 bytes back per token.
# `packing` merges q/k/v and gate/up into one linear each (exact): at batch 1 every GEMV is a kernel that costs
# 7-16 us on a GPU whatever its size (benchmarks/matmulnbits-cuda-speed-h200.txt); it runs after the weight
# steps, which measure and roll back per original layer.
CUDA_SM61_PIPELINE = (*_FUSIONS, ("fusion", DeviceArgmaxPass), ("sparsity", MlpChannelSparsityPass),
                      ("weights", PrecisionPass), ("packing", SiblingLinearFusionPass))
# SM 7.5+: the same, then every activation (and the KV cache) in fp16 -- GroupQueryAttention's CUDA kernel.
CUDA_PIPELINE = (*CUDA_SM61_PIPELINE, ("activations", Float16ActivationsPass))

PIPELINES: dict[str, tuple[tuple[str, type[GraphPass]], ...]] = {
    "cpu-avx2": CPU_PIPELINE,
    "cpu-avx512": CPU_PIPELINE,
    "cuda-sm61": CUDA_SM61_PIPELINE,
    "cuda": CUDA_PIPELINE,
    "sm61": TRT_PIPELINE,
    "sm75+": TRT_PIPELINE,
}


@dataclass(frozen=True)
class PipelineOptions:
    """Configs of the optional (approximate) passes; a pass whose option is None is not in the pipeline."""

    sparsity: SparsityConfig | None = None
    precision: PrecisionConfig | None = None  # ORT targets: weight-only int8/int4 (MatMulNBits)
    qdq: QdqInt8Config | None = None  # TensorRT targets: explicit INT8 Q/DQ

    def config_for(self, cls: type[GraphPass]):
        """(included, config) of a pass class: optional passes need their config, the others use defaults."""
        optional = {MlpChannelSparsityPass: self.sparsity, PrecisionPass: self.precision, QdqInt8Pass: self.qdq}
        if cls in optional:
            return optional[cls] is not None, optional[cls]
        return True, None


def _target(target: str | TargetCapabilities) -> TargetCapabilities:
    return get_target(target) if isinstance(target, str) else target


def pass_classes(target: str | TargetCapabilities, options: PipelineOptions = PipelineOptions(),
                 stages: Iterable[str] | None = None) -> list[type[GraphPass]]:
    """The target's pass classes in order, for the given options and stages (default: all stages)."""
    caps = _target(target)
    wanted = STAGES if stages is None else tuple(stages)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {sorted(unknown)}; stages: {STAGES}")
    return [cls for stage, cls in PIPELINES[caps.name] if stage in wanted and options.config_for(cls)[0]]


def has_stage(target: str | TargetCapabilities, stage: str) -> bool:
    return any(s == stage for s, _ in PIPELINES[_target(target).name])


def pass_names(target: str | TargetCapabilities, options: PipelineOptions = PipelineOptions(),
               stages: Iterable[str] | None = None) -> list[str]:
    return [cls.name for cls in pass_classes(target, options, stages)]


def pipeline_for(target: str | TargetCapabilities, graph: str, options: PipelineOptions = PipelineOptions(),
                 stages: Iterable[str] | None = None) -> list[GraphPass]:
    """The target's passes for one artifact graph, bound to the target and the graph, in order."""
    caps = _target(target)
    return [cls(options.config_for(cls)[1], target=caps, graph=graph) for cls in pass_classes(caps, options, stages)]


def run_pipeline(passes: list[GraphPass], model: ir.Model) -> tuple[ir.passes.PassResult, list[PassReport]]:
    """Run `passes` on `model` through onnx-ir's PassManager (one step); returns its result and every report."""
    if not passes:
        return ir.passes.PassResult(model, False), []
    result = ir.passes.PassManager(passes, steps=1)(model)
    return result, [p.report for p in passes]


def run_stage(target: str | TargetCapabilities, graphs: dict, stage: str,
              options: PipelineOptions = PipelineOptions()) -> dict[str, PassReport]:
    """Run one single-pass stage of the target's pipeline (an approximate step: `sparsity`, `weights`) on every
    graph of an artifact ({name: model}, in place); returns that pass's report per graph."""
    caps = _target(target)
    classes = pass_classes(caps, options, (stage,))
    if len(classes) != 1:
        raise ValueError(f"target {caps.name}: stage {stage!r} has {[c.name for c in classes]} with these options, "
                         "not exactly one pass")
    return {name: run_pipeline(pipeline_for(caps, name, options, (stage,)), model)[1][0] for name, model in graphs.items()}
