"""MatMulNBits (int4, symmetric, block 32/128) on ORT CUDA vs ORT CPU vs a numpy dequantized reference."""
import sys
import numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as T, numpy_helper as nh
from qvl.artifacts.nbits_codes import *  # noqa
def build(K, N, bits, block, level):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    nb = K // block
    wb = w.T.reshape(N, nb, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(wb).max(-1) / qmax
    q = np.clip(np.round(wb / scale[..., None]), -qmax - 1, qmax).astype(np.int32) + 2 ** (bits - 1)
    deq = ((q - 2 ** (bits - 1)) * scale[..., None]).reshape(N, K).T
    if bits == 4:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        packed = q.astype(np.uint8)
    node = h.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=level)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, ["M", K])], [h.make_tensor_value_info("y", T.FLOAT, ["M", N])],
                     [nh.from_array(packed.reshape(N, nb, -1), "w"), nh.from_array(scale.astype(np.float32).reshape(-1), "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]); m.ir_version = 9
    return m.SerializeToString(), deq
for K, N, block in ((256, 512, 32), (2048, 6144, 128), (6144, 2048, 128)):
    for level in (0, 4):
        model, deq = build(K, N, 4, block, level)
        x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
        ref = x.astype(np.float64) @ deq
        out = {}
        for p in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            s = ort.InferenceSession(model, providers=[p])
            out[p[:4]] = s.run(None, {"x": x})[0]
        err = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in out.items()}
        print(f"K={K} N={N} block={block} level={level} rel.err vs numpy: {err}", flush=True)
