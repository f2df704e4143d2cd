"""Checkpoint presets: the published dense Qwen3-VL Instruct configs (2B, 4B, 8B) and a tiny one of the same
architecture, plus the variants `make-checkpoint` can apply to any of them (`variant`: untied lm_head, a small
vocabulary).

The 2B config is embedded verbatim (users have no ../shared). The 4B and 8B configs
(`data/qwen3-vl-{4b,8b}-instruct.config.json`) were written from memory of the published
Qwen/Qwen3-VL-4B-Instruct and Qwen/Qwen3-VL-8B-Instruct config.json, without network access, in the 2B file's
structure: every field the 2B file has, with the 2B values except the sizes that differ -- text hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads; vision depth, hidden_size, intermediate_size,
out_hidden_size, deepstack_visual_indexes; tie_word_embeddings (false for 8B, top level and text_config).
The token ids, vocab_size, rope (theta 5e6, interleaved mrope_section [24, 20, 20]), max_position_embeddings
262144, head_dim 128, 8 KV heads, patch 16 / merge 2 / temporal 2 and num_position_embeddings 2304 are the
family's shared values. tests/test_presets.py checks the parameter counts the configs imply (4.44 B, 8.77 B:
the published sizes). Capacity checks elsewhere always read the checkpoint's own config.json; these presets
only say what `make-checkpoint` writes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from importlib import resources

from qvl.toolchain.checkpoints.tokenizer_builder import FIRST_SPECIAL_ID, QWEN_ADDED_TOKENS, special_token_ids

PUBLISHED = ("2b", "4b", "8b")  # data/qwen3-vl-<size>-instruct.config.json


def published_config(size: str) -> dict:
    """The embedded config.json of Qwen3-VL-<size>-Instruct (`PUBLISHED`; 4B and 8B from memory, see above)."""
    if size not in PUBLISHED:
        raise ValueError(f"no published config {size!r} (have: {', '.join(PUBLISHED)})")
    text = resources.files("qvl.toolchain").joinpath(f"data/qwen3-vl-{size}-instruct.config.json").read_text("utf-8")
    return json.loads(text)


def published_2b_config() -> dict:
    return published_config("2b")


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
    first_special_id: int = FIRST_SPECIAL_ID  # the tokenizer's id layout: learned ids, placeholders, then specials
    learned_vocab: int = 2000  # BPE ids the tokenizer learns (the rest below first_special_id are placeholders)
    alphabet: int | None = None  # None: the 256 byte symbols; N: the N most frequent characters (small vocabularies)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


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


MIN_VOCAB = 64  # the 26 Qwen special tokens plus a few dozen learned characters
_FULL_ALPHABET_VOCAB = 300  # learned ids from which the tokenizer keeps all 256 byte symbols (plus merges)


def variant(preset: Preset, untied: bool = False, vocab_size: int | None = None) -> Preset:
    """`preset` with an untied lm_head (`tie_word_embeddings: false`, a separate random `lm_head.weight`, as the 8B
    has) and/or a `vocab_size`-entry vocabulary: the specials move to the top `len(QWEN_ADDED_TOKENS)` ids and
    every token id in the config follows them (transformers' own test config has 99 ids)."""
    config = copy.deepcopy(preset.config)
    fields: dict = {}
    if untied:
        config["tie_word_embeddings"] = False
        config["text_config"]["tie_word_embeddings"] = False
    if vocab_size is not None and vocab_size != config["text_config"]["vocab_size"]:
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (the {len(QWEN_ADDED_TOKENS)} special tokens and "
                             f"a learned alphabet), not {vocab_size}")
        first = min(FIRST_SPECIAL_ID, vocab_size - len(QWEN_ADDED_TOKENS))
        ids = special_token_ids(first)
        config["text_config"].update(vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                                     eos_token_id=ids["<|im_end|>"])
        config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        learned = min(preset.learned_vocab, first)
        small = learned < _FULL_ALPHABET_VOCAB
        fields.update(first_special_id=first, learned_vocab=learned,
                      alphabet=max(16, learned * 2 // 3) if small else None)  # a third of the ids for merges
    return replace(preset, config=config, **fields)


def generation_config_for(preset: Preset) -> dict:
    return generation_config(preset.first_special_id)


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
    # Same vision preprocessing as the 2B (the family shares patch 16 / merge 2 and the processor limits).
    **{size: Preset(
        name=size,
        config=published_config(size),
        preprocessor=preprocessor_config(min_pixels=65536, max_pixels=16777216),
        weight_dtype="bfloat16",
        init="standard",
        shard_bytes=1 << 30,
    ) for size in ("4b", "8b")},
}

GENERATION_CONFIG = generation_config()
