"""The ORT CUDA compile targets and the device-resident decode path, tested on ONNX Runtime's CPU provider.

`cuda-sm61` artifacts are standard ONNX (TensorScatter + Attention, opset 24) plus the fp32 contrib ops that
ORT's CUDA provider has (MatMulNBits, RotaryEmbedding, SimplifiedLayerNormalization, MultiHeadAttention), so
the CPU provider runs the very same graphs: parity, the in-place cache and `next_token` are proven here; speed
and CUDA graph capture only on a GPU (benchmarks/, `qvl-compile bench --device cuda`).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from conftest import run_cli
from qvl.passes.base import TargetCapabilities
from qvl.passes.device_argmax import DeviceArgmaxPass
from qvl.toolchain.compile.targets import get_target

CUDA = TargetCapabilities("cuda-sm61", ort_contrib_ops=True, kv_cache="tensor-scatter", provider="cuda")
CPU = TargetCapabilities("cpu-avx2", ort_contrib_ops=True)


# -- the capability tables ------------------------------------------------------------------------------


def test_gpu_targets_never_choose_fp16_for_pascal():
    sm61 = get_target("cuda-sm61")
    assert sm61.activation_dtype == "float32" and "float16" not in sm61.fast_dtypes
    assert sm61.kv_cache == "tensor-scatter"  # GQA's CUDA kernel is fp16/bf16 only
    assert sm61.provider == "cuda" and 4 in sm61.int_weight_bits and 8 in sm61.int_weight_bits
    cuda = get_target("cuda")
    assert cuda.activation_dtype == "float16" and cuda.kv_cache == "gqa-shared" and cuda.provider == "cuda"


# -- device_argmax --------------------------------------------------------------------------------------


def _logits_graph() -> ir.Model:
    node = helper.make_node("Identity", ["x"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, ["B", "S", 7])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["B", "S", 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def _run(model: ir.Model, x: np.ndarray):
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_device_argmax_adds_next_token_equal_to_numpy_argmax():
    model = _logits_graph()
    result = DeviceArgmaxPass(target=CUDA, graph="decoder")(model)
    assert result.report.counts == {"next_token_outputs": 1, "next_tokens_outputs": 0}  # no logit_positions input
    assert [n.op_type for n in model.graph] == ["Identity", "Gather", "ArgMax"]
    assert [o.name for o in model.graph.outputs] == ["logits", "next_token"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)
    x[1, -1, 2] = x[1, -1, 5] = 9.0  # a tie: first index wins, as in numpy / torch
    logits, token = _run(model, x)
    np.testing.assert_array_equal(logits, x)  # logits unchanged (exact)
    np.testing.assert_array_equal(token, np.argmax(x[:, -1, :], axis=-1))
    assert token.dtype == np.int64 and token[1] == 2


def test_device_argmax_is_idempotent_and_skips_cpu_targets():
    model = _logits_graph()
    DeviceArgmaxPass(target=CUDA, graph="decoder")(model)
    again = DeviceArgmaxPass(target=CUDA, graph="decoder")(model)
    assert again.report.counts == {"next_token_outputs": 0, "next_tokens_outputs": 0} and not again.modified
    assert [n.op_type for n in model.graph] == ["Identity", "Gather", "ArgMax"]
    cpu_model = _logits_graph()
    skipped = DeviceArgmaxPass(target=CPU, graph="decoder")(cpu_model)
    assert skipped.report.counts == {"next_token_outputs": 0, "next_tokens_outputs": 0}
    assert "already on the host" in skipped.report.skipped[0].reason
    assert [o.name for o in cpu_model.graph.outputs] == ["logits"]


# -- the compiled cuda-sm61 artifact ------------------------------------------------------------------


def test_cuda_sm61_artifact_is_fp32_standard_attention_with_an_in_place_cache(sm61_cuda_artifact):
    manifest = json.loads((sm61_cuda_artifact / "manifest.json").read_text())
    assert manifest["target"] == "cuda-sm61" and manifest["decoder"]["kv_mode"] == "scatter"
    assert "ort_optimized" not in manifest  # the CPU provider's saved graphs would pin CPU kernels
    dec = onnx.load(str(sm61_cuda_artifact / manifest["graphs"]["decoder"]["file"]), load_external_data=False)
    ops = {n.op_type for n in dec.graph.node}
    layers = manifest["model"]["num_layers"]
    assert sum(n.op_type == "TensorScatter" for n in dec.graph.node) == 2 * layers
    assert sum(n.op_type == "Attention" for n in dec.graph.node) == layers
    assert "GroupQueryAttention" not in ops and "Softmax" not in ops
    assert {o.domain or "" for o in dec.opset_import} >= {"", "com.microsoft"}
    assert next(o.version for o in dec.opset_import if o.domain in ("", "ai.onnx")) == 24
    assert [o.name for o in dec.graph.output][:1] == ["logits"] and "next_token" in [o.name for o in dec.graph.output]
    floats = {t.data_type for t in dec.graph.initializer if t.data_type in (T.FLOAT, T.FLOAT16, T.BFLOAT16)}
    assert floats <= {T.FLOAT}  # fp32 throughout: never fp16 for Pascal


def test_cuda_sm61_artifact_passes_parity_on_the_cpu_provider(sm61_cuda_artifact, tiny_checkpoint):
    proc = run_cli("parity", str(sm61_cuda_artifact), "--checkpoint", str(tiny_checkpoint), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_cuda_int4_artifact_merges_sibling_linears_after_quantizing(sm61_cuda_int4):
    manifest = json.loads((sm61_cuda_int4 / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]][-2:] == ["precision", "packing"]
    layers = manifest["model"]["num_layers"]
    assert manifest["packing"]["graphs"]["decoder"]["counts"]["matmulnbits_groups"] == 2 * layers  # qkv, gate/up
    assert manifest["precision"]["config"]["accuracy_level"] == 0  # what ORT's CUDA kernel computes
    dec = onnx.load(str(sm61_cuda_int4 / manifest["graphs"]["decoder"]["file"]), load_external_data=False)
    ops = [n.op_type for n in dec.graph.node]
    assert ops.count("MatMulNBits") == 4 * layers + 1  # qkv, o, gate_up, down per layer + the tied lm_head
    assert ops.count("Split") == 2 * layers and "MatMul" not in ops


def test_scatter_engine_greedy_step_equals_step_argmax_and_reuses_nothing_on_cpu(sm61_cuda_int4):
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.mrope import decode_position_ids

    eng = Engine(sm61_cuda_int4, device="cpu")
    assert eng.kv_mode == "scatter" and eng.caches.has_next_token and not eng.caches.cuda_graph
    rng = np.random.default_rng(0)
    h = eng.hidden_size
    prompt = rng.standard_normal((1, 9, h)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (3, 1, 9)).copy()
    a, b = eng.new_cache(16), eng.new_cache(16)
    assert a.capacity == 16 and a.tensors[0].shape() == [1, eng.num_kv_heads, 16, eng.head_dim]
    logits = eng.step(a, prompt, pos)
    token = eng.greedy_step(b, prompt, pos)
    assert token.tolist() == [int(np.argmax(logits[0]))]
    for _ in range(5):  # one-token steps: same ids either way, cache lengths in step
        x = eng.embed([int(token[0])])[None]
        p = decode_position_ids(a.length, 1, 0)
        logits = eng.step(a, x, p)
        token = eng.greedy_step(b, x, p)
        assert token.tolist() == [int(np.argmax(logits[0]))]
    assert a.length == b.length == 14
    with pytest.raises(Exception, match="exceeds the preallocated cache of 16"):
        eng.step(a, rng.standard_normal((1, 3, h)).astype(np.float32), np.zeros((3, 1, 3), np.int64))
    eng.free(a)
    assert a.tensors == [] and a.capacity == 0


def test_model_on_device_argmax_path_matches_the_logits_path(sm61_cuda_int4):
    from qvl.runtime.model import Model
    from qvl.runtime.sampling import SamplingConfig

    model = Model(sm61_cuda_int4, device="cpu")
    prompt = model.prepare([{"role": "user", "content": "hello there, what is this?"}])
    fast = [t for t, _ in model.generate_ids(prompt, 12, ignore_stop=True)]  # greedy: greedy_step
    slow = [t for t, _ in model.generate_ids(prompt, 12, keep_logits=True, ignore_stop=True)]  # logits on the host
    penalised = [t for t, _ in model.generate_ids(prompt, 12, SamplingConfig(do_sample=False, repetition_penalty=1.3),
                                                  ignore_stop=True)]
    assert fast == slow and len(fast) == 12
    assert len(penalised) == 12  # the penalty needs the logits: the host path


def test_auto_keeps_a_cuda_artifact_on_cpu_without_the_provider_and_says_why(sm61_cuda_artifact):
    from qvl.runtime.backends.select import resolve

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu: the fallback path is the CPU-only CI machine's")
    sel = resolve(sm61_cuda_artifact, "auto")
    assert sel.device == "cpu" and "no CUDA provider" in sel.note


# -- the fp16 `cuda` target ---------------------------------------------------------------------------------

# Measured on the tiny checkpoint (ORT CPU and ORT CUDA on an H200 agree): max |Δlogit| 0.055-0.058 and vision
# 0.0032-0.0036 against eager fp32; these bounds leave under 2x margin above that, far below what a wrong
# conversion gives (a rotary or cache dtype error moves logits by whole units).
FP16_LOGIT_TOL, FP16_VISION_TOL = "0.1", "0.01"


@pytest.fixture(scope="module")
def cuda_fp16_artifact(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-fp16") / "art"
    proc = run_cli("compile", str(tiny_artifact), "--target", "cuda", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_cuda_target_is_fp16_gqa_with_a_float16_cache(cuda_fp16_artifact):
    manifest = json.loads((cuda_fp16_artifact / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["decoder"]["kv_mode"] == "shared"
    assert manifest["activations"]["dtype"] == "float16"
    assert [s["name"] for s in manifest["steps"]][-1] == "activations"
    dec = onnx.load(str(cuda_fp16_artifact / manifest["graphs"]["decoder"]["file"]), load_external_data=False)
    io = {v.name: v.type.tensor_type.elem_type for v in [*dec.graph.input, *dec.graph.output]}
    assert io["past_key_0"] == io["present_value_0"] == T.FLOAT16  # GQA's CUDA kernel: fp16 cache
    assert io["inputs_embeds"] == io["logits"] == T.FLOAT  # the runtime's contract stays fp32
    assert "GroupQueryAttention" in {n.op_type for n in dec.graph.node}
    from qvl.runtime.backends.ort import Engine

    eng = Engine(cuda_fp16_artifact, device="cpu")
    cache = eng.new_cache(8)
    assert eng.caches.kv_dtype == np.float16 and cache.tensors[0].data_type() == "tensor(float16)"


def test_cuda_target_passes_parity_within_the_fp16_tolerance(cuda_fp16_artifact, tiny_checkpoint):
    proc = run_cli("parity", str(cuda_fp16_artifact), "--checkpoint", str(tiny_checkpoint), "--json",
                   "--logit-tol", FP16_LOGIT_TOL, "--vision-tol", FP16_VISION_TOL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    worst = max(c["max_abs_logit_diff"] for c in report["cases"])
    assert 1e-3 < worst <= float(FP16_LOGIT_TOL)  # really fp16 (an fp32 graph would be ~1e-5), and within bounds
    assert all(c["greedy_identical"] for c in report["cases"])
    assert report["logit_tolerance"] == float(FP16_LOGIT_TOL) and report["vision_tolerance"] == float(FP16_VISION_TOL)
    assert worst > 1e-4  # the default (fp32) tolerance would reject it: the fp16 bound is stated, not silent


def test_parity_and_bench_option_errors(cuda_fp16_artifact, tiny_checkpoint):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("parity", str(cuda_fp16_artifact), "--checkpoint", str(tiny_checkpoint),
                                  "--device", "auto"), "explicit --device")
    assert_one_line_error(run_cli("parity", str(cuda_fp16_artifact), "--checkpoint", str(tiny_checkpoint),
                                  "--logit-tol", "nan"), "--logit-tol must be a positive number")
    assert_one_line_error(run_cli("bench", str(cuda_fp16_artifact), "--checkpoint", str(tiny_checkpoint),
                                  "--eager-dtype", "bf16,fp8"), "unknown --eager-dtype")
    assert_one_line_error(run_cli("bench", str(cuda_fp16_artifact), "--checkpoint", str(tiny_checkpoint),
                                  "--eager-cache", "paged"), "unknown --eager-cache")
