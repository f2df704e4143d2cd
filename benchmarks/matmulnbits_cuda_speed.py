"""Decode-step (M=1) MatMulNBits speed on ORT CUDA, fp32 vs fp16 activations, at the 2B decoder's shapes.

    python benchmarks/matmulnbits_cuda_speed.py   (on the GPU machine; prints one line per shape and dtype)

R distinct weight matrices per graph (so the L2 does not hold them), each multiplied by the same [1, K] input,
timed over many runs with device-resident I/O; effective GB/s = packed weight + scale bytes / time per node.
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

SHAPES = {"q/o 2048x2048": (2048, 2048), "k/v 2048x1024": (2048, 1024), "gate/up 2048x6144": (2048, 6144),
          "down 6144x2048": (6144, 2048), "lm_head 2048x151936": (2048, 151936),
          # after the packing stage (passes/linear_fusion.py): q/k/v and gate/up as one linear each
          "qkv fused 2048x4096": (2048, 4096), "gate_up fused 2048x12288": (2048, 12288)}


def graph(K, N, R, dtype, block=128):
    rng = np.random.default_rng(0)
    nb = K // block
    ttype = T.FLOAT if dtype == np.float32 else T.FLOAT16
    inits, nodes, outs = [], [], []
    for r in range(R):
        packed = rng.integers(0, 256, (N, nb, block // 2), dtype=np.uint8)
        scale = (rng.random(N * nb) * 0.01 + 0.001).astype(dtype)
        inits += [nh.from_array(packed, f"w{r}"), nh.from_array(scale, f"s{r}")]
        nodes.append(h.make_node("MatMulNBits", ["x", f"w{r}", f"s{r}"], [f"y{r}"], domain="com.microsoft",
                                 K=K, N=N, bits=4, block_size=block, accuracy_level=0))
        outs.append(h.make_tensor_value_info(f"y{r}", ttype, [1, N]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", ttype, [1, K])], outs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString(), N * nb * (block // 2 + np.dtype(dtype).itemsize)


def main():
    for name, (K, N) in SHAPES.items():
        R = 4 if N > 100000 else 16
        for dtype in (np.float32, np.float16):
            model, nbytes = graph(K, N, R, dtype)
            sess = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
            x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((1, K)).astype(dtype), "cuda", 0)
            io = sess.io_binding()
            io.bind_ortvalue_input("x", x)
            for r in range(R):
                io.bind_output(f"y{r}", "cuda")
            for _ in range(5):
                sess.run_with_iobinding(io)
            n = 50
            t0 = time.perf_counter()
            for _ in range(n):
                sess.run_with_iobinding(io)
            dt = (time.perf_counter() - t0) / n / R
            print(f"{name:22s} {np.dtype(dtype).name:8s} {dt * 1e6:8.1f} us/node  {nbytes / dt / 1e9:7.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
