"""int4 MatMulNBits (2048x6144, one row, accuracy level 4) at block 32/64/128/256 on 2 threads, no spinning (the
sessions run interleaved): python benchmarks/matmulnbits_block_sizes.py"""
import numpy as np, time, onnxruntime as ort, statistics
from onnx import helper, TensorProto as T, numpy_helper
from qvl.passes.precision import quantize_blockwise
K, N = 2048, 6144
rng = np.random.default_rng(0)
W = rng.standard_normal((N, K), dtype=np.float32) * 0.02
a = rng.standard_normal((1, K), dtype=np.float32)
ref = a.astype(np.float64) @ W.T.astype(np.float64)
sess = {}
for blk in (32, 64, 128, 256):
    q = quantize_blockwise(W, 4, blk, True)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=blk, accuracy_level=4)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), "S")]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", T.FLOAT, [1, K])], [helper.make_tensor_value_info("Y", T.FLOAT, [1, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]); m.ir_version = 9
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess[blk] = (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), q.packed.nbytes + q.scales.nbytes)
times = {b: [] for b in sess}
for _ in range(7):
    for b, (s, nb) in sess.items():
        for _ in range(5): s.run(None, {"A": a})
        t = time.perf_counter()
        for _ in range(100): s.run(None, {"A": a})
        times[b].append((time.perf_counter() - t) / 100)
for b, (s, nb) in sess.items():
    y = s.run(None, {"A": a})[0]
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    dt = statistics.median(times[b])
    print(f"int4 block {b:>3} level 4: {dt*1e6:7.1f} us (min {min(times[b])*1e6:.1f}, max {max(times[b])*1e6:.1f})  {nb/dt/1e9:5.1f} GB/s of weights+scales  max rel err {err:.4f}")
