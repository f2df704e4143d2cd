"""Build a small Qwen2-style byte-level BPE tokenizer with the real Qwen special-token ids.

The synthetic checkpoints need a tokenizer that transformers and our runtime load exactly like a
published Qwen3-VL one: same normalizer, pre-tokenizer regex, byte-level decoder and special tokens
at the same ids (151643...). The learned part is tiny (trained on an embedded corpus); the id range
between it and the first special token is filled with unreachable placeholder tokens so the ids line up.
"""

from __future__ import annotations

import json
from importlib import resources

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The pre-tokenizer split used by Qwen2/Qwen2.5/Qwen3 tokenizers.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special) in id order starting at FIRST_SPECIAL_ID, as in the Qwen3-VL tokenizer.
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
FIRST_SPECIAL_ID = 151643


def special_token_ids(first_special_id: int = FIRST_SPECIAL_ID) -> dict[str, int]:
    """Id of every added token when the specials start at `first_special_id` (the layout build_tokenizer makes)."""
    return {content: first_special_id + k for k, (content, _) in enumerate(QWEN_ADDED_TOKENS)}


def _corpus_lines() -> list[str]:
    text = resources.files("qvl.toolchain").joinpath("data/tokenizer_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _placeholder(i: int) -> str:
    # Printable ASCII maps to itself in the byte-level alphabet, so this decodes to readable text.
    # No merge produces it, so encoding never emits it.
    return f"<|unused_{i}|>"


# Byte-level symbols a reduced alphabet always keeps: space and newline (the chat template writes newlines).
_ALWAYS_KEPT = ("\u0120", "\u010a")  # "Ġ" (space), "Ċ" (newline) in the byte-level alphabet


def build_tokenizer(
    learned_vocab_size: int = 2000,
    first_special_id: int = FIRST_SPECIAL_ID,
    extra_corpus: list[str] | None = None,
    alphabet: int | None = None,
) -> Tokenizer:
    """Train the byte-level BPE and lay out ids like Qwen's: learned ids, placeholders, then specials.

    `alphabet=None`: all 256 byte symbols (every text encodes). `alphabet=N`: only the N most frequent characters
    of the corpus (plus space and newline), for vocabularies smaller than the byte alphabet (small test configs:
    transformers' own Qwen3-VL test config has 99 ids); characters outside it are dropped when encoding, by
    transformers' tokenizer and the runtime's alike (both read this tokenizer.json)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=learned_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet is None else list(_ALWAYS_KEPT),
        special_tokens=[],
        **({} if alphabet is None else {"limit_alphabet": alphabet}),
    )
    tok.train_from_iterator(_corpus_lines() + list(extra_corpus or []), trainer=trainer)

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > first_special_id:
        raise ValueError(f"learned vocab ({len(vocab)}) does not fit below the first special id {first_special_id}")
    for i in range(len(vocab), first_special_id):
        vocab[_placeholder(i)] = i
    spec["added_tokens"] = [
        {
            "id": first_special_id + k,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for k, (content, special) in enumerate(QWEN_ADDED_TOKENS)
    ]
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def tokenizer_config(chat_template: str, model_max_length: int, first_special_id: int = FIRST_SPECIAL_ID) -> dict:
    """The tokenizer_config.json a published Qwen3-VL checkpoint carries."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first_special_id + k): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for k, (content, special) in enumerate(QWEN_ADDED_TOKENS)
        },
        "additional_special_tokens": [
            c for c, s in QWEN_ADDED_TOKENS if s and c not in ("<|endoftext|>",)
        ],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
