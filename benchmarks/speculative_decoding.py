"""Speculative decoding (prompt lookup, `runtime/speculative.py`) vs plain greedy decoding on one artifact.

For each prompt: the same greedy generation with and without `speculative=DraftConfig(max_draft=K)`, `--repeats`
times each (alternating, the median reported), asserting the tokens are identical. Reports decode tok/s, decoder
steps, drafted / accepted tokens, tokens per step, and the machine load next to the numbers (a shared machine's
load moves wall times; tokens per step does not depend on it).

    python benchmarks/speculative_decoding.py ART [--threads N] [--max-new-tokens 128] [--draft-tokens 8]
        [--repeats 3] [--json OUT.json] [--verify-cost 1,2,3,5,9]

`--verify-cost S,...`: also time one decoder step of S positions (`greedy_step` for 1, `verify_step` above) after
the copy prompt's prefill, the cache truncated back after each, interleaved, `--repeats` x 5 times: the price of a
verify step in one-token steps, which is what acceptance has to beat (a step that keeps m tokens wins iff m > the
price). With random weights (the synthetic 2B checkpoint) the answers are noise and prompt lookup finds nothing to
draft: the cost table is then the measurement that carries over to a real checkpoint.

Prompts: "copy" (repeat a ~100-word passage given in the prompt verbatim: the answer copies the prompt) and "free"
(an open question; the answer is new text).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PASSAGE = (
    "The committee met on Tuesday to review the quarterly budget. Revenue rose by four percent, driven mainly by "
    "the new subscription plans, while operating costs fell slightly after the move to the smaller office. The "
    "chair proposed to keep the hiring freeze until the end of the year, to postpone the website redesign, and to "
    "open a second support line for customers in the evening. The proposal was accepted with two abstentions. The "
    "next meeting is scheduled for the first Monday of next month at ten o'clock in the main conference room."
)
PROMPTS = {
    "copy": f"Repeat the following text exactly, word for word, and nothing else:\n\n{PASSAGE}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def run_once(model, prompt, max_new_tokens, draft):
    from qvl.runtime import GenerationStats

    stats = GenerationStats()
    t = time.perf_counter()
    ids = [tok for tok, _ in model.generate_ids(prompt, max_new_tokens, stats=stats, speculative=draft)]
    return ids, stats, time.perf_counter() - t


def verify_cost(model, text: str, sizes: list[int], repeats: int) -> dict:
    """Median seconds of one decoder step of S positions after the prompt's prefill (text only: rope delta 0)."""
    from qvl.runtime.mrope import decode_position_ids

    eng = model.engine
    prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": text}]}])
    n = len(prompt)
    cache = eng.new_cache(n + max(sizes) + 1)
    try:
        ids = prompt.input_ids
        eng.greedy_step(cache, eng.embed(ids)[None], decode_position_ids(0, n, 0))
        tail = eng.embed(ids[-max(sizes):])[None]  # any tokens: the cost does not depend on them
        times: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(repeats):
            for s in sizes:
                pos = decode_position_ids(n, s, 0)
                t = time.perf_counter()
                if s == 1:
                    eng.greedy_step(cache, tail[:, :1], pos)
                else:
                    eng.verify_step(cache, tail[:, :s], pos)
                times[s].append(time.perf_counter() - t)
                cache = eng.truncate(cache, n, n + max(sizes) + 1)
    finally:
        eng.free(cache)
    one = statistics.median(times[sizes[0]]) if sizes[0] == 1 else None
    return {str(s): {"ms_median": round(1000 * statistics.median(v), 2),
                     "x_one_token": round(statistics.median(v) / one, 2) if one else None} for s, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", default="copy,free")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verify-cost", default=None, help="comma-separated step lengths to time")
    args = ap.parse_args(argv)

    from qvl.runtime import load
    from qvl.runtime.speculative import DraftConfig

    model = load(args.artifact, device=args.device, threads=args.threads)
    draft = DraftConfig(max_draft=args.draft_tokens)
    out = {"artifact": os.path.abspath(args.artifact), "device": model.device, "threads": args.threads,
           "max_new_tokens": args.max_new_tokens, "draft_tokens": args.draft_tokens, "repeats": args.repeats,
           "loadavg_before": loadavg(), "cases": {}}
    for name in filter(None, args.prompts.split(",")):
        prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": PROMPTS[name]}]}])
        run_once(model, prompt, 4, None)  # warm-up (sessions, allocations)
        runs = {"plain": [], "speculative": []}
        ids_seen = {}
        for _ in range(args.repeats):
            for mode, cfg in (("plain", None), ("speculative", draft)):
                ids, stats, wall = run_once(model, prompt, args.max_new_tokens, cfg)
                ids_seen.setdefault(mode, ids)
                if ids != ids_seen[mode]:
                    raise SystemExit(f"{name} {mode}: tokens differ between repeats")
                runs[mode].append((stats, wall))
        identical = ids_seen["plain"] == ids_seen["speculative"]
        case = {"prompt_tokens": len(prompt), "identical_tokens": identical,
                "answer": model.prompts.decode(ids_seen["plain"])[:200]}
        for mode, rs in runs.items():
            stats = rs[0][0]
            case[mode] = {
                "generated_tokens": stats.generated_tokens,
                "decode_tok_s_median": round(statistics.median(s.decode_tokens_per_second for s, _ in rs), 3),
                "decode_tok_s_all": [round(s.decode_tokens_per_second, 3) for s, _ in rs],
                "wall_s_median": round(statistics.median(w for _, w in rs), 4),
                **({"speculation": stats.speculation.to_dict()} if stats.speculation else {}),
            }
        case["decode_speedup"] = round(case["speculative"]["decode_tok_s_median"] /
                                       max(case["plain"]["decode_tok_s_median"], 1e-9), 3)
        case["loadavg_after"] = loadavg()
        out["cases"][name] = case
        sp = case["speculative"]["speculation"]
        print(f"{name}: identical={identical} plain {case['plain']['decode_tok_s_median']} tok/s, speculative "
              f"{case['speculative']['decode_tok_s_median']} tok/s (x{case['decode_speedup']}); "
              f"{sp['steps']} steps, {sp['accepted']}/{sp['drafted']} accepted, {sp['tokens_per_step']:.2f} tok/step; "
              f"load {case['loadavg_after']}", file=sys.stderr, flush=True)
        if not identical:
            print(f"  tokens differ: plain {ids_seen['plain'][:20]} vs speculative {ids_seen['speculative'][:20]}",
                  file=sys.stderr)
    if args.verify_cost:
        sizes = [int(x) for x in args.verify_cost.split(",")]
        out["verify_cost"] = verify_cost(model, PROMPTS["copy"], sizes, 5 * args.repeats)
        out["loadavg_after_verify_cost"] = loadavg()
        print("verify cost (ms per step, median; x one-token step): " + ", ".join(
            f"S={k}: {v['ms_median']} ({v['x_one_token']}x)" for k, v in out["verify_cost"].items()), file=sys.stderr)
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if all(c["identical_tokens"] for c in out["cases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
