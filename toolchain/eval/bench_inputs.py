"""The bench's two cases, built torch-free from the artifact's own tokenizer, chat template and preprocessor.

* **text**: a deterministic prompt trimmed to exactly `text_tokens` tokens *after* the chat template;
* **image**: one `image_size`² picture (its visual-token count comes from the artifact's preprocessor)
  plus a question of exactly `question_tokens` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qvl.errors import QvlError
from qvl.runtime.prompt import PromptBuilder
from qvl.toolchain.eval.parity import gradient_picture

TEXT_TOKENS = 128
QUESTION_TOKENS = 32
IMAGE_SIZE = 448

# Deterministic prompt material (ASCII only, so every prefix re-encodes cleanly).
_TEXT_CORPUS = (
    "The harbour wakes before the town does. Fishing boats slide out past the breakwater while the gulls "
    "argue over the first crates on the quay, and the smell of diesel and salt drifts up the narrow "
    "streets. By seven the bakery has its shutters open, the ferry to the island sounds its horn twice, "
    "and the old man who repairs nets is already at his bench beside the lighthouse steps. Tourists "
    "arrive later, with maps and cameras, asking the way to the castle on the hill, the museum of "
    "maritime history, or the beach on the far side of the headland where the water is calm and green. "
    "In the afternoon the wind turns, the sails in the bay lean over, and the children from the sailing "
    "school race each other around the yellow buoys while their instructors shout from a rubber dinghy. "
)
_QUESTION_CORPUS = (
    "Look carefully at the picture and describe every shape you can see, the colour of each shape, "
    "where it is placed relative to the others, and what the background looks like, then say which "
    "shape is largest and whether any of them overlap or touch the edges of the image."
)


def bench_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A deterministic size x size test picture (the parity suite's: gradients, a red disc, a blue square)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient_picture(size, size).save(path)
    return path


def _fit(count: Callable[[str], int], tokenizer, corpus: str, target: int, what: str) -> str:
    """The prefix of `corpus` (cut at a token boundary) for which `count(text) == target`."""
    overhead = count("")
    if overhead >= target:
        raise QvlError(f"the {what} cannot be {target} tokens: the chat template alone takes {overhead}")
    ids = tokenizer.encode(corpus, add_special_tokens=False).ids
    while len(ids) < 2 * target + 16:
        corpus = corpus + corpus
        ids = tokenizer.encode(corpus, add_special_tokens=False).ids

    def text(k: int) -> str:
        return tokenizer.decode(ids[:k]).strip()

    k = max(1, target - overhead)
    tried: set[int] = set()
    for _ in range(32):
        if k in tried:
            break
        tried.add(k)
        c = count(text(k))
        if c == target:
            return text(k)
        k = max(1, k + target - c)
    for k in range(max(1, min(tried) - 8), max(tried) + 9):  # non-monotone merges: scan around
        if count(text(k)) == target:
            return text(k)
    raise QvlError(f"could not build a {what} of exactly {target} tokens with this tokenizer")


def build_inputs(
    artifact: Path, work_dir: Path, text_tokens: int = TEXT_TOKENS, question_tokens: int = QUESTION_TOKENS,
    image_size: int = IMAGE_SIZE,
) -> dict:
    """The two cases' chat messages, with their exact prompt and visual token counts."""
    builder = PromptBuilder.from_dir(artifact)
    tok = builder.tokenizer

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def prompt_len(t: str) -> int:
        return len(builder.build(user({"type": "text", "text": t}), add_generation_prompt=True))

    text = _fit(prompt_len, tok, _TEXT_CORPUS, text_tokens, "text prompt")
    question = _fit(lambda t: len(tok.encode(t, add_special_tokens=False).ids), tok, _QUESTION_CORPUS,
                    question_tokens, "question")
    image = bench_image(Path(work_dir) / f"bench_{image_size}.png", image_size)
    text_msgs = user({"type": "text", "text": text})
    image_msgs = user({"type": "image", "image": str(image)}, {"type": "text", "text": question})
    prepared = builder.build(image_msgs, add_generation_prompt=True)
    visual = int((prepared.input_ids == builder.image_token_id).sum())
    grid = prepared.image_grid_thw[0].tolist()
    return {
        "text": {"messages": text_msgs, "prompt_tokens": prompt_len(text)},
        "image": {
            "messages": image_msgs,
            "prompt_tokens": len(prepared),
            "visual_tokens": visual,
            "question_tokens": len(tok.encode(question, add_special_tokens=False).ids),
            "image_size": [image_size, image_size],
            "grid_thw": [int(g) for g in grid],
            "patch_size": builder.image_config.patch_size,
            "merge_size": builder.image_config.merge_size,
        },
    }
