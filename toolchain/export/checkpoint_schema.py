"""Validate a Qwen3-VL `config.json` (required fields, types, ranges, consistency) without transformers.

transformers' `Qwen3VLConfig` fills every absent field with a default of some *other* model (a config
without `text_config.num_hidden_layers` silently becomes 32 layers, without `head_dim` 128, without
`mrope_section` [24, 20, 20]) and accepts zero or negative sizes; the mistake then surfaces minutes
later as a shape error deep inside loading or export, or as an artifact that `run` rejects. So every
field that shapes the architecture is required here, and each problem is one `QvlError` naming the
field as `text_config.hidden_size`. Pure Python, so it is cheap enough to fuzz.

Relations checked (from transformers' Qwen3-VL modeling code and this project's runtime):
- text: q/k/v projections are `num_attention_heads * head_dim` wide, GQA needs `num_key_value_heads` to
  divide `num_attention_heads`; the interleaved MRoPE splits `head_dim / 2` frequencies into
  `mrope_section` (t, h, w), so the section must sum to it; only the default rope type is implemented.
- vision: head dim = `hidden_size / num_heads` (must divide) and a multiple of 4 (2-D rotary over half
  of it, cos/sin concatenated twice); the learned position grid is square (`num_position_embeddings`
  a perfect square); DeepStack taps vision blocks `deepstack_visual_indexes` (distinct, < depth) and
  feeds text layers 0..len-1 (so len <= text layers); the merger's `out_hidden_size` is added to text
  embeddings, so it must equal the text `hidden_size`.
- special token ids must be distinct and inside the vocabulary.
"""

from __future__ import annotations

import math

from qvl.errors import QvlError

_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
_VISION_SIZES = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings")
# Upper bounds far above any Qwen3-VL (2B: 28 layers, hidden 2048, vocab 151936, context 262144) that
# keep absurd values from building a million-layer model or overflowing shape products downstream.
_MAX = {"num_hidden_layers": 1024, "depth": 1024, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24,
        "in_channels": 64, "patch_size": 64, "temporal_patch_size": 64, "spatial_merge_size": 64}
_MAX_SIZE = 1 << 20
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_OPTIONAL_BOOLS = ("attention_bias", "use_cache", "tie_word_embeddings")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass; `true` is no size


