"""Speculative decoding on ONNX Runtime's CUDA provider: the same tokens as plain greedy decoding (and as the CPU).

For each artifact (the tiny checkpoint compiled for cuda-sm61 = scatter cache + CUDA graphs, cuda = fp16 GQA cache):
`verify_step` against one-token steps (incl. truncation and continuing), then `generate_ids` plain vs
`speculative=DraftConfig()` on a copy-heavy text prompt and an image prompt, on CUDA and on the CPU. One JSON line
per artifact and case; exit 1 if any tokens differ.

    python benchmarks/speculative_cuda_check.py ART [ART ...] [--image IMG]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def verify_matches_steps(engine) -> bool:
    from qvl.runtime.mrope import decode_position_ids

    ids = np.random.default_rng(1).integers(0, 5000, 12)
    emb, pos = engine.embed(ids)[None], decode_position_ids(0, 12, 0)
    cache = engine.new_cache(32)
    ref = [int(engine.greedy_step(cache, emb[:, i:i + 1], pos[:, :, i:i + 1])[0]) for i in range(12)]
    engine.free(cache)
    cache = engine.new_cache(32)
    first = int(engine.greedy_step(cache, emb[:, :4], pos[:, :, :4])[0])
    got = [first, *engine.verify_step(cache, emb[:, 4:], pos[:, :, 4:])[0].tolist()]
    cache = engine.truncate(cache, 7, 32)
    again = [int(engine.greedy_step(cache, emb[:, i:i + 1], pos[:, :, i:i + 1])[0]) for i in range(7, 12)]
    engine.free(cache)
    return got == ref[3:] and again == ref[7:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--image", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    from qvl.runtime import GenerationStats
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model
    from qvl.runtime.speculative import DraftConfig

    text = ("Repeat this text exactly: the quick brown fox jumps over the lazy dog; "
            "the quick brown fox jumps over the lazy dog.")
    cases = {"copy": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    if args.image:
        cases["image"] = [{"role": "user", "content": [{"type": "image", "image": args.image},
                                                      {"type": "text", "text": "Read the text in this image."}]}]
    ok = True
    for art in args.artifacts:
        models = {dev: Model(Engine(art, device=dev)) for dev in ("cuda", "cpu")}
        cuda = models["cuda"].engine
        rec = {"artifact": art, "kv_mode": cuda.kv_mode, "cuda_graph": cuda.caches.cuda_graph,
               "cuda_graph_note": cuda.cuda_graph_note, "next_tokens_output": cuda.caches.has_next_tokens,
               "verify_matches_one_token_steps": verify_matches_steps(cuda)}
        ok &= rec["verify_matches_one_token_steps"]
        for name, msgs in cases.items():
            out = {}
            for dev, model in models.items():
                prompt = model.prepare(msgs)
                for mode, cfg in (("plain", None), ("spec", DraftConfig())):
                    stats = GenerationStats()
                    t = time.perf_counter()
                    ids = [tok for tok, _ in model.generate_ids(prompt, args.max_new_tokens, stats=stats, speculative=cfg)]
                    out[f"{dev}_{mode}"] = (ids, stats, time.perf_counter() - t)
            same = len({tuple(v[0]) for v in out.values()}) == 1
            ok &= same
            spec = out["cuda_spec"][1].speculation.to_dict()
            rec[name] = {"identical_cuda_cpu_plain_spec": same, "cuda_speculation": spec,
                         "cuda_plain_tok_s": round(out["cuda_plain"][1].decode_tokens_per_second, 1),
                         "cuda_spec_tok_s": round(out["cuda_spec"][1].decode_tokens_per_second, 1),
                         "tokens": out["cuda_plain"][0][:16]}
            if not same:
                rec[name]["all"] = {k: v[0] for k, v in out.items()}
        print(json.dumps(rec), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
