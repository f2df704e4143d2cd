"""qvl's AVX2 int4 / int8 kernel (runtime/kernels) against ORT's MatMulNBits, and the runtime's use of it.

* bit-for-bit: inputs whose every intermediate is exact in float32 (activation blocks whose amax is 127 * 2^e with
  integer multiples of 2^e, power-of-two weight scales) make summation order irrelevant, so both kernels must agree
  to the last bit: nibble order, zero point, block and scale indexing, activation rounding, row tails;
* random inputs: equal within float32 summation-order rounding;
* the graph rewrite: exact op list, the skip reason of every ineligible MatMulNBits, idempotence;
* through a decoder: logits within a small fraction of what int4 quantization itself changes (a last-bit
  difference can flip a later int8 activation rounding, so not bit-identical there);
* the console script: `run --json` names the kernel that ran, `QVL_KERNELS=ort` falls back to ORT's.
"""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvl.passes.precision import quantize_blockwise
from qvl.runtime import kernels
from qvl.runtime.cpu_flags import cpu_model_and_flags
from tests.conftest import run_cli

_flags = (cpu_model_and_flags() or ("", set()))[1]
needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= _flags, reason="this CPU lacks AVX2/FMA: the kernel cannot run")


@pytest.fixture(autouse=True)
def _use_qvl_kernels(monkeypatch):
    # these tests are about qvl's kernel: not ORT's even if the environment asks for it (QVL_KERNELS=ort)
    monkeypatch.setenv(kernels.ENV, "qvl")
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)


@pytest.fixture(params=["avx2", "vnni"])
def isa(request, monkeypatch):
    """Each build of the kernel: the AVX2 one (the laptop's) everywhere, the AVX-512 VNNI one where the CPU has it
    (the library picks it when a session creates the kernel, unless QVL_KERNEL_ISA=avx2)."""
    if request.param == "avx2":
        monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    elif kernels.kernel_isa(_flags) != "vnni":
        pytest.skip("this CPU lacks AVX-512 VNNI/VL: the VNNI build cannot run")
    return request.param


def _model(K: int, N: int, blk: int, packed: np.ndarray, scales: np.ndarray, bits: int = 4, acc: int = 4,
           extra_inputs: tuple = ()) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    for name, value in extra_inputs:
        inputs.append(name)
        if name:
            inits.append(numpy_helper.from_array(value, name))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", name="linear", K=K, N=N,
                            bits=bits, block_size=blk, accuracy_level=acc)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def _sessions(model: onnx.ModelProto, threads: int = 2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    reference = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    assert kernels.rewrite(swapped) == 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(kernels.library_path()))
    ours = ort.InferenceSession(swapped.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return reference, ours


def test_the_install_built_the_kernel_library():
    # setup.py builds it wherever the README's install runs on x86-64 Linux with a C++ compiler (CI does)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the kernel library is x86-64 only")
    path = kernels.library_path()
    assert path is not None and path.name.startswith("_nbits_avx2"), path


def _pack(codes: np.ndarray, bits: int, blk: int) -> np.ndarray:
    N, K = codes.shape
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, K // blk, blk // 2)
    return codes.reshape(N, K // blk, blk)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    N = packed.shape[0]
    if bits == 4:
        return np.stack([packed & 15, packed >> 4], axis=-1).reshape(N, -1).astype(np.int64) - 8
    return packed.reshape(N, -1).astype(np.int64) - 128


def _exact_case(rng, M: int, K: int, N: int, blk: int, bits: int = 4):
    """Activations a = c * 2^e per block (integers |c| <= 127 with one +-127) and codes with scales 2^-5 / 2^-6:
    every block product is an integer times 2^(e-s) with |sum| < 2^23 units of 2^-7, exact in float32 (int8
    codes stay within 128 +- 16 for that)."""
    nblk = K // blk
    codes = (rng.integers(0, 16, (N, K)) if bits == 4 else rng.integers(112, 145, (N, K))).astype(np.uint8)
    packed = _pack(codes, bits, blk)
    scales = np.exp2(-rng.integers(5, 7, (N, nblk))).astype(np.float32)
    c = rng.integers(-127, 128, (M, nblk, blk))
    where = rng.integers(0, blk, (M, nblk))
    sign = rng.choice([-1, 1], (M, nblk))
    np.put_along_axis(c, where[..., None], (127 * sign)[..., None], axis=2)
    e = np.exp2(-rng.integers(0, 2, (M, nblk, 1)).astype(np.float64))
    a = (c * e).reshape(M, K).astype(np.float32)
    return a, packed, scales


BLOCKS = [(4, 64), (4, 128), (4, 256), (8, 32), (8, 64), (8, 128), (8, 256)]


@needs_avx2
@pytest.mark.parametrize("bits,blk", BLOCKS)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 17])
def test_bit_for_bit_equal_to_matmulnbits_on_exact_inputs(bits, blk, M, isa):
    rng = np.random.default_rng(bits * 1000 + blk * 10 + M)
    K, N = 3 * blk, 67  # three blocks per row; N not a multiple of a task's 32 / 64 columns
    a, packed, scales = _exact_case(rng, M, K, N, blk, bits)
    reference, ours = _sessions(_model(K, N, blk, packed, scales, bits=bits))
    want, got = reference.run(None, {"A": a})[0], ours.run(None, {"A": a})[0]
    # the integer math itself, in float64: the value both must reproduce exactly
    w = _unpack(packed, bits).astype(np.float64) * np.repeat(scales.astype(np.float64), blk, axis=1)
    exact = a.astype(np.float64) @ w.T
    assert np.array_equal(want.astype(np.float64), exact)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@needs_avx2
