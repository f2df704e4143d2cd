"""Single MatMulNBits node timing (2048x6144) for int4/int8, block 32/128, accuracy level 0/4: python benchmarks/matmulnbits_micro.py"""
import numpy as np, time, onnxruntime as ort
from onnx import helper, TensorProto as T, numpy_helper
from qvl.passes.precision import quantize_blockwise
K, N = 2048, 6144
rng = np.random.default_rng(0)
W = rng.standard_normal((N, K), dtype=np.float32) * 0.02
for bits in (4, 8):
    for blk in (32, 128):
        q = quantize_blockwise(W, bits, blk, True)
        for acc in (0, 4):
            node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=blk, accuracy_level=acc)
            inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "S")]
            g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", T.FLOAT, [1, K])], [helper.make_tensor_value_info("Y", T.FLOAT, [1, N])], inits)
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]); m.ir_version = 9
            so = ort.SessionOptions(); so.intra_op_num_threads = 2
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            a = rng.standard_normal((1, K), dtype=np.float32)
            for _ in range(5): s.run(None, {"A": a})
            t = time.perf_counter(); n = 50
            for _ in range(n): s.run(None, {"A": a})
            dt = (time.perf_counter() - t) / n
            gbs = q.packed.nbytes / dt / 1e9
            print(f"bits={bits} block={blk} acc={acc}: {dt*1e3:.3f} ms  {gbs:.1f} GB/s of weights")
