"""The compute bound of CPU decode: what the decoder's linear layers cost per token when their weights are in cache.

The bandwidth roofline (`hardware.measure_bandwidth` / bytes per token) assumes decode waits on DRAM. On a 2-core
host it often does not: the int4/int8 kernels spend their time unpacking codes, scaling blocks and doing the int8
dot products (the issue's AVX-512 host: decode speed stayed put while the read bandwidth swung 32-62 GB/s). This
measures that other bound in the same run, on the same kernels:

* every weight-bearing linear of the artifact's decoder graph (`MatMulNBits` with its K, N, bits, block size,
  accuracy level and zero points; fp32 `MatMul`/`Gemm` with a constant weight) is grouped by signature;
* each signature is timed as a one-node ORT session at M = 1 with the same thread count, its weights small enough
  to stay in the last-level cache (a layer wider than `resident_bytes` is timed on an N-slice that fits and scaled
  by N): the per-call time is the kernel's compute rate, not DRAM's;
* the call overhead of `session.run` (an Identity node, measured alike) is subtracted from each per-call time;
* `seconds_per_token` = sum over signatures of count x per-call time, `tok_s` = its inverse.

Excluded (stated in the result): attention over the KV cache, norms, rotary, residual adds, the embedding row and
ORT's per-node dispatch between kernels -- all small at decode, so the bound is optimistic by that much.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
DEFAULT_RESIDENT_BYTES = 4 << 20  # when the LLC size is unknown: fits any L3 of the hosts we target


def linear_signatures(artifact: Path) -> list[dict]:
    """The decoder's weight-bearing linears grouped by kernel signature: [{op, K, N, bits, block_size,
    accuracy_level, zero_points, count, weight_bytes}] (weight_bytes per call)."""
    import onnx

    from qvl.artifacts.manifest import read_manifest

    manifest = read_manifest(Path(artifact), verify_graphs=False)
    graph = onnx.load(str(manifest.graph_path("decoder")), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, dict] = {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            k, n, bits, blk = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
            zp = len(node.input) > 3 and bool(node.input[3])
            blocks = math.ceil(k / blk)
            nbytes = n * blocks * blk * bits // 8 + n * blocks * 4 + (n * math.ceil(blocks * bits / 8) if zp else 0)
            key = ("MatMulNBits", k, n, bits, blk, attrs.get("accuracy_level", 0), zp)
        elif node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.input) > 1 \
                and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            dims = list(inits[node.input[1]].dims)
            k, n = (dims[1], dims[0]) if node.op_type == "Gemm" and attrs.get("transB", 0) else (dims[0], dims[1])
            nbytes = k * n * 4
            key = ("MatMul", k, n, 32, 0, 0, False)
        else:
            continue
        g = groups.setdefault(key, {"op": key[0], "K": k, "N": n, "bits": key[3], "block_size": key[4],
                                    "accuracy_level": key[5], "zero_points": key[6], "count": 0,
                                    "weight_bytes": nbytes})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"] * g["weight_bytes"])


def _one_node_session(sig: dict, n: int, threads: int, rng, choice=None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qvl.runtime import kernels

    k = sig["K"]
    if sig["op"] == "MatMulNBits":
        bits, blk = sig["bits"], sig["block_size"]
        blocks = math.ceil(k / blk)
        # Codes and scales only need the right layout and magnitudes: the kernels' speed does not depend on values.
        inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, blk * bits // 8), dtype=np.uint8), "B"),
                 numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) * 0.01 + 1e-3), "S")]
        inputs = ["A", "B", "S"]
        if sig["zero_points"]:
            inits.append(numpy_helper.from_array(
                rng.integers(0, 256, n * math.ceil(blocks * bits / 8), dtype=np.uint8), "Z"))
            inputs.append("Z")
        node = helper.make_node("MatMulNBits", inputs, ["Y"], domain=MS_DOMAIN, K=k, N=n, bits=bits,
                                block_size=blk, accuracy_level=sig["accuracy_level"])
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, "B")]
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
    graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # the kernel the runtime's decoder runs for this node: qvl's when it is active here (runtime/kernels)
    if choice is not None and choice.active and kernels.rewrite(model):
        so.register_custom_ops_library(str(choice.library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_overhead_seconds(threads: int, k: int, samples: int, rng) -> float:
    """Median time of `session.run` on an Identity node: Python + ORT call overhead, subtracted from each linear's
    time (a decode step pays it once, not once per linear)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["A"], ["Y"])], "identity",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return statistics.median(_per_call_seconds(session, k, samples, rng))


def per_call_seconds(session, feeds: dict, samples: int, min_sample_s: float, warmup: int = 3) -> list[float]:
    """`samples` per-call times of `session.run(None, feeds)`: `warmup` untimed runs, one run to size the repeats so
    a sample lasts about `min_sample_s`, then each sample = mean over those repeats (gemm_rates uses it too)."""
    for _ in range(warmup):
        session.run(None, feeds)
    t = time.perf_counter()
    session.run(None, feeds)
    reps = max(1, int(min_sample_s / max(time.perf_counter() - t, 1e-6)))
    out = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(reps):
            session.run(None, feeds)
        out.append((time.perf_counter() - t) / reps)
    return out


def _per_call_seconds(session, k: int, samples: int, rng, min_sample_s: float = 0.02) -> list[float]:
    return per_call_seconds(session, {"A": rng.standard_normal((1, k), dtype=np.float32)}, samples, min_sample_s)


def decode_compute_bound(artifact: Path, threads: int, samples: int = 5, resident_bytes: int | None = None,
                         seed: int = 0) -> dict:
    """Time every linear signature of the decoder with cache-resident weights; the sum is the compute bound."""
    from qvl.runtime import kernels
    from qvl.toolchain.eval.hardware import llc_bytes

    choice = kernels.choose()

    llc = llc_bytes()
    resident = resident_bytes or (llc // 2 if llc else DEFAULT_RESIDENT_BYTES)
    rng = np.random.default_rng(seed)
    rows = []
    total = 0.0
    overhead = _run_overhead_seconds(threads, 2048, samples, rng)
    for sig in linear_signatures(artifact):
        # N-slice that stays resident (multiple of 16 rows); the time scales with N at M = 1 (a GEMV streams rows).
        slices = max(1, math.ceil(sig["weight_bytes"] / resident))
        n = sig["N"] if slices == 1 else max(16, (sig["N"] // slices) // 16 * 16)
        session = _one_node_session(sig, n, threads, rng, choice)
        per = [max(p - overhead, 1e-9) for p in _per_call_seconds(session, sig["K"], samples, rng)]
        del session
        med = statistics.median(per) * sig["N"] / n
        total += med * sig["count"]
        rows.append({**sig, "timed_n": n, "seconds_per_call": med,
                     "spread_s": [min(per) * sig["N"] / n, max(per) * sig["N"] / n],
                     "resident_gbs": sig["weight_bytes"] / med / 1e9})
    return {
        "threads": threads,
        "int4_kernel": choice.note,
        "resident_bytes": resident,
        "run_overhead_s": overhead,  # subtracted from every per-call time
        "llc_bytes": llc,
        "signatures": rows,
        "linears": sum(r["count"] for r in rows),
        "seconds_per_token": total,
        "tok_s": (1.0 / total) if total > 0 else None,
        "excluded": "attention over the KV cache, norms, rotary, residual adds, the embedding row, per-node dispatch",
    }
