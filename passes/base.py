"""Common shape of every graph-rewrite pass.

A pass is one file in `passes/` with one class `XxxPass`: an `onnx_ir.passes.InPlacePass` configured by a
frozen dataclass and bound at construction to a target and an artifact graph, returning a `PassResult`
(onnx-ir's, plus a `PassReport`: counts, skipped sites with reasons, seconds) that goes into the artifact
manifest. Per-target pass lists: `toolchain/compile/pipelines.py`. Passes never import a backend; a pass may read a
`TargetCapabilities` description (what the target computes fast and which fused ops it has).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class TargetCapabilities:
    """What a compile target offers a pass (filled in by `toolchain/compile/targets.py`)."""

    name: str
    fast_dtypes: tuple[str, ...] = ("float32",)  # activation dtypes computed at full rate
    int_weight_bits: tuple[int, ...] = ()  # weight-only integer widths with fast kernels
    ort_contrib_ops: bool = False  # may emit com.microsoft ops (ORT CPU/CUDA); False for TensorRT
    max_opset: int | None = None  # e.g. 17 for TensorRT 8.6's ONNX parser
    memory_bytes: int | None = None
    # How the decoder's KV cache is written (attention_fusion reads it):
    #   "gqa-shared":     com.microsoft GroupQueryAttention, one buffer bound as past and present (ORT CPU; ORT CUDA
    #                     in fp16/bf16 -- its CUDA kernel has no fp32 variant)
    #   "tensor-scatter": standard ONNX TensorScatter (opset 24) writes the new positions into a fixed-capacity
    #                     buffer in place and ONNX Attention (opset 23) reads it under a causal mask: fp32 on ORT CUDA
    #   "concat":         the exported concat form (TensorRT parses and fuses it itself)
    kv_cache: str = "gqa-shared"
    activation_dtype: str = "float32"  # the dtype decoder/vision activations are computed in
    provider: str = "cpu"  # "cpu" | "cuda" (ONNX Runtime) | "tensorrt": where the artifact is meant to run
    # Asymmetric int4 (per-block zero points) in MatMulNBits with accuracy_level 4: onnxruntime issue #29853 reports
    # ~46 % error in that decode kernel on AVX2-only CPUs, so the AVX2 target refuses it (symmetric int4 is fine).
    asymmetric_int4_int8_compute: bool = True
    # Graphs whose weight-only linears the `weights` stage lowers to DynamicQuantizeMatMul (MLAS int8 GEMM) instead of
    # MatMulNBits: the compute-bound phases (many rows per call) where it measures faster (`toolchain/eval/gemm_rates.py`)
    dynamic_int8_graphs: tuple[str, ...] = ()
    # Largest |code| of those DynamicQuantizeMatMul weights. MLAS's u8s8 GEMM without VNNI (AVX2, AVX-512BW) sums
    # pairs of u8 x s8 products into int16 with saturation (vpmaddubsw): 2 x 255 x 127 > 32767 overflows and
    # measured 10 % max error at the vision shape; codes within +-63 (2 x 255 x 63 = 32130) cannot saturate.
    # 127 only where the kernel accumulates in int32 (VNNI vpdpbusd).
    dynamic_int8_weight_max: int = 63
    # The int8 MatMulNBits block the compile takes when the user gives none and every K allows it. CPU targets: 128
    # (qvl's CPU kernel at 2B: decode 1.3x block 32's, prefill 1.6x; sentinel accuracy unchanged, benchmarks/README.md)
    int8_block_size: int = 32


@dataclass
class Skip:
    where: str
    reason: str


@dataclass
class PassReport:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's `PassResult(model, modified)` plus the pass's structured report."""

    report: PassReport | None = None


class GraphPass(ir.passes.InPlacePass):
    """Base for qvl passes: an onnx-ir in-place pass bound to one target and one artifact graph.

    `XxxPass(config, target=CAPS, graph="decoder")(model)` -> `PassResult(model, modified, report)`; the same
    instance runs under `ir.passes.PassManager` / `Sequential`, which keep only `modified`: the last run's
    report stays readable as `pass_.report`. Subclasses set `name`, `config_type` (the frozen config class),
    implement `run(model, report)` and declare their gating instead of repeating it:

    * `scope`: when the config has `graphs` and the bound graph is not in it, skip with
      "graph not configured for {scope}";
    * `contrib_ops_note`: the pass emits ORT contrib ops; on a target without them skip with
      "target {name} has no ORT contrib ops{contrib_ops_note}";
    * anything target-specific beyond that: extend `applies_to` (call `super()` first).

    `count_keys` are the report's counts, zeroed before gating so a skipped pass reports the same keys as one
    that ran (extend `start(model, report)` for details). `modified` is true when any count is non-zero.
    """

    name = "pass"
    config_type: type | None = None
    scope: str | None = None
    contrib_ops_note: str | None = None
    count_keys: tuple[str, ...] = ()

    def __init__(self, config=None, *, target: TargetCapabilities, graph: str):
        self.config = config if config is not None or self.config_type is None else self.config_type()
        self.target = target
        self.graph = graph
        self.report: PassReport | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target.name!r}, graph={self.graph!r})"

    def applies_to(self, target: TargetCapabilities, graph: str) -> str | None:
        """Why this pass does nothing on (target, graph), or None when it applies."""
        graphs = getattr(self.config, "graphs", None)
        if self.scope is not None and graphs is not None and graph not in graphs:
            return f"graph not configured for {self.scope}"
        if self.contrib_ops_note is not None and not target.ort_contrib_ops:
            return f"target {target.name} has no ORT contrib ops{self.contrib_ops_note}"
        return None

    def start(self, model, report: PassReport) -> None:
        """Zero counts (and, in subclasses, details) of the report, before gating."""
        report.counts.update(dict.fromkeys(self.count_keys, 0))

    def run(self, model, report: PassReport) -> None:
        raise NotImplementedError

    def call(self, model) -> PassResult:
        report = PassReport(name=self.name)
        t0 = time.perf_counter()
        self.start(model, report)
        reason = self.applies_to(self.target, self.graph)
        if reason is not None:
            report.skipped.append(Skip(self.graph, reason))
        else:
            self.run(model, report)
        report.seconds = round(time.perf_counter() - t0, 4)
        self.report = report
        return PassResult(model, any(v for v in report.counts.values()), report)


def check_shape(bindings: dict, value, dims) -> bool:
    """`value`'s shape is `dims` (symbolic names bound on first sight, equal after): onnxscript's private
    `rewriter._fusion_utils.check_shape_bool`, kept here so no pass imports onnxscript private modules."""
    if value is None or value.shape is None or value.shape.rank() != len(dims):
        return False
    for actual, expected in zip(value.shape, dims):
        if expected not in bindings:
            bindings[expected] = actual
        elif actual != bindings[expected]:
            return False
    return True


def initializer_ints(value) -> list[int] | None:
    """The integers of an initializer input (a value with `const_value`), flattened; None otherwise."""
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in np.asarray(value.const_value.numpy()).reshape(-1)]


def scalar_const(value) -> float | None:
    """The float of a one-element constant value; None otherwise."""
    if value is None or value.const_value is None:
        return None
    arr = value.const_value.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None
