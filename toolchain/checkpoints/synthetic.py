"""`make-checkpoint`: synthetic Qwen3-VL checkpoints in real Hugging Face format.

Tensor names and shapes come from transformers' own model class (built on the meta device, no memory),
so the files load with `from_pretrained` exactly like a published checkpoint. Weights are generated
tensor by tensor and written shard by shard, so the 2B preset never holds the model in RAM. An untied
checkpoint (`untied=True`, or the 8B preset) stores its own random `lm_head.weight`, as published untied
checkpoints do; a tied one omits it (transformers re-ties it on load).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from qvl.toolchain.checkpoints.presets import PRESETS, Preset, chat_template, generation_config_for, variant
from qvl.toolchain.checkpoints.tokenizer_builder import FIRST_SPECIAL_ID, build_tokenizer, tokenizer_config
from qvl.toolchain.fsutil import atomic_output_dir, check_free_space, fault_point

# What a checkpoint writer puts beside the weights (write_checkpoint_metadata); the sentinel's file list too.
CHECKPOINT_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
)

_CHUNK_ELEMS = 1 << 25  # generate big tensors in 32M-element pieces to bound the fp32 temporary
_DECISIVE_OUT_GAIN = 4.0
_UNTIED_HEAD_NOISE = 0.05
EMBED_NAME = "model.language_model.embed_tokens.weight"
UNTIED_HEAD = "lm_head.weight"
# torch / transformers / safetensors.torch are imported inside the functions that need them: they come with the
# [export] extra, and this module's metadata writer (tokenizers + json only) serves torch-free callers too.


@dataclass
class CheckpointReport:
    out: Path
    preset: str
    num_parameters: int
    num_bytes: int
    num_shards: int
    seconds: float


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, from transformers' model built on the meta device."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(**config)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    tied = cfg.tie_word_embeddings
    return [
        (name, tuple(t.shape))
        for name, t in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    ]


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("norm") or p.endswith("norm") or p.endswith("layernorm") for p in parts[:-1])


def _init_tensor(name: str, shape: tuple[int, ...], preset: Preset, seed: int, learned_vocab: int):
    import torch

    dtype = getattr(torch, preset.weight_dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    if _is_norm(name):
        return torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)

    std_std = preset.config["text_config"].get("initializer_range", 0.02)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    if preset.init == "decisive" and name == UNTIED_HEAD:
        return _decisive_untied_head(shape, preset, seed, learned_vocab, gen)
    vocab_rows = "embed_tokens" in name
    if preset.init == "decisive":
        # Large logit gaps so greedy decoding is robust to fp32 rounding differences between engines,
        # and layers that actually change the residual stream (std 1/sqrt(fan_in)).
        std = 1.0 if vocab_rows or "pos_embed" in name else fan_in ** -0.5
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            # Layers must outweigh the token's own embedding in the residual stream, or the tied
            # lm_head just predicts the input token again and greedy output degenerates to repeats.
            std *= _DECISIVE_OUT_GAIN
    else:
        std = std_std

    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMS):
        stop = min(start + _CHUNK_ELEMS, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=gen, dtype=torch.float32).mul_(std).to(dtype)
    if preset.init == "decisive" and vocab_rows:
        # Rows past the learned BPE vocab (placeholders, specials, padding) get small norms so a random
        # model prefers real text tokens over `<|unused_N|>` placeholders.
        out[learned_vocab:].mul_(0.05)
    return out


def _decisive_untied_head(shape, preset: Preset, seed: int, learned_vocab: int, gen):
    """A decisive untied lm_head: the embedding table with its rows rolled by one, plus independent noise (std
    `_UNTIED_HEAD_NOISE` of the rows' scale). A tied random model's greedy margins come from the token's own
    embedding in the residual stream meeting the same row in the lm_head; a fully independent head has only the
    extreme-value gaps of ~2000 random logits (measured: int8 weights then flip greedy tokens where the tied
    model's do not). Rolled rows keep those margins but move every prediction to another id, so an export that
    used the embedding as the lm_head fails parity at once; the noise makes it no permutation of the table."""
    import torch

    emb = _init_tensor(EMBED_NAME, shape, preset, seed, learned_vocab)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(_UNTIED_HEAD_NOISE)
    noise[learned_vocab:].mul_(0.05)
    return (torch.roll(emb.float(), 1, dims=0) + noise).to(emb.dtype)


def _plan_shards(specs, itemsize: int, shard_bytes: int | None) -> list[list[tuple[str, tuple[int, ...]]]]:
    if shard_bytes is None:
        return [list(specs)]
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint_metadata(
    out: Path, config: dict, generation_config: dict, preprocessor: dict, tokenizer: Tokenizer,
    first_special_id: int = FIRST_SPECIAL_ID,
) -> None:
    """Everything of a Hugging Face checkpoint but the weights: the `CHECKPOINT_METADATA_FILES`."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    template = chat_template()
    max_len = config["text_config"]["max_position_embeddings"]
    tok_cfg = tokenizer_config(template, max_len, first_special_id=first_special_id)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))


def learned_vocab_size(tokenizer: Tokenizer, first_special_id: int = FIRST_SPECIAL_ID) -> int:
    """Ids the BPE learned (placeholders and specials excluded)."""
    vocab = tokenizer.get_vocab()
    return sum(1 for t in vocab if not t.startswith("<|unused_") and vocab[t] < first_special_id)


def make_checkpoint(
    preset_name: str,
    out: Path,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    untied: bool = False,
    vocab_size: int | None = None,
) -> CheckpointReport:
    """Write preset `preset_name` (`presets.PRESETS`) to `out`; `untied` / `vocab_size`: `presets.variant`."""
    import torch
    from safetensors.torch import save_file

    preset = variant(PRESETS[preset_name], untied=untied, vocab_size=vocab_size)
    t0 = time.perf_counter()
    specs = tensor_specs(preset.config)
    itemsize = torch.empty((), dtype=getattr(torch, preset.weight_dtype)).element_size()
    num_params = sum(int(torch.Size(s).numel()) for _, s in specs)
    shards = _plan_shards(specs, itemsize, preset.shard_bytes)

    # kind="checkpoint" marks it as qvl-written, so a later --overwrite may replace it (and nothing else)
    with atomic_output_dir(Path(out), overwrite=overwrite, kind="checkpoint") as tmp:
        check_free_space(tmp, num_params * itemsize + (64 << 20))
        tok = build_tokenizer(preset.learned_vocab, first_special_id=preset.first_special_id, alphabet=preset.alphabet)
        write_checkpoint_metadata(tmp, dict(preset.config), generation_config_for(preset), preset.preprocessor, tok,
                                  first_special_id=preset.first_special_id)
        learned_vocab = learned_vocab_size(tok, preset.first_special_id)

        weight_map: dict[str, str] = {}
        total_bytes = 0
        done = 0
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for fname, shard in zip(names, shards):
            tensors = {}
            for name, shape in shard:
                t = _init_tensor(name, shape, preset, seed, learned_vocab)
                tensors[name] = t
                weight_map[name] = fname
                total_bytes += t.numel() * t.element_size()
                done += t.numel()
                if progress:
                    progress(done, num_params)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})  # 0600: fixed when published
            fault_point("weights:write")
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    return CheckpointReport(
        out=Path(out),
        preset=preset_name,
        num_parameters=num_params,
        num_bytes=total_bytes,
        num_shards=len(shards),
        seconds=time.perf_counter() - t0,
    )
