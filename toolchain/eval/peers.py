"""Peers in `qvl-compile bench --peer llama.cpp`: other CPU runtimes measured in the same run, on the same inputs.

`prepare_peers` (before any engine runs, so a missing compiler or a failed conversion stops the bench early):
the llama.cpp builds for this host (`peer_llamacpp`), and the checkpoint as GGUF of the type that matches the
artifact's weights (`peer_gguf.quant_for_bits`: int4 -> Q4_0, int8 -> Q8_0, fp32 -> F32) plus the F16 mmproj.
`run_peers` runs each build through both cases (`peer_run`). `peer_ratios` gives qvl / peer per metric.
"""

from __future__ import annotations

from pathlib import Path

from qvl.artifacts.manifest import read_manifest
from qvl.toolchain.eval import peer_gguf, peer_llamacpp, peer_run

# report["ratios_peers"][label][name] = qvl[key] / peer[key]
PEER_RATIOS = {
    "decode": "decode_tok_s",
    "decode_image": "decode_tok_s_image",
    "ttft_text": "ttft_text_s",
    "ttft_image": "ttft_image_s",
    "prefill": "prefill_tok_s",
    "prefill_image": "prefill_tok_s_image",
    "vision": "vision_s",
    "peak_rss": "peak_rss_bytes",
    "load": "load_s",
}


def artifact_weight_bits(artifact: Path) -> int | None:
    """The artifact's weight bits (its precision step's config), None for an unquantized artifact."""
    prec = read_manifest(Path(artifact), verify_graphs=False).precision or {}
    bits = (prec.get("config") or {}).get("weight_bits")
    return int(bits) if bits else None


def prepare_peers(peers: tuple[str, ...], artifact: Path, checkpoint: Path, cpu_flags: dict,
                  llamacpp_dir: str | Path | None = None, cache: Path | None = None, progress=lambda m: None) -> list[dict]:
    """[{"build", "ggufs", "summaries"}] per llama.cpp build to run (builds and conversions are cached)."""
    if "llama.cpp" not in peers:
        return []
    cache = Path(cache or peer_llamacpp.cache_root())
    builds = peer_llamacpp.builds_for(cpu_flags, llamacpp_dir, cache, progress)
    quant = peer_gguf.quant_for_bits(artifact_weight_bits(artifact))
    source = builds[0].source or peer_llamacpp.fetch_source(cache, progress)
    version = builds[0].version if builds[0].source else peer_llamacpp.VERSION
    ggufs = peer_gguf.ensure_ggufs(checkpoint, source, quant, cache, builds[0].tool("llama-quantize"), version, progress)
    summaries = {"quant": quant, "text": peer_gguf.gguf_summary(Path(ggufs["text"]), source),
                 "mmproj": peer_gguf.gguf_summary(Path(ggufs["mmproj"]), source)}
    return [{"build": b, "ggufs": ggufs, "summaries": summaries} for b in builds]


def run_peers(prepared: list[dict], inputs: dict, image: Path, threads: int, repeats: int, text_tokens: int,
              new_tokens: int, work_dir: Path, warmup: bool = True, step=lambda m: None) -> dict:
    return {p["build"].label: peer_run.run_peer(p["build"], p["ggufs"], p["summaries"], inputs, image, threads,
                                                repeats, text_tokens, new_tokens, work_dir, warmup, step)
            for p in prepared}


def peer_steps(prepared: list[dict], repeats: int, warmup: bool) -> int:
    """Progress steps `run_peers` reports: per build, llama-bench + the image processes."""
    return len(prepared) * (1 + int(warmup) + repeats)


def peer_ratios(qvl: dict, peers: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    return {label: {name: ratio(qvl.get(key), p.get(key)) for name, key in PEER_RATIOS.items()}
            for label, p in peers.items()}
