"""qvl's own CPU kernels for ONNX Runtime: a custom-op library used in place of some of ORT's contrib-op nodes.

`MatMulNBitsAvx2` (`nbits_avx2_op.cpp`, built by setup.py into `_nbits_avx2*.so` when a C++ compiler is
there) computes `com.microsoft::MatMulNBits` at bits 4 or 8, symmetric, accuracy_level 4: the same int8 x int4 /
int8 x int8 block dot products from the same tensors. Two builds in the library: AVX2 (the laptop's), and AVX-512
VNNI (`nbits_vnni.cpp`, vpdpbusd; the same integer block sums: int4 results equal to the last bit, int8 within
float rounding), which it picks where the CPU has it unless `QVL_KERNEL_ISA=avx2`. Measured against MLAS on one row (the decode step): AVX2 host,
int4 ~1.5x per core on cache-resident weights, ~1.3x streamed from DRAM; AVX-512 VNNI host (2026-12-04), the 2B
decode step 1.2-1.4x MLAS's AVX-512 VNNI kernels; at 128 rows (int4) the VNNI build is on par with MLAS, the AVX2
build ~0.75x; int8 at block 32 and 128 rows ~0.6x MLAS. The artifact is not changed: when the library is present, the host has AVX2 + FMA and `QVL_KERNELS` is not
"ort", the runtime swaps the op type of the eligible nodes in the decoder's graph proto (`rewrite`), fuses the
layers' glue into the library's other ops (`fuse.py`) and opens the session from those bytes, its weights still
read from the artifact's store. Otherwise ORT's own kernel runs; `choose` says which and why, and the bench
reports it.

One node's output differs from MLAS's only by float summation order (both sum the same exact int32 block products
scaled by the same float scales): bit-for-bit equal where those sums are exact, within rounding otherwise. Through
a decoder such a last-bit difference can flip a later node's int8 rounding of an activation, so logits differ by
far less than int4 quantization itself moves them, not bit-for-bit (tests/test_cpu_kernels.py). The partitioned
runner's part sessions keep ORT's kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qvl.runtime.cpu_flags import cpu_model_and_flags

DOMAIN = "qvl.kernels"
OP = "MatMulNBitsAvx2"
ENV = "QVL_KERNELS"  # "ort": always ORT's kernels (fallback, A/B)
ISA_ENV = "QVL_KERNEL_ISA"  # "avx2": the AVX2 build even where the CPU has AVX-512 VNNI (read by the library)
_HERE = Path(__file__).resolve().parent


def library_path() -> Path | None:
    """The built custom-op library next to this file, or None when the build left it out."""
    found = sorted(_HERE.glob("_nbits_avx2*.so"))
    return found[0] if found else None


@dataclass(frozen=True)
class KernelChoice:
    library: Path | None  # register this with the session (None: ORT's kernels only)
    note: str  # what runs and why, for the bench and `info`

    @property
    def active(self) -> bool:
        return self.library is not None


def choose(flags: set[str] | None = None) -> KernelChoice:
    """Whether this host runs qvl's kernels: the library is built, the CPU has AVX2 and FMA, not turned off."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted == "ort":
        return KernelChoice(None, f"ORT MatMulNBits ({ENV}=ort)")
    lib = library_path()
    if lib is None:
        return KernelChoice(None, "ORT MatMulNBits (qvl's kernel library was not built with this install)")
    if flags is None:
        found = cpu_model_and_flags()
        flags = found[1] if found else set()
    if not {"avx2", "fma"} <= flags:
        return KernelChoice(None, "ORT MatMulNBits (this CPU lacks AVX2/FMA for qvl's kernel)")
    return KernelChoice(lib, f"qvl {OP} ({lib.name}, {kernel_isa(flags)} build)")


def kernel_isa(flags: set[str]) -> str:
    """Which build of the kernel the library runs on a CPU with these /proc/cpuinfo flags: "vnni" (AVX-512 VNNI
    with VL, as the library's __builtin_cpu_supports sees it) unless QVL_KERNEL_ISA=avx2, else "avx2"."""
    if os.environ.get(ISA_ENV) == "avx2":  # exactly the library's test (strcmp in nbits_avx2_op.cpp)
        return "avx2"
    return "vnni" if {"avx512_vnni", "avx512vl"} <= flags else "avx2"


def eligible(node) -> str | None:
    """None when `node` (an onnx NodeProto) is a MatMulNBits the custom op computes identically; else why not."""
    if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
        return "not MatMulNBits"
    attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
    bits = attrs.get("bits", 4)
    if bits not in (4, 8):
        return f"bits {bits}"
    if attrs.get("accuracy_level", 0) != 4:
        return f"accuracy_level {attrs.get('accuracy_level', 0)} (the kernel quantizes activations to int8)"
    blk = attrs.get("block_size")
    if blk not in ((64, 128, 256) if bits == 4 else (32, 64, 128, 256)):
        return f"block_size {blk} at bits {bits}"
    if attrs.get("K", 0) % blk:
        return "K not a multiple of block_size"
    if len(node.input) > 3 and any(node.input[3:]):
        return "zero points, g_idx or bias"
    return None


def rewrite(model) -> int:
    """Swap every eligible MatMulNBits of `model` (onnx ModelProto, in place) to the custom op; the count swapped."""
    swapped = 0
    for node in all_nodes(model.graph):
        if eligible(node) is None:
            keep = [a for a in node.attribute if a.name in ("K", "N", "bits", "block_size")]
            del node.attribute[:]
            node.attribute.extend(keep)
            del node.input[3:]
            node.op_type, node.domain = OP, DOMAIN
            swapped += 1
    if swapped:
        import_domain(model)
    return swapped


def import_domain(model) -> None:
    """Add the library's domain to `model`'s opset imports (once)."""
    from onnx import helper

    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def all_nodes(graph):
    """Every node of `graph` and of its subgraphs (If / Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from all_nodes(attr.g)
            for g in attr.graphs:
                yield from all_nodes(g)
