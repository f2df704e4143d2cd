"""Follow-up turn on the same image: time to first token with the prefix cache vs the first turn and vs from scratch.

    python benchmarks/followup_ttft.py ART [--threads 2] [--repeats 3] [--answers forced,resent] [--json OUT]

Turn 1 is the bench's image case (448² picture, 196 visual + 32 question tokens) in a `model.session()`; turn 2
appends turn 1's answer and a new 16-token question and runs in the same session (prefix cache: KV of turn 1 kept,
image features cached) and, for comparison, from scratch on a fresh model call (no cache). Per answer mode it
reports medians of the TTFTs, the ratio follow-up / first turn (issue #16 asks <= 0.1), the prompt tokens reused
and prefilled, the prompt preparation time TTFT leaves out (`GenerationStats.time_to_first_token` starts at the
prepared prompt), and whether the cached follow-up's tokens equal the from-scratch ones.

Random weights answer with token soup whose text does not tokenize back into the generated ids, so what turn 2
can reuse depends on how turn 1's answer is made:

* `forced` (a trained model's answer): turn 1 decodes a fixed 32-token English answer and `<|im_end|>`
  (`generate_ids(forced_tokens=...)`: the same decode steps, the forced ids fed back as picked ones), and the
  client resends that text, which tokenizes back into those ids: turn 2 prefills the new turn only.
* `resent`: turn 1 decodes 32 tokens of its own; the client resends the fixed answer instead, which turn 2 then
  prefills as well (32 tokens more): an upper bound.
* `generated`: the client resends what the random model answered; reuse stops where its retokenization parts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from qvl.runtime import GenerationStats, load
from qvl.runtime.prompt import PromptBuilder
from qvl.toolchain.eval.bench_inputs import _fit, build_inputs

# Turn 1's answer in the `forced` and `resent` modes (its tokens round-trip through text).
ANSWER = ("The picture shows a red disc on the left and a blue square on the right, both on a smooth background "
          "that fades from dark at the top to light at the bottom, and they do not overlap.")
ANSWER_TOKENS, FOLLOW_UP_TOKENS = 32, 16
FOLLOW_UP = ("Now ignore the colours and count the straight edges you can see in the picture, then say which "
             "corner of the image is brightest and why that might be so.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--answers", default="forced,resent", help="comma-separated: forced, resent, generated")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    modes = [m.strip() for m in a.answers.split(",") if m.strip()]
    if not modes or set(modes) - {"forced", "resent", "generated"}:
        ap.error(f"--answers: pick from forced, resent, generated (got {a.answers!r})")
    tok = PromptBuilder.from_dir(a.artifact).tokenizer
    count = lambda t: len(tok.encode(t, add_special_tokens=False).ids)
    answer_text = _fit(count, tok, ANSWER, ANSWER_TOKENS, "answer")
    answer_ids = tok.encode(answer_text, add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
    question2 = _fit(count, tok, FOLLOW_UP, FOLLOW_UP_TOKENS, "follow-up")
    out = {"artifact": str(a.artifact), "threads": a.threads, "repeats": a.repeats, "answer_tokens": ANSWER_TOKENS,
           "question2_tokens": FOLLOW_UP_TOKENS, "modes": {}}
    with tempfile.TemporaryDirectory() as work:
        case = build_inputs(a.artifact, Path(work))["image"]
        model = load(a.artifact, device="cpu", threads=a.threads)
        opts = dict(max_new_tokens=a.new_tokens, temperature=0.0)
        model.generate(case["messages"], max_new_tokens=2, temperature=0.0)  # warm-up: sessions' first-run costs
        for mode in modes:
            runs = []
            for _ in range(a.repeats):
                with model.session() as chat:
                    s1 = GenerationStats()
                    forced = answer_ids if mode == "forced" else None
                    ids = [t for t, _ in chat.generate_ids(model.prepare(case["messages"]), a.new_tokens, stats=s1,
                                                           forced_tokens=forced)]
                    answer = model.prompts.decode([t for t in ids if t not in model.stop_ids])
                    msgs = case["messages"] + [
                        {"role": "assistant", "content": answer if mode == "generated" else answer_text},
                        {"role": "user", "content": [{"type": "text", "text": question2}]}]
                    s2 = GenerationStats()
                    cached = chat.generate(msgs, stats=s2, **opts)
                t = time.perf_counter()
                model.prepare(msgs)  # what TTFT leaves out: rendering, tokenizing, loading + resizing the image
                prepare_s = time.perf_counter() - t
                s3 = GenerationStats()
                scratch = model.generate(msgs, stats=s3, **opts)
                runs.append({"first_ttft_s": s1.time_to_first_token, "followup_ttft_s": s2.time_to_first_token,
                             "scratch_followup_ttft_s": s3.time_to_first_token, "first_prompt_tokens": s1.prompt_tokens,
                             "first_answer_tokens": len(ids), "followup_prompt_tokens": s2.prompt_tokens,
                             "followup_reused_tokens": s2.reused_tokens, "followup_prefilled_tokens": s2.prefill_tokens,
                             "followup_images_encoded": s2.images_encoded,
                             "followup_image_cache_hits": s2.image_cache_hits,
                             "followup_prepare_s": prepare_s, "same_answer_as_scratch": cached == scratch})
            keys = ("first_ttft_s", "followup_ttft_s", "scratch_followup_ttft_s", "followup_prepare_s")
            med = {k: statistics.median(r[k] for r in runs) for k in keys}
            out["modes"][mode] = {**med, "ratio_followup_vs_first": med["followup_ttft_s"] / med["first_ttft_s"],
                                  "ratio_followup_vs_scratch": med["followup_ttft_s"] / med["scratch_followup_ttft_s"],
                                  "all_same_as_scratch": all(r["same_answer_as_scratch"] for r in runs), "runs": runs}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
