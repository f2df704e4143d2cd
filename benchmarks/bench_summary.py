"""One screen of a `qvl-compile bench --json` report: every engine's speeds and memory, ratios, the roofline.

    python benchmarks/bench_summary.py REPORT.json
"""
import json
import sys

KEYS = ("decode_tok_s", "decode_tok_s_image", "ttft_text_s", "ttft_image_s", "prefill_tok_s", "vision_s", "load_s",
        "peak_rss_bytes", "decode_efficiency")


def main() -> None:
    r = json.load(open(sys.argv[1]))
    print(f"device {r.get('device')}  gpu {json.dumps(r.get('gpu'))}")
    print(f"bandwidth {r['bandwidth_gbs']:.0f} GB/s ({r.get('bandwidth_kind')}), spread {r['bandwidth_spread_gbs']}, "
          f"bytes/token {r['bytes_per_token'] / 1e9:.3f} GB -> roofline {r['roofline_decode_tok_s']:.0f} tok/s")
    for name, eng in r["engines"].items():
        cells = "  ".join(f"{k}={eng[k]:.4g}" for k in KEYS if isinstance(eng.get(k), (int, float)))
        print(f"{name:12s} {cells}  device_memory={json.dumps(eng.get('device_memory'))}")
        print(f"{'':12s} info={json.dumps(eng.get('info'))}")
    for dt, ratios in (r.get("ratios_vs") or {"baseline": r["ratios"]}).items():
        print(f"qvl vs eager {dt}: " + "  ".join(f"{k}={v:.3g}" for k, v in ratios.items() if v is not None))


if __name__ == "__main__":
    main()
