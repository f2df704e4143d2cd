"""qvl's MatMulNBitsAvx2 against ORT's MatMulNBits on one row, cache-resident and streamed from DRAM:

    python benchmarks/kernel_micro.py [--bits 4,8] [--layers 1,16] [--rounds 7] [--threads 2] [--json OUT]

A graph of `layers` independent 2048x6144 linears (each its own weights; 1 layer = 6.3 MB int4 stays in the LLC,
16 = 100 MB int4 / 200 MB int8 streams) per kernel; the int4 block is 128 and int8 32 (the compile defaults). Both
sessions are built first and timed round by round, interleaved, spinning off (an idle spinning pool of one session
halves the other's speed on 2 cores). Reports the median time per linear, GB/s of weights + scales and the ratio."""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T, helper, numpy_helper

from qvl.passes.precision import quantize_blockwise
from qvl.runtime import kernels
from qvl.runtime.cpu_flags import cpu_model_and_flags

K, N = 2048, 6144
BLOCK = {4: 128, 8: 32}


def graph(bits: int, layers: int, rng):
    blk = BLOCK[bits]
    nodes, inits = [], []
    for i in range(layers):
        q = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.02, bits, blk, True)
        inits += [numpy_helper.from_array(q.packed, f"B{i}"),
                  numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=bits, block_size=blk, accuracy_level=4))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", T.FLOAT, [1, K])],
                          [helper.make_tensor_value_info(f"Y{i}", T.FLOAT, [1, N]) for i in range(layers)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m, N * K * bits // 8 + N * (K // blk) * 4


def session(model, threads: int, ours: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if ours:
        model = type(model).FromString(model.SerializeToString())
        assert kernels.rewrite(model) > 0
        so.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--bits", type=ints, default=[4, 8])
    ap.add_argument("--layers", type=ints, default=[1, 16])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if kernels.library_path() is None:
        raise SystemExit("qvl's kernel library is not built (pip install -e . with a C++ compiler)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, K), dtype=np.float32)
    rows = []
    for bits in a.bits:
        for layers in a.layers:
            model, nbytes = graph(bits, layers, rng)
            sess = {"ort": session(model, a.threads, False), "qvl": session(model, a.threads, True)}
            times = {k: [] for k in sess}
            for _ in range(a.rounds):
                for k, s in sess.items():
                    for _ in range(3):
                        s.run(None, {"A": x})
                    t = time.perf_counter()
                    for _ in range(10):
                        s.run(None, {"A": x})
                    times[k].append((time.perf_counter() - t) / 10 / layers)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"bits": bits, "block_size": BLOCK[bits], "layers": layers, "weight_mb": layers * nbytes / 1e6,
                   **{f"{k}_us": med[k] * 1e6 for k in med}, **{f"{k}_spread_us": [min(v) * 1e6, max(v) * 1e6]
                                                              for k, v in times.items()},
                   **{f"{k}_gbs": nbytes / med[k] / 1e9 for k in med}, "speedup": med["ort"] / med["qvl"]}
            rows.append(row)
            print(f"int{bits} block {BLOCK[bits]:>3}, {layers:>2} x 2048x6144 ({row['weight_mb']:.0f} MB): "
                  f"ORT {row['ort_us']:.0f} us ({row['ort_gbs']:.1f} GB/s)  qvl {row['qvl_us']:.0f} us "
                  f"({row['qvl_gbs']:.1f} GB/s)  {row['speedup']:.2f}x")
    if a.json:
        model_name, flags = cpu_model_and_flags() or ("", set())
        with open(a.json, "w") as f:
            json.dump({"cpu": model_name, "flags": sorted(fl for fl in flags if fl.startswith(("avx", "fma"))),
                       "threads": a.threads, "rounds": a.rounds, "onnxruntime": ort.__version__,
                       "kernel": kernels.choose().note, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
