"""The pass infrastructure: every pass is an onnx-ir pass, gating is declared on the base, pipelines per target."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qvl.passes
from qvl.passes.attention_fusion import AttentionFusionPass
from qvl.passes.base import GraphPass, PassReport, PassResult, TargetCapabilities
from qvl.passes.norm_fusion import NormFusionPass
from qvl.passes.precision import PrecisionConfig, PrecisionPass
from qvl.passes.qdq_int8 import QdqInt8Config
from qvl.passes.sparsity import SparsityConfig
from qvl.toolchain.compile.pipelines import PIPELINES, PipelineOptions, pass_names, pipeline_for, run_pipeline
from qvl.toolchain.compile.targets import TARGETS, get_target

CPU = get_target("cpu-avx2")
SM61 = get_target("sm61")


def _pass_classes():
    for info in pkgutil.iter_modules(qvl.passes.__path__):
        module = importlib.import_module(f"qvl.passes.{info.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and name.endswith("Pass") and not name.startswith("_"):
                yield obj


def test_every_pass_class_is_an_onnx_ir_pass():
    classes = list(_pass_classes())
    assert len(classes) >= 8, classes
    for cls in classes:
        assert issubclass(cls, ir.passes.PassBase), cls
        if cls is not GraphPass:
            assert issubclass(cls, GraphPass) and issubclass(cls, ir.passes.InPlacePass), cls
            assert cls.config_type is not None and cls.name != "pass", cls
    # and every pass of every pipeline is one of them
    for target, stages in PIPELINES.items():
        assert all(cls in classes for _, cls in stages), target


def test_pipelines_differ_per_target_in_order():
    full = PipelineOptions(sparsity=SparsityConfig(), precision=PrecisionConfig(), qdq=QdqInt8Config())
    fusions = ["attention_fusion", "rotary_fusion", "vision_attention_fusion", "norm_fusion"]
    assert pass_names("cpu-avx2") == fusions
    assert pass_names("cpu-avx2", full) == [*fusions, "sparsity", "precision"]
    assert pass_names("cpu-avx2", PipelineOptions(precision=PrecisionConfig(weight_bits=4))) == [*fusions, "precision"]
    assert pass_names("sm61") == [*fusions, "opset_lowering"]
    assert pass_names("sm61", full) == [*fusions, "opset_lowering", "qdq_int8"]
    assert pass_names("sm61", full, stages=("lowering", "weights")) == ["opset_lowering", "qdq_int8"]
    assert pass_names("cpu-avx2", full) != pass_names("sm61", full)
    assert set(PIPELINES) == set(TARGETS)
    passes = pipeline_for("sm61", "decoder", full)
    assert all(p.target is SM61 and p.graph == "decoder" for p in passes)
    assert [type(p).__name__ for p in passes][-1] == "QdqInt8Pass" and passes[-1].config is full.qdq
    with pytest.raises(ValueError, match="unknown pipeline stage"):
        pass_names("cpu", stages=("nope",))


def _gelu_model(opset: int = 20) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], "g", [x], [y])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_gating_skips_with_the_declared_reason():
    model = _gelu_model()
    r = AttentionFusionPass(target=CPU, graph="vision")(model)
    assert isinstance(r, PassResult) and isinstance(r, ir.passes.PassResult) and r.model is model
    assert not r.modified and r.report.counts == {"group_query_attention": 0, "scatter_attention": 0}
    assert [(s.where, s.reason) for s in r.report.skipped] == [("vision", "graph not configured for decoder attention fusion")]
    r = NormFusionPass(target=SM61, graph="decoder")(model)
    assert r.report.skipped[0].reason == f"target sm61 has no ORT contrib ops{NormFusionPass.contrib_ops_note}"
    assert r.report.counts == dict.fromkeys(r.report.counts, 0) and len(r.report.counts) == 5  # zero counts still there
    no_int4 = TargetCapabilities("cpu-int8-only", int_weight_bits=(8,), ort_contrib_ops=True)
    r = PrecisionPass(PrecisionConfig(weight_bits=4), target=no_int4, graph="decoder")(model)
    assert r.report.skipped[0].reason == "target cpu-int8-only has no fast int4 weight kernels (int_weight_bits=[8])"

    class Probe(GraphPass):  # the base's declarations, on a pass of its own
        name = "probe"
        config_type = NormFusionPass.config_type
        scope = "probing"
        contrib_ops_note = " (Probe is an ORT extension)"

        def start(self, model, report: PassReport) -> None:
            report.counts["probed"] = 0

        def run(self, model, report: PassReport) -> None:
            report.counts["probed"] = 1

    assert Probe(target=CPU, graph="decoder").applies_to(CPU, "decoder") is None
    assert Probe(target=CPU, graph="decoder")(model).modified
    assert Probe(target=CPU, graph="other").applies_to(CPU, "other") == "graph not configured for probing"
    skipped = Probe(target=SM61, graph="vision")(model)
    assert not skipped.modified and skipped.report.skipped[0].reason == "target sm61 has no ORT contrib ops (Probe is an ORT extension)"


def test_pass_manager_over_a_pipeline_reports_modified():
    model = _gelu_model()
    passes = pipeline_for("sm61", "vision")
    result = ir.passes.PassManager(passes)(model)
    assert result.modified and result.model is model
    assert [p.report.name for p in passes] == pass_names("sm61")
    assert passes[-1].report.counts["opset_converted"] == 1 and model.opset_imports[""] == 17
    assert [p.report.skipped[0].reason.split(" (")[0].split(";")[0] for p in passes[:4]] == [
        "graph not configured for decoder attention fusion", "graph not configured for rotary fusion",
        "target sm61 has no ORT contrib ops", "target sm61 has no ORT contrib ops"]
    again, reports = run_pipeline(pipeline_for("sm61", "vision"), model)
    assert not again.modified and [r.name for r in reports] == pass_names("sm61")
    assert reports[-1].skipped[0].reason == "graph is opset 17, already <= 17: nothing to do"
    onnx.checker.check_model(ir.serde.serialize_model(model))
    # nothing to fuse on the CPU pipeline: not modified; an empty pass list is a no-op
    cpu = _gelu_model()
    assert not run_pipeline(pipeline_for("cpu-avx2", "vision"), cpu)[0].modified
    assert run_pipeline([], cpu)[1] == [] and not run_pipeline([], cpu)[0].modified


def test_one_budget_result_for_every_approximate_step():
    from qvl.toolchain.quant import accuracy_budget, sparsity_budget
    from qvl.toolchain.quant.accuracy_budget import AccuracyBudget, BudgetResult, Measurement

    m = Measurement(0.001, 0.002, 0.1, 0.01, 1.0, 4, 4)
    bad = Measurement(0.5, 0.9, 3.0, 0.5, 0.25, 2, 4)
    pruned = BudgetResult({"decoder.layers.0": "dense"}, m, bad, rolled_back=["decoder.layers.0"], within_budget=True,
                          all_applied_key="all_pruned")
    record = pruned.to_manifest(AccuracyBudget())
    assert pruned.all_pruned is bad and record["all_pruned"]["mean_kl"] == 0.5 and "all_quantized" not in record
    assert record["decisions"] == {"decoder.layers.0": "dense"} and record["rolled_back"] == ["decoder.layers.0"]
    quantized = BudgetResult({}, m, bad)
    assert quantized.all_quantized is bad and "all_quantized" in quantized.to_manifest(AccuracyBudget())
    # the sparsity budget returns the same class, built by the same driver
    assert sparsity_budget.BudgetResult is BudgetResult and sparsity_budget.budget_search is accuracy_budget.budget_search
