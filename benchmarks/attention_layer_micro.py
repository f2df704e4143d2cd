"""One decoder layer's attention, RowwiseGroupQueryAttention vs ORT's GroupQueryAttention, as one-node sessions with the
runtime's shared (in-place) cache bound by I/O binding, 2B shapes (16 q / 8 KV heads, head 128), 2 threads:

    python benchmarks/attention_layer_micro.py

a first prompt of 2048 and 1024 positions, and one decode step after 300 and 2000 held positions; ms per call."""
import sys
import time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import test_rowwise_attention as T
T.HQ, T.HKV, T.D = 16, 8, 128
def timeit(s, ck, cv, q, k, v, tot, n):
    T._bound_run(s, ck, cv, q, k, v, tot)
    t = time.perf_counter()
    for _ in range(n): T._bound_run(s, ck, cv, q, k, v, tot)
    return (time.perf_counter() - t) / n
for S, P in ((2048, 0), (1024, 0), (1, 300), (1, 2000)):
    cap = S + P
    T.CAP = cap
    model = T._gqa(heads=16, kv_heads=8, scale=128 ** -0.5)
    sess = {"ort": T._session(model, False), "rowwise": T._session(T._swapped(model)[0], True)}
    q, k, v = T._qkv(1, S, 0)
    pk, pv = T._past(1, [P], 1)
    for name, s in sess.items():
        dt = timeit(s, pk.copy(), pv.copy(), q, k, v, [P + S], 5 if S > 1 else 50)
        print(f"S={S} past={P} {name}: {dt*1e3:.3f} ms")