def _is_number(v: object) -> bool:
    # math.isfinite on a huge JSON integer would raise OverflowError; integers are always finite.
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _type_name(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


class _Fields:
    """Typed access to one config section; every message names the field by its dotted path."""

    def __init__(self, section: dict, prefix: str, where: str):
        self.section, self.prefix, self.where = section, prefix, where

    def fail(self, key: str, what: str, hint: str | None = None) -> QvlError:
        return QvlError(f"{self.where}: {self.prefix}{key} {what}", hint=hint)

    def has(self, key: str) -> bool:
        return self.section.get(key) is not None

    def positive_int(self, key: str) -> int:
        if key not in self.section:
            raise self.fail(key, "is missing", hint="a Qwen3-VL config must set every architecture field explicitly")
        v = self.section[key]
        if not _is_int(v):
            raise self.fail(key, f"must be an integer, got {_type_name(v)} {v!r}"[:200])
        if v < 1:
            raise self.fail(key, f"must be >= 1, got {v}")
        if v > _MAX.get(key, _MAX_SIZE):
            raise self.fail(key, f"must be <= {_MAX.get(key, _MAX_SIZE)}, got {v}"[:200])
        return v

    def positive_number(self, key: str, value: object = None) -> float:
        v = self.section.get(key) if value is None else value
        if not _is_number(v) or v <= 0:
            raise self.fail(key, f"must be a positive finite number, got {v!r}"[:200])
        return float(v)

    def optional(self, key: str, check, what: str) -> None:
        if self.has(key) and not check(self.section[key]):
            raise self.fail(key, f"must be {what}, got {self.section[key]!r}"[:200])


# transformers picks each sub-config's class by its `model_type` (and hashes it doing so): anything else there
# would build another model or crash inside transformers. The published 2B config says "qwen3_vl" for the vision
# tower, transformers' own Qwen3VLVisionConfig writes "qwen3_vl_vision".
_SECTION_MODEL_TYPES = {"text_config": ("qwen3_vl_text",), "vision_config": ("qwen3_vl", "qwen3_vl_vision")}


def _section(config: dict, key: str, where: str) -> dict:
    value = config.get(key)
    if not isinstance(value, dict):
        got = "missing" if value is None else f"a JSON {_type_name(value)}"
        raise QvlError(f"{where}: {key} is {got}, not an object: not a complete Qwen3-VL config")
    expected = _SECTION_MODEL_TYPES[key]
    if "model_type" in value and value["model_type"] not in expected:
        raise QvlError(f"{where}: {key}.model_type must be {' or '.join(map(repr, expected))}, "
                       f"got {value['model_type']!r}"[:200])
    return value


def _rope(text: dict, f: _Fields, head_dim: int) -> None:
    # transformers 5 reads `rope_parameters`; checkpoints written for 4.x say `rope_scaling` (+ `rope_theta`).
    key = "rope_parameters" if text.get("rope_parameters") is not None else "rope_scaling"
    rope = text.get(key)
    if not isinstance(rope, dict):
        raise f.fail("rope_scaling", f"must be an object with mrope_section, got {rope!r}"[:200])
    rf = _Fields(rope, f"{f.prefix}{key}.", f.where)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise rf.fail("rope_type", f"is {rope_type!r}; only the default rope type is supported"[:200])
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise f.fail("rope_theta", "is missing", hint="a Qwen3-VL config must set every architecture field explicitly")
    f.positive_number("rope_theta", theta)
    section = rope.get("mrope_section")
    if section is None:
        raise rf.fail("mrope_section", "is missing (transformers would silently use [24, 20, 20])")
    if not (isinstance(section, list) and len(section) == 3 and all(_is_int(s) and s >= 0 for s in section)):
        raise rf.fail("mrope_section", f"must be three non-negative integers (t, h, w), got {section!r}"[:200])
    if head_dim % 2 or sum(section) != head_dim // 2:
        raise rf.fail("mrope_section", f"{section} sums to {sum(section)}, but head_dim/2 = {head_dim / 2:g}")
    rf.optional("mrope_interleaved", lambda v: isinstance(v, bool), "a boolean")


def _text(text: dict, where: str) -> dict[str, int]:
    f = _Fields(text, "text_config.", where)
    s = {k: f.positive_int(k) for k in _TEXT_SIZES}
    if s["hidden_size"] % s["num_attention_heads"]:
        raise f.fail("num_attention_heads", f"({s['num_attention_heads']}) must divide hidden_size ({s['hidden_size']})")
    if s["num_attention_heads"] % s["num_key_value_heads"]:
        raise f.fail("num_key_value_heads",
                     f"({s['num_key_value_heads']}) must divide num_attention_heads ({s['num_attention_heads']})")
    if "rms_norm_eps" in text:  # optional: transformers' default 1e-6 is the Qwen3-VL value
        f.positive_number("rms_norm_eps")
    for key in _OPTIONAL_BOOLS:
        f.optional(key, lambda v: isinstance(v, bool), "a boolean")
    f.optional("hidden_act", lambda v: isinstance(v, str), "a string")
    f.optional("attention_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    _rope(text, f, s["head_dim"])
    return s


def _vision(vision: dict, where: str, text_sizes: dict[str, int]) -> None:
    f = _Fields(vision, "vision_config.", where)
    s = {k: f.positive_int(k) for k in _VISION_SIZES}
    f.optional("hidden_act", lambda v: isinstance(v, str), "a string")
    if s["hidden_size"] % s["num_heads"]:
        raise f.fail("num_heads", f"({s['num_heads']}) must divide hidden_size ({s['hidden_size']})")
    if (s["hidden_size"] // s["num_heads"]) % 4:
        raise f.fail("num_heads", f"gives head dim {s['hidden_size'] // s['num_heads']}, which must be a multiple of 4"
                                  " (2-D rotary embedding)")
    side = math.isqrt(s["num_position_embeddings"])
    if side * side != s["num_position_embeddings"]:
        raise f.fail("num_position_embeddings", f"({s['num_position_embeddings']}) must be a perfect square")
    if s["out_hidden_size"] != text_sizes["hidden_size"]:
        raise f.fail("out_hidden_size",
                     f"({s['out_hidden_size']}) must equal text_config.hidden_size ({text_sizes['hidden_size']})")
    ds = vision.get("deepstack_visual_indexes")
    if ds is None:
        raise f.fail("deepstack_visual_indexes", "is missing",
                     hint="a Qwen3-VL config must set every architecture field explicitly")
    if not (isinstance(ds, list) and all(_is_int(i) for i in ds)):
        raise f.fail("deepstack_visual_indexes", f"must be a list of integers, got {ds!r}"[:200])
    bad = [i for i in ds if not 0 <= i < s["depth"]]
    if bad:
        raise f.fail("deepstack_visual_indexes", f"{ds} has {bad[0]}, outside the {s['depth']} vision blocks"[:200])
    if len(set(ds)) != len(ds):
        raise f.fail("deepstack_visual_indexes", f"{ds} repeats a block"[:200])
    if len(ds) > text_sizes["num_hidden_layers"]:
        raise f.fail("deepstack_visual_indexes", f"has {len(ds)} entries but the decoder has only "
                                                 f"{text_sizes['num_hidden_layers']} layers to feed")


def validate_config(config: object, where: str = "config.json") -> None:
    """Raise one `QvlError` for the first problem of a Qwen3-VL config (the parsed config.json)."""
    if not isinstance(config, dict):
        raise QvlError(f"{where} is a JSON {_type_name(config)}, not an object: not a Hugging Face config")
    # transformers hashes the top-level model_type too (a list there crashed its conversion mapping): the loader
    # refuses an unsupported one with the supported list; the schema refuses it on its own as well
    if "model_type" in config and config["model_type"] != "qwen3_vl":
        raise QvlError(f"{where}: model_type must be 'qwen3_vl', got {config['model_type']!r}"[:200])
    text = _section(config, "text_config", where)
    vision = _section(config, "vision_config", where)
    top = _Fields(config, "", where)
    top.optional("tie_word_embeddings", lambda v: isinstance(v, bool), "a boolean")
    text_sizes = _text(text, where)
    _vision(vision, where, text_sizes)

    ids = {}
    for key in _TOKEN_IDS:
        if key == "vision_end_token_id" and key not in config:
            continue  # optional: only the prompt builder's placeholders need it, and it finds it by name
        v = config.get(key)
        if not _is_int(v):
            raise top.fail(key, "is missing" if v is None else f"must be an integer, got {v!r}"[:200])
        if not 0 <= v < text_sizes["vocab_size"]:
            raise top.fail(key, f"({v}) is outside the vocabulary (text_config.vocab_size = {text_sizes['vocab_size']})")
        ids[key] = v
    if len(set(ids.values())) != len(ids):
        raise QvlError(f"{where}: special token ids {ids} are not distinct")