@pytest.mark.parametrize("bits,blk", [(4, 128), (8, 32), (8, 128)])
@pytest.mark.parametrize("shape", [(1, 2048, 512), (2, 384, 130), (33, 256, 96)])
def test_random_inputs_equal_to_matmulnbits_within_summation_rounding(shape, bits, blk, isa):
    M, K, N = shape
    rng = np.random.default_rng(K + N)
    W = rng.standard_normal((N, K), dtype=np.float32) * 0.02
    q = quantize_blockwise(W, bits, blk, True)  # full code range: int8 codes 1..255 reach the int16 pair limit
    reference, ours = _sessions(_model(K, N, blk, q.packed, q.scales, bits=bits))
    a = rng.standard_normal((M, K), dtype=np.float32)
    want, got = reference.run(None, {"A": a})[0], ours.run(None, {"A": a})[0]
    # same int32 block products, float32 sums in another order: a few ulp of the largest partial sum
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(want).max()) + 1e-7)
    assert got.shape == (M, N)


@needs_avx2
@pytest.mark.parametrize("bits,blk", [(4, 64), (4, 128), (8, 32), (8, 256)])
def test_the_vnni_and_avx2_builds_agree(bits, blk, monkeypatch):
    """int4: vpdpbusd sums the same int32 lanes as vpmaddubsw + vpmaddwd, then the same float steps: the last bit.
    int8: the VNNI build keeps codes unsigned and folds the zero point per block, so the lanes split the same
    block total differently: float rounding only."""
    if kernels.kernel_isa(_flags) != "vnni":
        pytest.skip("this CPU lacks AVX-512 VNNI/VL: only the AVX2 build runs here")
    M, K, N = 7, 4 * blk, 130
    rng = np.random.default_rng(blk + bits)
    q = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.02, bits, blk, True)
    model = _model(K, N, blk, q.packed, q.scales, bits=bits)
    a = rng.standard_normal((M, K), dtype=np.float32)
    vnni = _sessions(model)[1].run(None, {"A": a})[0]
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    avx2 = _sessions(model)[1].run(None, {"A": a})[0]
    if bits == 4:
        assert np.array_equal(vnni.view(np.uint32), avx2.view(np.uint32))
    else:
        np.testing.assert_allclose(vnni, avx2, rtol=0, atol=2e-6 * float(np.abs(avx2).max()))
        assert not np.array_equal(vnni, np.zeros_like(vnni))


@needs_avx2
@pytest.mark.parametrize("bits,blk", [(4, 64), (4, 128), (4, 256), (8, 32), (8, 128)])
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it(isa, bits, blk):
    """Each build computes a row of A alone (four rows per pass over B or one: the same integers and float
    steps), so the decoder's logits do not depend on how a call is cut (a decode step, a prefill, a verify step):
    every row of M = 2..19 (four-row passes and their tails) equals that row run alone, bit for bit."""
    M, K, N = 19, 2 * blk * (2 if bits == 4 else 4), 130
    rng = np.random.default_rng(bits * blk)
    q = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.02, bits, blk, True)
    session = _sessions(_model(K, N, blk, q.packed, q.scales, bits=bits))[1]
    a = rng.standard_normal((M, K), dtype=np.float32)
    alone = np.concatenate([session.run(None, {"A": a[m:m + 1]})[0] for m in range(M)])
    for rows in (2, 3, 5, 8, 9, 12, 16, 19):
        got = session.run(None, {"A": a[:rows]})[0]
        assert np.array_equal(got.view(np.uint32), alone[:rows].view(np.uint32)), rows


