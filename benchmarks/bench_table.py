"""Markdown table from `qvl-compile bench --json` outputs, side by side:
    python benchmarks/bench_table.py LABEL=FILE.json [LABEL=FILE.json ...]"""
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


def main() -> None:
    runs = [(a.split("=", 1)[0], json.load(open(a.split("=", 1)[1]))) for a in sys.argv[1:]]
    head = "| metric |" + "".join(f" {lab} qvl | eager {r['config']['eager_dtype']} | ratio |" for lab, r in runs)
    print(head)
    print("| --- |" + " --- | --- | --- |" * len(runs))
    for label, key, scale, fmt in ROWS:
        cells = []
        for _, r in runs:
            q, e = r["engines"]["qvl"].get(key), r["engines"]["eager"].get(key)
            ratio = q / e if q and e else float("nan")
            cells.append(f" {fmt.format(q * scale)} | {fmt.format(e * scale)} | {ratio:.2f}× |")
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
