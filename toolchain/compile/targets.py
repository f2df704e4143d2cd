"""Compile targets as capability tables. Passes read these; they never import a backend.

| target      | hardware                          | fast math                 | fused ops              |
|-------------|-----------------------------------|---------------------------|------------------------|
| cpu-avx2    | i5-10210U (4 cores, AVX2, DDR4)    | fp32; int8 dot (AVX2)     | ORT CPU contrib ops    |
| cpu-avx512  | AVX-512 VNNI CPUs (required)       | fp32; int8 (VNNI)         | ORT CPU contrib ops    |
| sm61        | Pascal GP10x (MX250, GTX 10x0)     | fp32; int8 DP4A. FP16 at 1/64 rate: never chosen | TensorRT 8.6 (opset <= 17), no contrib ops |
| sm75+       | Turing and newer (tensor cores)    | fp32, fp16, int8          | TensorRT 10 / ORT CUDA |
| cuda-sm61   | Pascal, through ORT's CUDA provider | fp32 activations; int8/int4 weight-only MatMulNBits (dequantized in the GEMV). Never fp16 | ORT CUDA contrib ops with fp32 kernels; in-place KV cache via ONNX TensorScatter + Attention |
| cuda        | SM 7.5+ through ORT's CUDA provider | fp16 activations (tensor cores), int4/int8 weight-only | ORT CUDA GroupQueryAttention (fp16) with an in-place cache |

Target names are the artifact's contract with a runtime device: `cpu-*` run on ORT's CPU provider, `cuda*` on its
CUDA provider, `sm*` are TensorRT engine-kit targets (`provider`).
"""

from __future__ import annotations

from qvl.errors import QvlError
from qvl.passes.base import TargetCapabilities

GiB = 1 << 30

TARGETS: dict[str, TargetCapabilities] = {
    # Vision linears as DynamicQuantizeMatMul (MLAS int8 GEMM; 784 patch rows per 448^2 image): 2.5x MatMulNBits' GEMM
    # rate, vision encoder -27 % at 2B, +0.14 GB peak RSS for an int4 artifact; sentinel accuracy unchanged
    # (benchmarks/README.md, "Prefill and vision GEMMs"). The decoder stays MatMulNBits: at M = 1 it is as fast or faster.
    "cpu-avx2": TargetCapabilities("cpu-avx2", ("float32",), (8, 4), ort_contrib_ops=True, memory_bytes=8 * GiB,
                                   asymmetric_int4_int8_compute=False,  # ORT issue #29853
                                   dynamic_int8_graphs=("vision",), int8_block_size=128),
    # bf16 is not listed: no pass assigns bf16 activations yet (issue #16 measures AVX-512 hosts and decides).
    "cpu-avx512": TargetCapabilities("cpu-avx512", ("float32",), (8, 4), ort_contrib_ops=True,
                                     dynamic_int8_graphs=("vision",), dynamic_int8_weight_max=127,  # VNNI
                                     int8_block_size=128),
    "sm61": TargetCapabilities("sm61", ("float32",), (8,), ort_contrib_ops=False, max_opset=17, memory_bytes=2 * GiB,
                               kv_cache="concat", provider="tensorrt"),
    "sm75+": TargetCapabilities("sm75+", ("float32", "float16"), (8, 4), ort_contrib_ops=False, kv_cache="concat",
                                provider="tensorrt"),
    # ORT CUDA on Pascal: GroupQueryAttention's CUDA kernel is fp16/bf16 only and fp16 runs at 1/64 rate, so
    # attention stays fp32 in standard ONNX ops with the cache written in place (opset 24 TensorScatter).
    "cuda-sm61": TargetCapabilities("cuda-sm61", ("float32",), (8, 4), ort_contrib_ops=True, memory_bytes=2 * GiB,
                                    kv_cache="tensor-scatter", provider="cuda"),
    "cuda": TargetCapabilities("cuda", ("float32", "float16"), (8, 4), ort_contrib_ops=True,
                               kv_cache="gqa-shared", activation_dtype="float16", provider="cuda"),
}
ALIASES = {"cpu": "cpu-avx2", "trt-sm75+": "sm75+"}


def get_target(name: str) -> TargetCapabilities:
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        raise QvlError(f"unknown target {name!r}", hint=f"choose one of: {', '.join([*TARGETS, *ALIASES])}")
    return TARGETS[key]