@needs_avx2
def test_a_batched_three_dimensional_input_keeps_its_leading_dims():
    rng = np.random.default_rng(3)
    K, N = 256, 64
    a, packed, scales = _exact_case(rng, 6, K, N, 128)
    model = _model(K, N, 128, packed, scales)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, K]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, N]))
    reference, ours = _sessions(model)
    x = a.reshape(2, 3, K)
    got = ours.run(None, {"A": x})[0]
    assert got.shape == (2, 3, N)
    assert np.array_equal(got, reference.run(None, {"A": x})[0])


def _ineligible_models():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, 256), dtype=np.float32)
    q4_128, q4_32, q8 = (quantize_blockwise(W, 4, 128, True), quantize_blockwise(W, 4, 32, True),
                         quantize_blockwise(W, 8, 16, True))
    zp = np.full(32 * 2 // 2, 0x88, dtype=np.uint8)
    return {
        "block_size 16 at bits 8": _model(256, 32, 16, q8.packed, q8.scales, bits=8),
        "accuracy_level 0 (the kernel quantizes activations to int8)": _model(256, 32, 128, q4_128.packed,
                                                                              q4_128.scales, acc=0),
        "block_size 32 at bits 4": _model(256, 32, 32, q4_32.packed, q4_32.scales),
        "zero points, g_idx or bias": _model(256, 32, 128, q4_128.packed, q4_128.scales, extra_inputs=(("Z", zp),)),
    }


@pytest.mark.parametrize("reason", list(_ineligible_models()))
def test_an_ineligible_matmulnbits_is_left_to_ort_with_its_reason(reason):
    model = _ineligible_models()[reason]
    node = model.graph.node[0]
    assert kernels.eligible(node) == reason
    before = model.SerializeToString()
    assert kernels.rewrite(model) == 0
    assert model.SerializeToString() == before


def test_the_rewrite_swaps_exactly_the_eligible_nodes_and_is_idempotent():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((32, 256), dtype=np.float32)
    q, q8 = quantize_blockwise(W, 4, 128, True), quantize_blockwise(W, 4, 32, True)
    model = _model(256, 32, 128, q.packed, q.scales)
    other = helper.make_node("MatMulNBits", ["A", "B8", "S8"], ["Y8"], domain="com.microsoft", K=256, N=32, bits=4,
                             block_size=32, accuracy_level=4)
    model.graph.initializer.extend([numpy_helper.from_array(q8.packed, "B8"),
                                    numpy_helper.from_array(q8.scales.reshape(-1).astype(np.float32), "S8")])
    model.graph.node.append(other)
    model.graph.node.append(helper.make_node("Add", ["Y", "Y8"], ["Z"]))
    assert kernels.rewrite(model) == 1
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops == [("qvl.kernels", "MatMulNBitsAvx2"), ("com.microsoft", "MatMulNBits"), ("", "Add")]
    assert {a.name for a in model.graph.node[0].attribute} == {"K", "N", "bits", "block_size"}
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == "qvl.kernels"] == [("qvl.kernels", 1)]
    again = model.SerializeToString()
    assert kernels.rewrite(model) == 0 and model.SerializeToString() == again


