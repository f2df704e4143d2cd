"""Opset lowering for parsers with an opset ceiling (TensorRT 8.6's ONNX parser reads opset <= 17).

Two steps, in this order:

| count key          | what                                                                 | emitted ops                                        |
|--------------------|----------------------------------------------------------------------|----------------------------------------------------|
| `gelu_erf`         | `Gelu(x)` / `Gelu(x, approximate="none")` (opset 20, no earlier version) | `0.5*x * (1 + Erf(x / sqrt(2)))`                   |
| `gelu_tanh`        | `Gelu(x, approximate="tanh")`                                        | `0.5*x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715*x*x*x)))` |
| `opset_converted`  | the default-domain opset import `N` -> the target opset              | `onnx.version_converter` adapters                  |
| `stray_attributes` | attributes the converter leaves behind that the target version lacks | (removed)                                          |

The Gelu expansions are ONNX's own function body of `Gelu-20` (same constants, same operation order),
with the constants emitted directly in the input's dtype instead of `CastLike` and the cube written as
`x*x*x` (what PyTorch's tanh-GELU kernel computes; `Pow` with a negative base is a portability hazard for
GPU backends). Everything else is left to `onnx.version_converter`, which downgrades opset 18-20
ops that have an earlier form (e.g. `ReduceMean-18` `axes` input -> `ReduceMean-13` attribute).

The converter needs a `ModelProto`; the pass serializes the graph with every initializer of more than
`_BIG_TENSOR_ELEMENTS` elements turned into a graph input (the same technique as onnxscript's
`ConvertVersionPass`), so a multi-GB model never goes through protobuf and memory-mapped / external
weights are never read. The converted graph replaces the model's graph in place; the original
initializer tensors and every intermediate value's shape and type are carried over by name.

Known converter defect handled here: `ReduceMean-18 -> 13` keeps `noop_with_empty_axes` (an
opset-18 attribute), which ONNX Runtime and the checker reject at opset 17. Stray attributes at their
default value are removed; any other stray attribute is a skip with a reason and the graph keeps its
original opset.

Skips (graph unchanged) with a reason: no opset ceiling on the target, graph already at or below the
ceiling, an op with no version at or below the ceiling and no expansion here, a Gelu with an unknown
`approximate` value or unknown input dtype, or a converter failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from qvl.passes.base import GraphPass, PassReport, Skip, TargetCapabilities

GELU_SINCE = 20  # first (and only) default-domain version of Gelu
_BIG_TENSOR_ELEMENTS = 1000  # initializers above this travel as graph inputs through the converter
# Attributes a converter may leave behind, with the default value that makes dropping them exact.
_DROPPABLE_STRAY = {"noop_with_empty_axes": 0}


@dataclass(frozen=True)
class OpsetLoweringConfig:
    target_opset: int | None = None  # None: the target's `max_opset`


def _const(op, value: float, dtype: ir.DataType):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


class _GeluBase(pattern.RewriteRuleClassBase):
    approximate = "none"

    def pattern(self, op, x):
        return op.Gelu(x, _allow_other_attributes=True, _outputs=["gelu"])

    def check(self, context, x, gelu, **_) -> MatchResult:
        result = MatchResult()
        node = gelu.producer()
        if node.domain not in ("", "ai.onnx"):
            return result.fail(f"Gelu of domain {node.domain!r} is not the ONNX op")
        approximate = node.attributes.get_string("approximate", "none")
        if approximate not in ("none", "tanh"):
            return result.fail(f"unknown Gelu approximate={approximate!r}")
        if approximate != self.approximate:
            return result.fail(f"approximate={approximate!r} is the other expansion")
        if x.dtype is None or not x.dtype.is_floating_point():
            return result.fail(f"Gelu input dtype {x.dtype} unknown or not floating point", x)
        return result


class _ErfGelu(_GeluBase):
    approximate = "none"

    def rewrite(self, op, x, **_):
        dt = x.dtype
        phi = op.Add(_const(op, 1.0, dt), op.Erf(op.Div(x, _const(op, np.sqrt(2.0), dt))))
        return op.Mul(op.Mul(_const(op, 0.5, dt), x), phi)


class _TanhGelu(_GeluBase):
    approximate = "tanh"

    def rewrite(self, op, x, **_):
        dt = x.dtype
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Mul(_const(op, np.sqrt(2.0 / np.pi), dt), op.Add(x, op.Mul(_const(op, 0.044715, dt), cube)))
        phi = op.Add(_const(op, 1.0, dt), op.Tanh(inner))
        return op.Mul(op.Mul(_const(op, 0.5, dt), x), phi)


def _unlowerable_ops(model: ir.Model, target_opset: int) -> list[tuple[str, str]]:
    """(node name, op) of default-domain nodes with no version <= target_opset."""
    import onnx.defs

    bad = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, target_opset, "")
        except onnx.defs.SchemaError:
            bad.append((node.name or node.op_type, node.op_type))
    return bad


def _convert_opset(model: ir.Model, target_opset: int) -> ir.Graph:
    """onnx.version_converter on the model with big initializers detached; returns the converted graph."""
    import onnx.version_converter

    graph = model.graph
    n_inputs = len(graph.inputs)
    detached: dict[str, ir.Value] = {}
    tensors = {name: v.const_value for name, v in graph.initializers.items()}
    for name, value in list(graph.initializers.items()):
        t = value.const_value
        if t is None or t.size <= _BIG_TENSOR_ELEMENTS:
            continue
        if value.shape is None:
            value.shape = t.shape
        if value.dtype is None:
            value.dtype = t.dtype
        value.const_value = None
        graph.initializers.pop(name)
        graph.inputs.append(value)
        detached[name] = value
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, value in detached.items():
            value.const_value = tensors[name]
            graph.register_initializer(value)
        del graph.inputs[n_inputs:]
    converted = ir.serde.deserialize_model(onnx.version_converter.convert_version(proto, target_opset))
    new_graph = converted.graph
    new_inputs = list(new_graph.inputs)
    for value in new_inputs[n_inputs:]:
        value.const_value = tensors[value.name]
        new_graph.register_initializer(value)
    del new_graph.inputs[n_inputs:]
    # Intermediate shapes/types: the converter drops value_info; carry them over by name.
    old = {v.name: v for v in _all_values(graph)}
    for v in _all_values(new_graph):
        src = old.get(v.name)
        if src is not None:
            if v.shape is None and src.shape is not None:
                v.shape = src.shape
            if v.type is None and src.type is not None:
                v.type = src.type
    return new_graph


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _stray_attributes(graph: ir.Graph, target_opset: int) -> tuple[int, list[str]]:
    """Remove default-valued attributes the target schema lacks; return (removed, problems)."""
    import onnx.defs

    removed, problems = 0, []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        schema = onnx.defs.get_schema(node.op_type, target_opset, "")
        for name in list(node.attributes):
            if name in schema.attributes:
                continue
            attr = node.attributes[name]
            default = _DROPPABLE_STRAY.get(name)
            if default is not None and attr.type == ir.AttributeType.INT and attr.as_int() == default:
                del node.attributes[name]
                removed += 1
            else:
                problems.append(f"{node.name or node.op_type}: {node.op_type}-{schema.since_version} has no attribute {name!r}")
    return removed, problems


class OpsetLoweringPass(GraphPass):
    """Expand ops newer than the target opset (Gelu-20), then version-convert the graph down to it."""

    name = "opset_lowering"
    config_type = OpsetLoweringConfig
    count_keys = ("gelu_erf", "gelu_tanh", "opset_converted", "stray_attributes")

    def applies_to(self, target: TargetCapabilities, graph: str) -> str | None:
        if (self.config.target_opset or target.max_opset) is None:
            return f"target {target.name} has no ONNX opset ceiling: nothing to lower"
        return super().applies_to(target, graph)

    def run(self, model, report: PassReport) -> None:
        graph_name = self.graph
        target_opset = self.config.target_opset or self.target.max_opset
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or opset <= target_opset:
            report.skipped.append(Skip(graph_name, f"graph is opset {opset}, already <= {target_opset}: nothing to do"))
            return
        report.details.update(from_opset=opset, to_opset=target_opset)
        if target_opset < GELU_SINCE:
            for key, rule in (("gelu_erf", _ErfGelu), ("gelu_tanh", _TanhGelu)):
                report.counts[key] = pattern.RewriteRuleSet([rule.rule(f"Gelu_{rule.approximate}")]).apply_to_model(model)
            for node in model.graph:
                if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
                    approx = node.attributes.get_string("approximate", "none")
                    report.skipped.append(Skip(node.name, f"Gelu(approximate={approx!r}) not expanded (unknown mode or input dtype)"))
        bad = _unlowerable_ops(model, target_opset)
        if bad:
            ops = sorted({op for _, op in bad})
            report.skipped.append(Skip(graph_name, f"op(s) {', '.join(ops)} have no version <= {target_opset} and no expansion; graph stays opset {opset}"))
            return
        if model.functions:
            report.skipped.append(Skip(graph_name, "model-local functions are not version-converted; graph stays opset " f"{opset}"))
            return
        try:
            new_graph = _convert_opset(model, target_opset)
        except Exception as exc:  # the C++ converter raises plain RuntimeError/ConvertError
            report.skipped.append(Skip(graph_name, f"onnx.version_converter failed: {str(exc).splitlines()[0]}"))
            return
        removed, problems = _stray_attributes(new_graph, target_opset)
        if problems:
            report.skipped.append(Skip(graph_name, "converted graph invalid at target opset: " + "; ".join(problems[:3])))
            return
        model.graph = new_graph
        report.counts["opset_converted"] = 1
        report.counts["stray_attributes"] = removed
