"""Markdown table of `qvl-compile bench --peer llama.cpp --json` runs: qvl and every peer row side by side.

    python benchmarks/peer_table.py int4=2b-int4-vs-llamacpp-avx2host.json int8=2b-int8-vs-llamacpp-avx2host.json
"""
from __future__ import annotations

import json
import sys

ROWS = (  # (label, key, scale, digits)
    ("decode tok/s (text)", "decode_tok_s", 1, 2),
    ("decode tok/s (image)", "decode_tok_s_image", 1, 2),
    ("prefill tok/s (text, 128)", "prefill_tok_s", 1, 1),
    ("prefill tok/s (image, 240)", "prefill_tok_s_image", 1, 1),
    ("TTFT text, s", "ttft_text_s", 1, 2),
    ("TTFT image, s", "ttft_image_s", 1, 2),
    ("vision encoder, s", "vision_s", 1, 2),
    ("peak RSS, GB", "peak_rss_bytes", 1e-9, 2),
    ("load, s", "load_s", 1, 2),
    ("weights read / token, GB", "bytes_per_token", 1e-9, 3),
    ("decode efficiency (of bandwidth roofline)", "decode_efficiency", 100, 1),
)


def columns(name: str, run: dict) -> list[tuple[str, dict]]:
    cols = [(f"qvl {name}", run["engines"]["qvl"])]
    for label, peer in run["peers"].items():
        cols.append((f"{label} {peer.get('quant', '')}".strip(), peer))
    return cols


def main(args: list[str]) -> None:
    cols = []
    for arg in args:
        name, path = arg.split("=", 1)
        with open(path) as f:
            cols += columns(name, json.load(f))
    print("| metric | " + " | ".join(c for c, _ in cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for label, key, scale, digits in ROWS:
        cells = [f"{row[key] * scale:.{digits}f}" if row.get(key) is not None else "–" for _, row in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
