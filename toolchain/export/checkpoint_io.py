"""Validate a Hugging Face Qwen3-VL checkpoint directory completely before anything heavy touches it.

Every user-facing problem becomes a one-line `QvlError` (the CLI prints it with a hint and exits 2)
instead of a traceback minutes into loading, or worse, an artifact with random weights. In order:

1. layout: directory, `config.json` (a JSON object), supported `model_type`;
2. the config itself: required fields, types, ranges, consistency (`checkpoint_schema`);
3. weights: safetensors only; the shard index; every header fully validated, sizes exact
   (`safetensors_header`: no tensor data is read);
4. tokenizer side files, as the runtime's prompt builder will read them at `run` time, and their
   special-token ids against the config;
5. the state dict: an untied config (`tie_word_embeddings` false or unset, as transformers reads it) must come
   with its `lm_head.weight` (a tied checkpoint whose config lost the flag would otherwise export a random
   head), then names, shapes and dtypes against the model transformers builds from the config on the meta
   device (`checkpoint_tensors`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from qvl.errors import QvlError
from qvl.toolchain.export.checkpoint_schema import validate_config
from qvl.toolchain.export.safetensors_header import TensorEntry, read_header

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
# Tokens Qwen3-VL's chat template writes around turns and images; the runtime looks them up by name.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict
    weight_files: tuple[Path, ...]
    tensors: Mapping[str, TensorEntry] = field(default_factory=dict)  # checkpoint key -> header entry

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QvlError(f"{path} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise QvlError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(config, dict):
        validate_config(config, str(cfg_path))  # raises: names what the JSON is instead of an object
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QvlError(
            f"unsupported model_type {model_type!r} in {cfg_path} (qvl-compile supports: {', '.join(SUPPORTED_MODEL_TYPES)})"[:400],
            hint="qvl-compile targets Qwen3-VL checkpoints such as Qwen/Qwen3-VL-2B-Instruct",
        )
    validate_config(config, str(cfg_path))
    return config


def _weight_files(path: Path) -> tuple[tuple[Path, ...], dict[str, str] | None]:
    """The safetensors files and, for a sharded checkpoint, the index's tensor -> shard map."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise QvlError(f"cannot parse {index}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise QvlError(f"cannot parse {index}: weight_map must map tensor names to shard file names")
        for shard in set(weight_map.values()):
            # Shards are files next to the index; anything else would read outside the checkpoint.
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise QvlError(f"{index} lists shard {shard!r}, which is not a file name in the checkpoint"[:400])
        return tuple(path / f for f in sorted(set(weight_map.values()))), weight_map
    if single.is_file():
        return (single,), None
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise QvlError(
            f"{path} has only pickle weights ({pickles[0]}); qvl-compile loads safetensors only",
            hint="convert the checkpoint to safetensors with transformers' save_pretrained(safe_serialization=True)",
        )
    raise QvlError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _read_tensors(files: tuple[Path, ...], weight_map: dict[str, str] | None) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    owner: dict[str, str] = {}
    for f in files:
        if not f.is_file():
            raise QvlError(f"checkpoint shard missing: {f.name} (listed in the index)")
        for name, entry in read_header(f).tensors.items():
            if name in tensors:
                raise QvlError(f"tensor {name!r} is stored twice: in {owner[name]} and {f.name}"[:400])
            tensors[name], owner[name] = entry, f.name
    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            if owner.get(name) != shard:
                raise QvlError(f"model.safetensors.index.json puts {name!r} in {shard}, which does not hold it"[:400])
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise QvlError(f"model.safetensors.index.json does not list {len(extra)} stored tensors, e.g. {extra[0]!r}"[:400])
    return tensors


def _check_tokenizer(path: Path, config: dict) -> None:
    """What `run` needs to build prompts, checked now: tokenizer.json parses, chat template, preprocessor
    config, the image/vision tokens exist and carry the ids the model was trained with."""
    from qvl.runtime.prompt import PromptBuilder

    if not (path / "tokenizer.json").is_file():
        raise QvlError(f"{path} has no tokenizer.json", hint="copy the tokenizer files next to the weights")
    builder = PromptBuilder.from_dir(path)  # QvlError for an unreadable tokenizer / template / preprocessor
    for token in CHAT_TOKENS + (builder.vision_start_token, builder.vision_end_token):
        if builder.token_to_id(token) is None:
            raise QvlError(f"the tokenizer in {path} has no {token} token, which Qwen3-VL prompts need"[:400])
    named = {
        "image_token_id": builder.image_token, "video_token_id": builder.video_token,
        "vision_start_token_id": builder.vision_start_token, "vision_end_token_id": builder.vision_end_token,
    }
    for key, token in named.items():
        tid = builder.token_to_id(token)
        if tid is not None and key in config and tid != config[key]:
            raise QvlError(f"the tokenizer gives {token} id {tid} but config.json says {key} = {config[key]}"[:400],
                           hint="the tokenizer files and config.json must come from the same model")
    vocab = builder.tokenizer.get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= config["text_config"]["vocab_size"]:
        name = next(t for t, i in vocab.items() if i == top)
        raise QvlError(f"the tokenizer has token id {top} ({name!r}) but text_config.vocab_size is "
                       f"{config['text_config']['vocab_size']}: the embedding has no row for it"[:400])


def _check_state_dict(config: dict, tensors: Mapping[str, TensorEntry], where: str) -> None:
    from qvl.toolchain.export.checkpoint_tensors import check_tensors, expected_tensors

    expected = expected_tensors(config, where)
    if not expected.tied and not any(expected.rename(k) == "lm_head.weight" for k in tensors):
        raise QvlError(
            "untied lm_head: config.json has tie_word_embeddings "
            f"{'false' if 'tie_word_embeddings' in config else 'unset (transformers reads that as false)'}"
            " and the checkpoint has no lm_head.weight",
            hint="if the model is tied, set \"tie_word_embeddings\": true in config.json; an untied model needs "
                 "its lm_head.weight",
        )
    check_tensors(tensors, expected, where)


def validate_checkpoint(path: Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise QvlError(f"checkpoint directory not found: {path}", hint="pass a Hugging Face model directory")
    config = _read_config(path)
    files, weight_map = _weight_files(path)
    tensors = _read_tensors(files, weight_map)
    _check_tokenizer(path, config)
    _check_state_dict(config, tensors, str(path / "config.json"))
    return CheckpointInfo(path=path, config=config, weight_files=files, tensors=tensors)
