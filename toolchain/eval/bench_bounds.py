"""The bench's bounds next to the measured speeds: which bound binds decode, and the vision encoder's GEMM rate.

Decode has two bounds, both measured in the same run as the engines:
* bandwidth: `roofline_decode_tok_s` = read bandwidth / weight bytes per token (bench.py);
* compute: `decode_bound.decode_compute_bound` = the decoder's linears timed with cache-resident weights.
The lower one binds; the efficiency that matters is measured decode / binding bound.

The vision encoder is a compute-bound GEMM stack: its FLOPs (from the checkpoint's vision config and the image's
patch grid) over the measured encoder time, against the SGEMM peak and the fastest int8 kernel that
`gemm_rates` measures at the encoder's MLP shape in the same run.
"""

from __future__ import annotations


def vision_flops(vision_config: dict, grid_thw: list[int]) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one image through Qwen3-VL's vision tower: patch embedding, every block's
    q/k/v/out and MLP linears, attention over the image's patches, the merger and the DeepStack mergers."""
    h, i = vision_config["hidden_size"], vision_config["intermediate_size"]
    p, tp, c = vision_config["patch_size"], vision_config["temporal_patch_size"], vision_config.get("in_channels", 3)
    m = vision_config["spatial_merge_size"]
    out = vision_config["out_hidden_size"]
    depth = vision_config["depth"]
    mergers = 1 + len(vision_config.get("deepstack_visual_indexes", []))
    t, gh, gw = grid_thw
    patches = t * gh * gw
    merged = patches // (m * m)
    mh = h * m * m
    linear = (2 * patches * (c * tp * p * p) * h  # patch embedding (a Conv3d = one GEMM)
              + depth * 2 * patches * (4 * h * h + 2 * h * i)  # qkv (3h^2) + out (h^2) + fc1 + fc2
              + mergers * 2 * merged * (mh * mh + mh * out))
    # Attention is per frame's patches (Qwen3-VL's cu_seqlens split a video by frame; one image = one frame).
    per_frame = gh * gw
    attention = depth * t * 2 * 2 * per_frame * per_frame * h  # Q K^T and P V
    return {"patches": patches, "linear_flops": linear, "attention_flops": attention, "flops": linear + attention,
            "mlp_shape": [patches, h, i]}


def gemm_shapes(text_config: dict, vision: dict, text_tokens: int) -> dict:
    """The phases' MLP shapes (M, K, N) for `gemm_rates`: decode M = 1, prefill M = the text prompt, vision M =
    the image's patches."""
    hidden, ffn = text_config["hidden_size"], text_config["intermediate_size"]
    return {"decode": [1, hidden, ffn], "prefill": [text_tokens, hidden, ffn], "vision": vision["mlp_shape"]}


def summarise_bounds(decode_tok_s: float, roofline_tok_s: float, compute: dict | None, vision_s: float | None,
                     vision: dict | None, gemm: dict | None) -> dict:
    """The `bounds` section of the bench report (benchmarks/README.md, 'Bounds')."""
    out: dict = {"bandwidth_tok_s": roofline_tok_s}
    if compute and compute.get("tok_s"):
        out["compute_tok_s"] = compute["tok_s"]
        binding = "compute" if compute["tok_s"] < roofline_tok_s else "bandwidth"
        bound = min(compute["tok_s"], roofline_tok_s)
        out.update(binding=binding, binding_tok_s=bound, decode_efficiency_vs_binding=decode_tok_s / bound,
                   decode_efficiency_vs_compute=decode_tok_s / compute["tok_s"])
    if vision and vision_s:
        gflops = vision["flops"] / vision_s / 1e9
        out["vision"] = {**vision, "seconds": vision_s, "gflops": gflops}
        rates = (gemm or {}).get("shapes", {}).get("vision")
        if rates:
            kernels = {k: v["gflops"] for k, v in rates.items() if isinstance(v, dict) and "gflops" in v}
            out["vision"].update(sgemm_peak_gflops=kernels["sgemm"], fraction_of_sgemm_peak=gflops / kernels["sgemm"],
                                 fastest_kernel=rates["fastest"], fastest_kernel_gflops=kernels[rates["fastest"]],
                                 fraction_of_fastest_kernel=gflops / kernels[rates["fastest"]])
    return out
