"""Markdown table from `qvl-compile bench --json` outputs, side by side:
    python benchmarks/bench_table.py LABEL=FILE.json [LABEL=FILE.json ...]          # qvl vs eager
    python benchmarks/bench_table.py --peers LABEL=FILE.json [LABEL=FILE.json ...]  # qvl vs each --peer row
Every ratio is qvl / the other engine."""
import json
import sys

ROWS = [  # (label, engine key, scale, format)
    ("decode tok/s (text: 128-token prompt, 64 new)", "decode_tok_s", 1, "{:.2f}"),
    ("decode tok/s (image)", "decode_tok_s_image", 1, "{:.2f}"),
    ("TTFT text, s", "ttft_text_s", 1, "{:.2f}"),
    ("TTFT image (448², 196 visual + 32 question tokens), s", "ttft_image_s", 1, "{:.2f}"),
    ("prefill tok/s (text)", "prefill_tok_s", 1, "{:.1f}"),
    ("vision encoder, s", "vision_s", 1, "{:.2f}"),
    ("peak RSS, GB", "peak_rss_bytes", 1e-9, "{:.2f}"),
    ("load, s", "load_s", 1, "{:.2f}"),
]
# With --peers also: the image prompt's prefill, and decode against the bandwidth roofline (each engine its own bytes).
PEER_ROWS = ROWS + [
    ("prefill tok/s (image, 240 tokens)", "prefill_tok_s_image", 1, "{:.1f}"),
    ("weights read / token, GB", "bytes_per_token", 1e-9, "{:.3f}"),
    ("decode efficiency (of bandwidth roofline), %", "decode_efficiency", 100, "{:.1f}"),
]


def _others(run: dict, peers: bool) -> list[tuple[str, dict]]:
    """The engines qvl is compared with in one run: eager, or every peer row (llama.cpp, llama.cpp-avx2)."""
    if peers:
        return [(f"{label} {p.get('quant', '')}".strip(), p) for label, p in run["peers"].items()]
    return [(f"eager {run['config']['eager_dtype']}", run["engines"]["eager"])]


def main() -> None:
    args = sys.argv[1:]
    peers = "--peers" in args
    runs = [(a.split("=", 1)[0], json.load(open(a.split("=", 1)[1]))) for a in args if a != "--peers"]
    head = "| metric |"
    for lab, r in runs:
        head += f" {lab} qvl |" + "".join(f" {name} | ratio |" for name, _ in _others(r, peers))
    print(head)
    print("| --- |" + "".join(" --- |" * (1 + 2 * len(_others(r, peers))) for _, r in runs))
    for label, key, scale, fmt in (PEER_ROWS if peers else ROWS):
        cells = []
        for _, r in runs:
            q = r["engines"]["qvl"].get(key)
            cells.append(f" {fmt.format(q * scale)} |")
            for _, other in _others(r, peers):
                e = other.get(key)
                ratio = q / e if q and e else float("nan")
                cells.append(f" {fmt.format(e * scale)} | {ratio:.2f}× |")
        print(f"| {label} |" + "".join(cells))
    print()
    for lab, r in runs:
        spread = ", ".join(f"{x:.1f}" for x in r["bandwidth_spread_gbs"])
        q = r["engines"]["qvl"]
        print(f"- {lab}: bandwidth {r['bandwidth_gbs']:.1f} GB/s (min, median, max: {spread}), bytes/token "
              f"{r['bytes_per_token'] / 1e9:.3f} GB, roofline {r['roofline_decode_tok_s']:.1f} tok/s, decode "
              f"{q['decode_tok_s']:.2f} tok/s = {100 * r['decode_efficiency']:.0f}% of roofline; artifact "
              f"{r['artifact']['size_bytes'] / 1e9:.2f} GB; {r['cpu'].get('mlas_isa')} kernels; {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
