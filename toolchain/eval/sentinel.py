"""`sentinel`: a small *trained* Qwen3-VL, so lossy passes can be judged by task accuracy.

Random-weight checkpoints give flat logits, on which int8/int4 look far worse (or better) than they are.
The sentinel is transformers' Qwen3VLForConditionalGeneration with the real architecture at a small size
(vision tower with DeepStack, interleaved MRoPE, tied embeddings), trained from scratch on
`synthetic_vqa` questions with the loss on the assistant tokens (answers and their `<|im_end|>`) only.

Training (`qvl.toolchain.eval.sentinel_training.train_sentinel`: batches, training aids, loss, loop) needs
torch; this module (sizes, recipe, config, tokenizer, metadata files, `copy_sentinel`) does not.

It carries its OWN tokenizer: a small byte-level BPE learned on the question/answer corpus, with the Qwen
special tokens right after the learned ids, so `<|endoftext|>`, `<|im_end|>`, `<|image_pad|>`... have
ids that differ from the 2B's 151643.. (a check that nothing hard-codes them). Every id in config.json
and generation_config.json comes from that tokenizer.

Reproduce the committed checkpoint with

    nice -n 19 python -c "from qvl.toolchain.eval.sentinel_training import train_sentinel; \
        print(train_sentinel('toolchain/data/sentinel', overwrite=True).summary())"

The checkpoint is a normal Hugging Face folder (config.json, generation_config.json,
preprocessor_config.json, tokenizer.json, tokenizer_config.json, chat_template.json, model.safetensors
in float16) plus sentinel_training.json, the recipe and results.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError
from qvl.toolchain.checkpoints.presets import generation_config, preprocessor_config, scaled_config
from qvl.toolchain.checkpoints.synthetic import CHECKPOINT_METADATA_FILES, write_checkpoint_metadata
from qvl.toolchain.checkpoints.tokenizer_builder import QWEN_ADDED_TOKENS, build_tokenizer
from qvl.toolchain.checkpoints.tokenizer_builder import special_token_ids as special_ids
from qvl.toolchain.eval import synthetic_vqa as sv
from qvl.toolchain.fsutil import atomic_output_dir

# The committed, trained checkpoint (reproduce with the command in the module docstring).
SENTINEL_DIR = Path(__file__).resolve().parents[1] / "data" / "sentinel"
SENTINEL_FILES = (*CHECKPOINT_METADATA_FILES, "model.safetensors", "sentinel_training.json")

PATCH = 16
# Each image becomes 64..128 patches of 16 px (16..32 merged tokens); the synthetic 128x128 scenes are 64.
MIN_PIXELS = 64 * PATCH * PATCH
MAX_PIXELS = 128 * PATCH * PATCH


@dataclass(frozen=True)
class SentinelArch:
    """Sizes of the sentinel model. Architecture features are the published 2B's."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 32
    text_intermediate: int = 384
    mrope_section: tuple[int, int, int] = (6, 5, 5)  # sums to head_dim / 2, interleaved like the 2B
    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    deepstack_visual_indexes: tuple[int, ...] = (0, 1, 2)
    num_position_embeddings: int = 144  # 12x12 learned grid, bilinearly resampled to each image's grid
    learned_vocab: int = 512


@dataclass(frozen=True)
class SentinelRecipe:
    """Training hyper-parameters."""

    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Curriculum: difficulty 0 (lone objects, single digits) for `easy_steps`, then a linear ramp to 1
    # over `ramp_steps` (see synthetic_vqa.make_sample).
    easy_steps: int = 50
    ramp_steps: int = 300
    # Follow-up questions about the same image per training sequence (1: single turn, like evaluation).
    turns: int = 4
    # Probability of a final "Describe the shapes." turn in a shape-scene conversation: dense
    # supervision of which shapes are where (colour, count, column) for the language model.
    describe: float = 1.0
    # Weight of the per-cell shape/colour probe loss on the merged visual tokens (0: off).
    aux_weight: float = 0.5
    # Re-initialise every Linear weight with std init_gain / sqrt(fan_in) (None: transformers' 0.02).
    init_gain: float | None = None
    # Relative share of each question kind in training (harder kinds more often).
    kind_weights: tuple[tuple[str, float], ...] = (("colour", 1.0), ("count", 2.0), ("left", 1.5), ("number", 0.75))


