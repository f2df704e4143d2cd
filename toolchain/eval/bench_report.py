"""The bench report for people: a plain-text table (`format_bench`) and a PNG of grouped bars (`plot_bench`)."""

from __future__ import annotations

from pathlib import Path


def plot_bench(result: dict, path: str | Path) -> Path:
    """Grouped bars, runtime vs eager: decode tok/s, TTFT text and image, peak RSS (one panel each)."""
    import matplotlib  # optional: only --plot needs it (bench_command checks it is there before the run)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, e, r = result["engines"]["qvl"], result["engines"]["eager"], result["ratios"]
    peers = result.get("peers") or {}  # --peer llama.cpp: one more bar per peer build
    names = ["qvl runtime", "eager", *peers]
    engines = [q, e, *peers.values()]
    panels = [
        ("decode tok/s (higher is better)", [x["decode_tok_s"] for x in engines], r["decode"]),
        ("TTFT text, s (lower is better)", [x["ttft_text_s"] for x in engines], r["ttft_text"]),
        ("TTFT image, s (lower is better)", [x["ttft_image_s"] for x in engines], r["ttft_image"]),
        ("peak RSS, GB (lower is better)", [x["peak_rss_bytes"] / 1e9 for x in engines], r["peak_rss"]),
    ]
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")[: len(names)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 2 * len(peers), 4))
    for ax, (title, values, ratio) in zip(axes, panels):
        bars = ax.bar(names, values, color=colors)
        if peers:
            ax.tick_params(axis="x", labelsize=8)
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(title + ("" if ratio is None else f"\nqvl/eager = {ratio:.2f}x"), fontsize=10)
        ax.margins(y=0.15)
    roof = result.get("roofline_decode_tok_s")
    if roof and roof < 4 * max(x["decode_tok_s"] for x in engines):
        axes[0].axhline(roof, ls="--", c="gray", lw=1)
        axes[0].annotate(f"roofline {roof:.1f}", (0.5, roof), xycoords=("axes fraction", "data"),
                         ha="center", va="bottom", fontsize=8, color="gray")
    cfg, cpu = result.get("config", {}), result.get("cpu", {})
    fig.suptitle(
        f"{cpu.get('model', 'CPU')} ({cpu.get('mlas_isa', '')}), threads={cfg.get('threads')}; eager "
        f"{cfg.get('eager_dtype')}; bandwidth {result['bandwidth_gbs']:.1f} GB/s", fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def format_bench(result: dict) -> str:
    """A plain-text summary table."""
    q, e, r = result["engines"]["qvl"], result["engines"]["eager"], result["ratios"]
    cfg = result["config"]

    def row(label, a, b, ratio, fmt):
        rs = "-" if ratio is None else f"{ratio:.2f}x"
        return f"{label:<26}{fmt.format(a):>14}{fmt.format(b):>14}{rs:>10}"

    img = cfg["image"]
    lines = [
        f"threads {cfg['threads']}, repeats {cfg['repeats']}, eager {cfg['eager_dtype']} ({cfg['eager_attn']}); "
        f"text prompt {cfg['text_prompt_tokens']} tokens, image {img['image_size'][0]}x{img['image_size'][1]} "
        f"= {img['visual_tokens']} visual tokens ({img['prompt_tokens']} prompt tokens); {cfg['new_tokens']} new tokens",
        f"{'':<26}{'qvl runtime':>14}{'eager':>14}{'qvl/eager':>10}",
        row("decode tok/s (text)", q["decode_tok_s"], e["decode_tok_s"], r["decode"], "{:.2f}"),
        row("decode tok/s (image)", q["decode_tok_s_image"], e["decode_tok_s_image"], r["decode_image"], "{:.2f}"),
        row("TTFT text s", q["ttft_text_s"], e["ttft_text_s"], r["ttft_text"], "{:.3f}"),
        row("TTFT image s", q["ttft_image_s"], e["ttft_image_s"], r["ttft_image"], "{:.3f}"),
        row("prefill tok/s (text)", q["prefill_tok_s"], e["prefill_tok_s"], r["prefill"], "{:.1f}"),
        row("vision encoder s", q["vision_s"], e["vision_s"], r["vision"], "{:.3f}"),
        row("peak RSS GB", q["peak_rss_bytes"] / 1e9, e["peak_rss_bytes"] / 1e9, r["peak_rss"], "{:.3f}"),
        row("load s", q["load_s"], e["load_s"], r["load"], "{:.2f}"),
        row("weights read/token MB", q["bytes_per_token"] / 1e6, e["bytes_per_token"] / 1e6, None, "{:.1f}"),
        row("decode roofline tok/s", q["roofline_decode_tok_s"], e["roofline_decode_tok_s"], None, "{:.2f}"),
        row("decode efficiency", q["decode_efficiency"], e["decode_efficiency"], None, "{:.1%}"),
        f"memory bandwidth {result['bandwidth_gbs']:.1f} GB/s best "
        f"(min/median/max {' / '.join(f'{v:.1f}' for v in result['bandwidth_spread_gbs'])}); "
        f"artifact {result['artifact']['size_bytes'] / 1e9:.3f} GB on disk",
        result["cpu"]["note"],
    ]
    lines += format_bounds(result.get("bounds") or {})
    if result.get("peers"):
        lines += ["", format_peers(result)]
    return "\n".join(lines)


def format_bounds(bounds: dict) -> list[str]:
    """Which decode bound binds and how close decode gets to it; the vision encoder against the GEMM peaks."""
    out = []
    if "compute_tok_s" in bounds:
        out.append(f"decode bounds: bandwidth {bounds['bandwidth_tok_s']:.2f} tok/s, compute (cache-resident "
                   f"linears) {bounds['compute_tok_s']:.2f} tok/s -> {bounds['binding']} binds; decode at "
                   f"{bounds['decode_efficiency_vs_binding']:.1%} of it")
    v = bounds.get("vision")
    if v and "sgemm_peak_gflops" in v:
        out.append(f"vision encoder: {v['flops'] / 1e9:.1f} GFLOP in {v['seconds']:.3f} s = {v['gflops']:.1f} GFLOP/s; "
                   f"SGEMM peak {v['sgemm_peak_gflops']:.1f} ({v['fraction_of_sgemm_peak']:.0%}), fastest kernel "
                   f"{v['fastest_kernel']} {v['fastest_kernel_gflops']:.1f} ({v['fraction_of_fastest_kernel']:.0%}) "
                   f"at the MLP shape {v['mlp_shape']}")
    return out


def format_peers(result: dict) -> str:
    """The --peer rows: qvl beside each llama.cpp build, the ratio qvl/peer after each, and the kernels each ran."""
    q, peers, ratios = result["engines"]["qvl"], result["peers"], result["ratios_peers"]
    labels = list(peers)
    rows = [("decode tok/s (text)", "decode_tok_s", "decode", "{:.2f}", 1),
            ("decode tok/s (image)", "decode_tok_s_image", "decode_image", "{:.2f}", 1),
            ("prefill tok/s (text)", "prefill_tok_s", "prefill", "{:.1f}", 1),
            ("prefill tok/s (image)", "prefill_tok_s_image", "prefill_image", "{:.1f}", 1),
            ("TTFT text s", "ttft_text_s", "ttft_text", "{:.3f}", 1),
            ("TTFT image s", "ttft_image_s", "ttft_image", "{:.3f}", 1),
            ("vision encoder s", "vision_s", "vision", "{:.3f}", 1),
            ("peak RSS GB", "peak_rss_bytes", "peak_rss", "{:.3f}", 1e-9),
            ("load s", "load_s", "load", "{:.2f}", 1),
            ("weights read/token MB", "bytes_per_token", None, "{:.1f}", 1e-6),
            ("decode efficiency", "decode_efficiency", None, "{:.1%}", 1)]
    first = next(iter(peers.values()))
    out = [f"peers: llama.cpp text GGUF {first['quant']} ({first['gguf']['text']['file_bytes'] / 1e9:.3f} GB) + mmproj "
           f"F16, same threads and inputs (definitions: benchmarks/README.md, 'Peer: llama.cpp')",
           f"{'':<26}{'qvl runtime':>14}" + "".join(f"{l:>16}{'qvl/peer':>10}" for l in labels)]
    for label, key, rname, fmt, scale in rows:
        line = f"{label:<26}{fmt.format(q[key] * scale):>14}"
        for l in labels:
            v, rv = peers[l].get(key), ratios[l].get(rname) if rname else None
            line += f"{'-' if v is None else fmt.format(v * scale):>16}{'-' if rv is None else f'{rv:.2f}x':>10}"
        out.append(line)
    flags = [f for f, on in result["cpu"]["flags"].items() if on]
    linear = q.get("info", {}).get("decoder_linear_kernel")
    out.append(f"kernels: qvl = ONNX Runtime MLAS {result['cpu']['mlas_isa']} (host flags: {', '.join(flags)})"
               + (f"; decoder linears: {linear}" if linear else ""))
    for l in labels:
        s = peers[l]["simd"]
        on = [k for k, v in s.items() if k != "isa" and v]
        out.append(f"kernels: {l} = {s['isa']} ({' '.join(on)}; AVX512 = {s['AVX512']}), build {peers[l]['build']['flavour']}")
    return "\n".join(out)
