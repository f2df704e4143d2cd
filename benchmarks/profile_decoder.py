"""ORT profile of decoder ops for one artifact: python benchmarks/profile_decoder.py ARTIFACT [TOKENS] (greedy, 2 threads).

The profiled session is the one the runtime makes (the same graph file, and qvl's kernel swapped in when it is active
here: `QVL_KERNELS=ort` profiles ORT's). Only the decode steps count: node events inside the first Run (the
prompt's prefill) are left out."""
import sys, json, time, collections, statistics
import onnxruntime as ort
from qvl.runtime import load
from qvl.runtime import kernels
from qvl.runtime.backends.ort import cpu_decoder_source
art = sys.argv[1]
m = load(art, threads=2)
# rebuild the decoder session as the runtime does, with profiling on
eng = m.engine
files, plain_so, _ = eng._graph_files("cpu", 2)
so = eng._options(2); so.graph_optimization_level = plain_so.graph_optimization_level
so.enable_profiling = True; so.profile_file_prefix = "/tmp/ortprof"
source, note = cpu_decoder_source(eng.artifact / files["decoder"], so, kernels.choose())
print("decoder linears:", note)
eng.decoder = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
p = m.prepare([{"role": "user", "content": [{"type": "text", "text": "Describe a sunny day at the beach in two sentences."}]}])
n_tok = int(sys.argv[2]) if len(sys.argv) > 2 else 12
t = time.time(); ids = [tk for tk, _ in m.generate_ids(p, n_tok, ignore_stop=True)]; print(n_tok, "tokens", time.time() - t)
f = eng.decoder.end_profiling()
ev = json.load(open(f))
runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "Session" and e["name"] == "model_run")
prefill_end = runs[0][1]
steps = runs[1:]
print(f"decode steps {len(steps)}, median Run {statistics.median(b - a for a, b in steps) / 1e3:.2f} ms")
agg = collections.Counter(); cnt = collections.Counter()
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= prefill_end:
        op = e["args"].get("op_name"); agg[op] += e["dur"]; cnt[op] += 1
tot = sum(agg.values())
for op, d in agg.most_common(12):
    print(f"{op:32s} {d/1e3:10.1f} ms  {100*d/tot:5.1f}%  n={cnt[op]}")
