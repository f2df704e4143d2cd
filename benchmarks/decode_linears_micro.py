"""The decoder's linear layers at 2B shapes, one token (M=1), on ORT CPU: separate vs packed (q/k/v and gate/up
merged, what `passes/linear_fusion.py` emits), int4/int8, block sizes, accuracy levels.

    python benchmarks/decode_linears_micro.py [--layers 28] [--threads 2] [--rounds 5] [--json OUT]

Two working sets per configuration, interleaved round by round so a noisy neighbour hits all variants alike:
* `resident`: 1 layer (int4 ~14 MB) run 28 times per sample: weights stay in the LLC -> the kernels' compute rate
  (the int8 dot-product / dequantization bound of decode);
* `streamed`: `--layers` distinct layers (int4 ~0.4 GB): weights come from DRAM -> the decode-like rate.
Reports ms per 28 layers, and GB/s of weight bytes (packed codes + scales) for each.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T, helper, numpy_helper

from qvl.passes.precision import quantize_blockwise

H, KV, F = 2048, 1024, 6144  # hidden, k/v width (8 heads x 128), MLP


def _nbits(name, x, w, bits, blk, acc, inits, nodes):
    if bits == 0:  # DynamicQuantizeMatMul: int8 [K, N] weights, per-column scales, activations quantized per call
        scale = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
        codes = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{name}.B"),
                  numpy_helper.from_array(scale, f"{name}.S")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{name}.B", f"{name}.S"], [name],
                                      domain="com.microsoft"))
        return codes.nbytes + scale.nbytes
    q = quantize_blockwise(w, bits, blk, True)
    inits += [numpy_helper.from_array(q.packed, f"{name}.B"),
              numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), f"{name}.S")]
    nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.B", f"{name}.S"], [name], domain="com.microsoft",
                                  K=w.shape[1], N=w.shape[0], bits=bits, block_size=blk, accuracy_level=acc))
    return q.packed.nbytes + q.scales.nbytes


def build(layers: int, bits: int, blk: int, acc: int, packed: bool, rng) -> tuple[bytes, int]:
    inits, nodes, outs, nbytes = [], [], [], 0
    h = "x"
    for i in range(layers):
        W = lambda n, k: (rng.standard_normal((n, k), dtype=np.float32) * 0.02)
        p = f"l{i}"
        if packed:
            nbytes += _nbits(f"{p}.qkv", h, W(H + 2 * KV, H), bits, blk, acc, inits, nodes)
            inits.append(numpy_helper.from_array(np.array([H, KV, KV], np.int64), f"{p}.split"))
            nodes.append(helper.make_node("Split", [f"{p}.qkv", f"{p}.split"], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1))
        else:
            for n, width in (("q", H), ("k", KV), ("v", KV)):
                nbytes += _nbits(f"{p}.{n}", h, W(width, H), bits, blk, acc, inits, nodes)
        outs += [f"{p}.k", f"{p}.v"]
        nbytes += _nbits(f"{p}.o", f"{p}.q", W(H, H), bits, blk, acc, inits, nodes)
        if packed:
            nbytes += _nbits(f"{p}.gu", f"{p}.o", W(2 * F, H), bits, blk, acc, inits, nodes)
            inits.append(numpy_helper.from_array(np.array([F, F], np.int64), f"{p}.split2"))
            nodes.append(helper.make_node("Split", [f"{p}.gu", f"{p}.split2"], [f"{p}.g", f"{p}.u"], axis=-1))
        else:
            nbytes += _nbits(f"{p}.g", f"{p}.o", W(F, H), bits, blk, acc, inits, nodes)
            nbytes += _nbits(f"{p}.u", f"{p}.o", W(F, H), bits, blk, acc, inits, nodes)
        nodes.append(helper.make_node("Mul", [f"{p}.g", f"{p}.u"], [f"{p}.gu_mul"]))
        nbytes += _nbits(f"{p}.d", f"{p}.gu_mul", W(H, F), bits, blk, acc, inits, nodes)
        h = f"{p}.d"
    vi = lambda n, w: helper.make_tensor_value_info(n, T.FLOAT, [1, w])
    g = helper.make_graph(nodes, "linears", [vi("x", H)], [vi(h, H)] + [vi(o, KV) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString(), nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    # bits:block:level; bits 0 = DynamicQuantizeMatMul (int8 weights per column)
    ap.add_argument("--configs", default="4:32:4,4:64:4,4:128:4,8:32:4,8:128:4,4:128:0,0:0:0")
    ap.add_argument("--packed", default="0,1", help="0 separate, 1 packed, or both")
    ap.add_argument("--json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    # The variants' sessions run interleaved: a spinning pool of the one that just ran competes with the next one's
    # threads on 2 cores (measured: 2x slower, min-max 37-49 ms); no spinning keeps each sample to its own session.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    x = rng.standard_normal((1, H), dtype=np.float32)
    variants = {}
    for cfg in a.configs.split(","):
        bits, blk, acc = map(int, cfg.split(":"))
        for packed in [bool(int(p)) for p in a.packed.split(",")]:
            for ws, layers in (("resident", 1), ("streamed", a.layers)):
                model, nbytes = build(layers, bits, blk, acc, packed, rng)
                s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
                variants[(bits, blk, acc, packed, ws)] = (s, nbytes, 28 // layers if ws == "resident" else 1)
    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, (s, nbytes, reps) in variants.items():
            for _ in range(2):
                s.run(None, {"x": x})
            t = time.perf_counter()
            n = 5
            for _ in range(n * reps):
                s.run(None, {"x": x})
            times[k].append((time.perf_counter() - t) / n * (28 / (a.layers if reps == 1 else 28)))
    rows = []
    for k, ts in times.items():
        bits, blk, acc, packed, ws = k
        s, nbytes, reps = variants[k]
        ms = float(np.median(ts)) * 1e3  # per 28 layers
        per_layer_bytes = nbytes / (1 if ws == "resident" else a.layers)
        rows.append({"bits": bits, "block_size": blk, "accuracy_level": acc, "packed": packed, "working_set": ws,
                     "ms_per_28_layers": round(ms, 3), "weight_gbs": round(per_layer_bytes * 28 / ms / 1e6, 2),
                     "spread_ms": [round(min(ts) * 1e3, 3), round(max(ts) * 1e3, 3)]})
        print(f"int{bits} block {blk:>3} level {acc} {'packed  ' if packed else 'separate'} {ws:<8} "
              f"{ms:8.2f} ms/28 layers  {rows[-1]['weight_gbs']:6.1f} GB/s  (min {min(ts)*1e3:.2f}, max {max(ts)*1e3:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "layers": a.layers, "ort": ort.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
