"""Per-token decode latency, runtime vs eager (issue 4 measurement):
    python benchmarks/decode_latency.py qvl ARTIFACT CHECKPOINT     # runtime
    python benchmarks/decode_latency.py eager ARTIFACT CHECKPOINT   # transformers generate, per-token clock
16 greedy tokens after a short text prompt, 2 threads; prints one JSON line. Run each engine in its own process."""
import sys, time, json, resource
which, art, ckpt = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe a sunny day at the beach in two sentences."}]}]
N = 16
if which == "qvl":
    from qvl.runtime import load, GenerationStats
    t = time.time(); m = load(art, threads=2); load_s = time.time() - t
    p = m.prepare(msgs)
    st = GenerationStats()
    ids = [tk for tk, _ in m.generate_ids(p, N, stats=st)]
    out = dict(engine="qvl", load_s=load_s, ttft=st.time_to_first_token, decode_tok_s=st.decode_tokens_per_second, ms_per_token=1000/st.decode_tokens_per_second, ids=ids)
else:
    import torch
    torch.set_num_threads(2)
    from qvl.toolchain.eval.reference import EagerReference
    t = time.time(); ref = EagerReference(ckpt, threads=2); load_s = time.time() - t
    inputs = ref.prepare(msgs)
    times = []
    from transformers import LogitsProcessor
    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            times.append(time.perf_counter()); return scores
    t0 = time.perf_counter()
    with torch.inference_mode():
        o = ref.model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False, logits_processor=[Clock()])
    ids = o[0, inputs["input_ids"].shape[1]:].tolist()
    dec = (times[-1] - times[0]) / (len(times) - 1)
    out = dict(engine="eager", load_s=load_s, ttft=times[0]-t0, decode_tok_s=1/dec, ms_per_token=dec*1000, ids=ids)
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps(out))
