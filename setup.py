"""The one part of the build that pyproject.toml cannot declare: the optional AVX2 kernel library.

`runtime/kernels/*_op.cpp` become `qvl/runtime/kernels/_nbits_avx2*.so`, an ONNX Runtime custom-op
library (it exports RegisterCustomOps; Python never imports it). `optional=True`: without a C++ compiler, or on a
non-x86-64 machine, the wheel builds without it and the runtime uses ORT's own MatMulNBits kernel.
"""
import platform

from setuptools import Extension, setup

ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64") and platform.system() != "Windows":
    ext_modules.append(Extension(
        "qvl.runtime.kernels._nbits_avx2",
        sources=["runtime/kernels/nbits_avx2_op.cpp", "runtime/kernels/nbits_vnni.cpp", "runtime/kernels/norm_rotary_op.cpp",
                 "runtime/kernels/attention_op.cpp"],
        depends=["runtime/kernels/nbits_avx2.h", "runtime/kernels/ort_abi.h", "runtime/kernels/ort_op.h"],
        language="c++",
        # the AVX2 code is only entered on hosts whose /proc/cpuinfo lists avx2 and fma (runtime/kernels/__init__.py);
        # nbits_vnni.cpp raises its own target to AVX-512 VNNI and is entered only where the CPU reports it
        extra_compile_args=["-O3", "-mavx2", "-mfma", "-std=c++17", "-fvisibility=hidden"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