def copy_sentinel(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Copy the committed sentinel checkpoint to `out_dir` (atomically); no torch needed."""
    missing = [f for f in SENTINEL_FILES if not (SENTINEL_DIR / f).is_file()]
    if missing:
        raise QvlError(
            f"the committed sentinel checkpoint is incomplete at {SENTINEL_DIR} (missing {', '.join(missing)})",
            hint="reinstall qvl-compile, or train one with qvl.toolchain.eval.sentinel_training.train_sentinel",
        )
    with atomic_output_dir(Path(out_dir), overwrite=overwrite, sources=(SENTINEL_DIR,), kind="checkpoint") as tmp:
        for f in SENTINEL_FILES:
            shutil.copyfile(SENTINEL_DIR / f, tmp / f)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_corpus() -> list[str]:
    """Every question and answer the generator can produce, plus the chat roles."""
    lines = ["user", "assistant", "system", "yes", "no"]
    for shape in sv.SHAPES:
        lines.append(sv.QUESTION_TEMPLATES["colour"].format(shape=shape))
        lines.append(sv.QUESTION_TEMPLATES["count"].format(shape=shape))
        lines.append(sv.QUESTION_TEMPLATES["left"].format(shape=shape))
    lines.append(sv.QUESTION_TEMPLATES["number"])
    lines.append(sv.DESCRIBE_QUESTION)
    for shape in sv.SHAPES:
        lines += [f"Shapes: {shape} {c}, {shape}s 2 {c} {c}." for c in sv.COLOURS]
    lines += list(sv.COLOURS)
    lines += [str(n) for n in range(100)]
    # Repeated so BPE merges whole task words (" triangles", " colour") before generic text.
    return lines * 10


def build_sentinel_tokenizer(learned_vocab: int = SentinelArch.learned_vocab):
    """The sentinel's tokenizer; specials start right after the learned ids (first_special_id = learned_vocab)."""
    return build_tokenizer(learned_vocab, first_special_id=learned_vocab, extra_corpus=tokenizer_corpus())


def padded_vocab_size(first_special_id: int) -> int:
    n = first_special_id + len(QWEN_ADDED_TOKENS)
    return -(-n // 64) * 64


# ------------------------------------------------------------------------------------------- config


def sentinel_config(arch: SentinelArch = SentinelArch()) -> dict:
    """config.json of the sentinel: the published 2B config with small sizes and the sentinel's token ids."""
    ids = special_ids(arch.learned_vocab)
    return scaled_config(
        text=dict(
            hidden_size=arch.text_hidden,
            intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            num_key_value_heads=arch.text_kv_heads,
            head_dim=arch.head_dim,
            max_position_embeddings=4096,
            vocab_size=padded_vocab_size(arch.learned_vocab),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            dtype="float16",
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=arch.vision_depth,
            hidden_size=arch.vision_hidden,
            intermediate_size=arch.vision_intermediate,
            num_heads=arch.vision_heads,
            num_position_embeddings=arch.num_position_embeddings,
            out_hidden_size=arch.text_hidden,
            deepstack_visual_indexes=list(arch.deepstack_visual_indexes),
        ),
        mrope_section=arch.mrope_section,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def write_sentinel_metadata(out: Path, arch: SentinelArch = SentinelArch()) -> None:
    """Everything but the weights: config, generation config, preprocessor, tokenizer files."""
    write_checkpoint_metadata(
        out,
        sentinel_config(arch),
        generation_config(arch.learned_vocab),
        preprocessor_config(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        build_sentinel_tokenizer(arch.learned_vocab),
        first_special_id=arch.learned_vocab,
    )
