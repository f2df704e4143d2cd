"""One MatMulNBits node (2048x6144, one row, cache-resident weights) per bits / block size / accuracy level:

    python benchmarks/matmulnbits_micro.py [--bits 4,8] [--blocks 32,128] [--levels 0,4] [--rounds 7] [--threads 2]

All variants' sessions are built first and timed round by round, interleaved, so a noisy neighbour hits them alike;
spinning is off because a pool left spinning by the previous session halves the next one's speed on 2 cores.
Reports the median time per call (min, max over rounds), GB/s of packed weights + scales, and the max error
relative to a float64 product."""
import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T, helper, numpy_helper

from qvl.passes.precision import quantize_blockwise

K, N = 2048, 6144


def session(q, bits: int, blk: int, acc: int, threads: int) -> ort.InferenceSession:
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=blk, accuracy_level=acc)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "S")]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", T.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("Y", T.FLOAT, [1, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ints = lambda s: [int(x) for x in s.split(",")]
    ap.add_argument("--bits", type=ints, default=[4, 8])
    ap.add_argument("--blocks", type=ints, default=[32, 128])
    ap.add_argument("--levels", type=ints, default=[0, 4])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N, K), dtype=np.float32) * 0.02
    x = rng.standard_normal((1, K), dtype=np.float32)
    ref = x.astype(np.float64) @ W.T.astype(np.float64)
    variants = {}
    for bits in a.bits:
        for blk in a.blocks:
            q = quantize_blockwise(W, bits, blk, True)
            for acc in a.levels:
                variants[(bits, blk, acc)] = (session(q, bits, blk, acc, a.threads), q.packed.nbytes + q.scales.nbytes)
    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, (s, _) in variants.items():
            for _ in range(5):
                s.run(None, {"A": x})
            t = time.perf_counter()
            for _ in range(100):
                s.run(None, {"A": x})
            times[k].append((time.perf_counter() - t) / 100)
    for (bits, blk, acc), (s, nbytes) in variants.items():
        ts = times[(bits, blk, acc)]
        err = float(np.abs(s.run(None, {"A": x})[0] - ref).max() / np.abs(ref).max())
        dt = statistics.median(ts)
        print(f"int{bits} block {blk:>3} level {acc}: {dt * 1e6:7.1f} us (min {min(ts) * 1e6:.1f}, max {max(ts) * 1e6:.1f})  "
              f"{nbytes / dt / 1e9:5.1f} GB/s of weights+scales  max rel err {err:.4f}")


if __name__ == "__main__":
    main()
