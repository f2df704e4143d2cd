"""Checkpoint presets: the published Qwen3-VL-2B-Instruct config and a tiny one of the same architecture.

The 2B config is embedded verbatim (users have no ../shared). Capacity checks elsewhere always read the
checkpoint's own config.json; these presets only say what `make-checkpoint` writes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources

from qvl.toolchain.checkpoints.tokenizer_builder import FIRST_SPECIAL_ID, special_token_ids


def published_2b_config() -> dict:
    text = resources.files("qvl.toolchain").joinpath("data/qwen3-vl-2b-instruct.config.json").read_text("utf-8")
    return json.loads(text)


def chat_template() -> str:
    return resources.files("qvl.toolchain").joinpath("data/qwen3_vl_chat_template.jinja").read_text("utf-8").rstrip("\n")


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict
    preprocessor: dict
    weight_dtype: str  # "float32" | "bfloat16"
    init: str  # "decisive" (tiny: large logit gaps) | "standard" (initializer_range)
    shard_bytes: int | None  # None: one model.safetensors


def preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
    """Qwen3-VL's preprocessor_config.json: patch 16, merge 2, mean/std 0.5."""
    return {
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def scaled_config(text: dict, vision: dict, mrope_section: tuple[int, int, int], **top) -> dict:
    """The published 2B config with the `text_config` / `vision_config` fields (sizes, ids) and the top-level
    fields `top` replaced; MRoPE interleaved over `mrope_section` like the 2B. Used by the tiny preset and the
    sentinel, so every small model keeps the real architecture."""
    cfg = copy.deepcopy(published_2b_config())
    cfg.update(top)
    cfg["text_config"].update(text)
    cfg["text_config"]["rope_scaling"] = {
        "mrope_interleaved": True, "mrope_section": list(mrope_section), "rope_type": "default",
    }
    cfg["vision_config"].update(vision)
    t, v = cfg["text_config"], cfg["vision_config"]
    if sum(mrope_section) * 2 != t["head_dim"]:
        raise ValueError("mrope_section must sum to head_dim / 2")
    if not all(0 <= i < v["depth"] for i in v["deepstack_visual_indexes"]):
        raise ValueError("deepstack_visual_indexes must be vision block indexes")
    if len(v["deepstack_visual_indexes"]) > t["num_hidden_layers"]:
        raise ValueError("more DeepStack levels than text layers")
    return cfg


def _tiny_config() -> dict:
    return scaled_config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, dtype="float32"),
        vision=dict(depth=6, hidden_size=64, intermediate_size=128, num_heads=4, num_position_embeddings=144,
                    out_hidden_size=64, deepstack_visual_indexes=[1, 3, 4]),
        mrope_section=(6, 5, 5),
    )


def generation_config(first_special_id: int = FIRST_SPECIAL_ID) -> dict:
    """generation_config.json of a published Qwen3-VL (its sampling defaults), with the special-token ids of a
    tokenizer whose specials start at `first_special_id`."""
    ids = special_token_ids(first_special_id)
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "top_k": 20,
        "top_p": 0.8,
        "temperature": 0.7,
        "repetition_penalty": 1.0,
    }


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        config=_tiny_config(),
        preprocessor=preprocessor_config(min_pixels=128 * 128, max_pixels=448 * 448),
        weight_dtype="float32",
        init="decisive",
        shard_bytes=None,
    ),
    "2b": Preset(
        name="2b",
        config=published_2b_config(),
        preprocessor=preprocessor_config(min_pixels=65536, max_pixels=16777216),
        weight_dtype="bfloat16",
        init="standard",
        shard_bytes=1 << 30,
    ),
}

GENERATION_CONFIG = generation_config()
