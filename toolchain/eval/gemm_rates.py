"""GEMM rates of the ORT CPU kernels the artifacts can use, at the shapes of each phase, in GFLOP/s.

Prefill and the vision encoder are compute-bound GEMMs (M = prompt tokens, or patches), decode is M = 1. Which
weight form is fastest differs per phase and per ISA, so the bench measures them side by side in the same run:

| kernel               | graph form                                               |
|----------------------|----------------------------------------------------------|
| `sgemm`              | fp32 `MatMul` with a constant `[K, N]` weight (MLAS SGEMM) |
| `nbits8_int8`        | `MatMulNBits` bits 8, accuracy_level 4 (int8 activations x int8 weights) |
| `nbits4_int8`        | `MatMulNBits` bits 4, accuracy_level 4 |
| `nbits4_fp32`        | `MatMulNBits` bits 4, accuracy_level 0 (dequantize, fp32 compute) |
| `dynamic_int8`       | `com.microsoft.DynamicQuantizeMatMul` (u8 activations per call, int8 weights per column within +-63: what `cpu-avx2` compiles) |
| `dynamic_int8_full`  | the same with full-range weights (+-127: `cpu-avx512`); without VNNI its int16 pair sums saturate (`rel_error`) |
| `qvl_nbits4_int8`    | qvl's `MatMulNBitsAvx2` (runtime/kernels) at bits 4, block 128 (the int4 default; 64 where K needs it), when it runs on this host |
| `qvl_nbits8_int8`    | the same at bits 8, block 32 (the int8 default) |

The two `qvl_` rows are measured when the runtime would run qvl's kernel here (`runtime.kernels.choose()`): they are
what the CPU decoder's linears run at prefill (M > 1) and decode on such a host; `kernels` in the result lists what ran.

`sgemm` at the vision shape is the host's SGEMM peak the vision encoder's GFLOP/s is reported against.
"""

from __future__ import annotations

import statistics

import numpy as np

from qvl.toolchain.eval.decode_bound import per_call_seconds

MS = "com.microsoft"
KERNELS = ("sgemm", "nbits8_int8", "nbits4_int8", "nbits4_fp32", "dynamic_int8", "dynamic_int8_full")
QVL_KERNELS = ("qvl_nbits4_int8", "qvl_nbits8_int8")


def _model(kernel: str, k: int, n: int, w: np.ndarray, block_size: int = 32):
    from onnx import TensorProto, helper, numpy_helper

    from qvl.passes.precision import quantize_blockwise, quantize_columns_int8

    if kernel.startswith("qvl_"):
        from qvl.runtime import kernels as qvl_kernels

        import onnx

        model = onnx.ModelProto.FromString(_model(kernel[4:], k, n, w, block_size=_qvl_block(kernel, k)))
        assert qvl_kernels.rewrite(model) == 1
        return model.SerializeToString()
    if kernel == "sgemm":
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")]
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    elif kernel.startswith("nbits"):
        bits = 8 if kernel.startswith("nbits8") else 4
        q = quantize_blockwise(w, bits, block_size, True)
        inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1), "S")]
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain=MS, K=k, N=n, bits=bits,
                                block_size=block_size, accuracy_level=0 if kernel.endswith("fp32") else 4)
    elif kernel.startswith("dynamic_int8"):
        codes, scale = quantize_columns_int8(np.ascontiguousarray(w.T), 127 if kernel.endswith("full") else 63)
        inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scale, "S")]
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain=MS)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    graph = helper.make_graph([node], kernel, [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 9
    return model.SerializeToString()


def _qvl_block(kernel: str, k: int) -> int | None:
    """The block a `qvl_` row runs at: the compile default (int4 128, int8 32) where K allows, int4 64 else; None when
    no block the kernel takes divides K."""
    for blk in ((32,) if kernel.startswith("qvl_nbits8") else (128, 64)):
        if k % blk == 0:
            return blk
    return None


def gemm_rates(threads: int, shapes: dict[str, tuple[int, int, int]] | None = None, kernels=None,
               samples: int = 5, min_sample_s: float = 0.05, seed: int = 0) -> dict:
    """{shape name: {kernel: {"gflops": median, "spread": [min, max], "seconds": median}}} for (M, K, N) shapes.

    Default shapes are the 2B model's: `decode` (M 1, the MLP's K 2048 x N 6144), `prefill` (M 128), `vision`
    (M 784 = one 448^2 image's patches, the vision MLP's K 1024 x N 4096)."""
    import onnxruntime as ort

    from qvl.runtime import kernels as qvl_kernels

    shapes = shapes or {"decode": (1, 2048, 6144), "prefill": (128, 2048, 6144), "vision": (784, 1024, 4096)}
    rng = np.random.default_rng(seed)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    choice = qvl_kernels.choose()
    if kernels is None:
        kernels = KERNELS + (QVL_KERNELS if choice.active else ())
    if any(kk.startswith("qvl_") for kk in kernels):
        so.register_custom_ops_library(str(choice.library or qvl_kernels.library_path()))
    out: dict = {}
    for name, (m, k, n) in shapes.items():
        a = {"A": rng.standard_normal((m, k), dtype=np.float32)}
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        exact = a["A"].astype(np.float64) @ w.T.astype(np.float64)
        row = out.setdefault(name, {"M": m, "K": k, "N": n})
        for kernel in kernels:
            if kernel.startswith("qvl_") and _qvl_block(kernel, k) is None:
                row[kernel] = {"skipped": f"K={k} is not a multiple of a block the kernel takes"}
                continue
            s = ort.InferenceSession(_model(kernel, k, n, w), so, providers=["CPUExecutionProvider"])
            got = s.run(None, a)[0]  # also the first warm-up run
            per = per_call_seconds(s, a, samples, min_sample_s, warmup=1)
            flops = 2.0 * m * k * n
            row[kernel] = {"seconds": statistics.median(per), "gflops": flops / statistics.median(per) / 1e9,
                           # what the kernel computes, vs float64 A @ W: int8/int4 weights cost ~1e-2 / ~1e-1
                           "rel_error": float(np.abs(got - exact).max() / np.abs(exact).max()),
                           "spread_gflops": [flops / max(per) / 1e9, flops / min(per) / 1e9]}
        best = max((kk for kk in kernels if "gflops" in row[kk]), key=lambda kk: row[kk]["gflops"])
        row["fastest"] = best
    return {"threads": threads, "kernels": list(kernels), "qvl_kernel": choice.note, "shapes": out}
