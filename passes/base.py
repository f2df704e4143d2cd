"""Common shape of every graph-rewrite pass.

A pass is one file in `passes/` with one class `XxxPass`, configured by a frozen dataclass, working on an
onnx-ir model in place and returning a `PassResult` whose `PassReport` (counts, skipped sites with reasons,
seconds) goes into the artifact manifest. Passes never import a backend; a pass may read a
`TargetCapabilities` description (what the target computes fast and which fused ops it has).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TargetCapabilities:
    """What a compile target offers a pass (filled in by `toolchain/compile/targets.py`)."""

    name: str
    fast_dtypes: tuple[str, ...] = ("float32",)  # activation dtypes computed at full rate
    int_weight_bits: tuple[int, ...] = ()  # weight-only integer widths with fast kernels
    ort_contrib_ops: bool = False  # may emit com.microsoft ops (ORT CPU/CUDA); False for TensorRT
    max_opset: int | None = None  # e.g. 17 for TensorRT 8.6's ONNX parser
    memory_bytes: int | None = None


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
class PassResult:
    model: Any  # onnx_ir.Model (modified in place)
    report: PassReport

    @property
    def modified(self) -> bool:
        return any(v for v in self.report.counts.values())


class GraphPass:
    """Base for passes: subclasses set `name`, take a frozen config, implement `run`.

    `__call__(model, target, graph_name)` times the run and returns a PassResult; `graph_name` is the
    artifact's graph key ("vision" or "decoder") so a pass can skip graphs it does not apply to.
    """

    name = "pass"

    def __init__(self, config=None):
        self.config = config

    def run(self, model, target: TargetCapabilities, graph_name: str, report: PassReport) -> None:
        raise NotImplementedError

    def __call__(self, model, target: TargetCapabilities, graph_name: str) -> PassResult:
        report = PassReport(name=self.name)
        t0 = time.perf_counter()
        self.run(model, target, graph_name, report)
        report.seconds = round(time.perf_counter() - t0, 4)
        return PassResult(model, report)


def initializer_ints(value) -> list[int] | None:
    """The integers of an initializer input (a value with `const_value`), flattened; None otherwise."""
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in np.asarray(value.const_value.numpy()).reshape(-1)]