def test_the_choice_falls_back_to_ort_with_the_reason(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "ort")
    choice = kernels.choose()
    assert not choice.active and choice.note == "ORT MatMulNBits (QVL_KERNELS=ort)"
    monkeypatch.delenv(kernels.ENV)
    choice = kernels.choose(flags={"sse4_2", "avx"})
    assert not choice.active and "lacks AVX2/FMA" in choice.note
    choice = kernels.choose(flags={"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
    assert choice.active and choice.note.endswith("vnni build)"), choice.note
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    assert kernels.choose(flags={"avx2", "fma", "avx512vl", "avx512_vnni"}).note.endswith("avx2 build)")
    monkeypatch.delenv(kernels.ISA_ENV)
    assert kernels.choose(flags={"avx2", "fma", "avx_vnni"}).note.endswith("avx2 build)")  # VEX VNNI: not used
    monkeypatch.setattr(kernels, "library_path", lambda: None)
    choice = kernels.choose(flags={"avx2", "fma"})
    assert not choice.active and "not built" in choice.note


@pytest.fixture(scope="module")
def tiny_cpu_int4_block64(tiny_cpu_artifact, tmp_path_factory):
    """The tiny cpu artifact at int4 with 64-wide blocks (its K of 64 and 128 fit them): every linear eligible."""
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = tmp_path_factory.mktemp("cpu-int4-b64") / "art"
    compile_with_precision(tiny_cpu_artifact, "cpu", out, weights="int4", block_size=64)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from qvl.toolchain.eval.parity import suite_images

    return suite_images(tmp_path_factory.mktemp("imgs"))


@needs_avx2
def test_run_reports_which_kernel_ran_and_falls_back_on_request(tiny_cpu_int4_block64, images):
    # the numbers of both kernels are compared in the test below; this is the user's contract: both run, and
    # `--json` says which one did
    args = ("run", str(tiny_cpu_int4_block64), "--image", str(images["square"]), "--prompt", "What is it?",
            "--max-new-tokens", "12", "--temperature", "4", "--top-k", "0", "--top-p", "1", "--seed", "3", "--json")
    ours = run_cli(*args)
    theirs = run_cli(*args, env={kernels.ENV: "ort"})
    assert ours.returncode == 0 and theirs.returncode == 0, (ours.stderr, theirs.stderr)
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert a["decoder_linear_kernel"].startswith("qvl MatMulNBitsAvx2") and "linears" in a["decoder_linear_kernel"]
    assert "ORT MatMulNBits" not in a["decoder_linear_kernel"]
    assert b["decoder_linear_kernel"] == "ORT MatMulNBits (QVL_KERNELS=ort)"
    assert a["generated_tokens"] == b["generated_tokens"] == 12


@needs_avx2
def test_decoder_logits_differ_from_ort_kernels_far_less_than_quantization_does(tiny_cpu_int4_block64,
                                                                                 tiny_cpu_artifact, monkeypatch):
    """Through a whole decoder the two kernels are not bit-identical: a last-bit difference in one linear's output
    can flip the int8 rounding of an activation in a later one (both quantize activations per block), and the KV
    cache carries it on. What must hold: that difference is small beside what int4 quantization itself changes
    against the fp32 artifact, and it does not move the int4 artifact away from fp32."""
    from qvl.runtime.backends.ort import Engine

    def logits(artifact, env: str | None) -> np.ndarray:
        monkeypatch.setenv(kernels.ENV, env or "qvl")
        engine = Engine(artifact, threads=2)
        rng = np.random.default_rng(0)
        cache = engine.new_cache(32)
        ids = rng.integers(0, engine.vocab_size, (1, 9))
        pos = np.broadcast_to(np.arange(9)[None, None], (3, 1, 9)).copy()
        out = [engine.step(cache, engine.embed(ids), pos).copy()]  # copies: a step's logits buffer is reused
        for i, token in enumerate([146, 5, 77, 1000, 20000]):  # decode steps: one row of A per linear
            out.append(engine.step(cache, engine.embed(np.array([[token]])), np.full((3, 1, 1), 9 + i)).copy())
        return np.concatenate(out), engine.kernel_note

    ours, note = logits(tiny_cpu_int4_block64, None)
    assert note.startswith("qvl MatMulNBitsAvx2"), note
    theirs, note = logits(tiny_cpu_int4_block64, "ort")
    assert note.startswith("ORT MatMulNBits"), note
    fp32, _ = logits(tiny_cpu_artifact, "ort")
    assert ours.shape == theirs.shape == fp32.shape == (6, ours.shape[1])
    kernel_gap = np.abs(ours - theirs).max(axis=1)
    quant_gap = np.abs(theirs - fp32).max(axis=1)
    ours_gap = np.abs(ours - fp32).max(axis=1)
    assert kernel_gap[0] < 1e-4 * np.abs(theirs[0]).max()  # the prefill: no rounding flip at this prompt
    assert (kernel_gap < 0.1 * quant_gap).all(), (kernel_gap, quant_gap)
    assert (ours_gap < 1.05 * quant_gap).all(), (ours_gap, quant_gap)
