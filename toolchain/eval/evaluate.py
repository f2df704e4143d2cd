"""Task accuracy of a model on visual questions (exact match), and agreement between two models.

The seam is `answer_fn(messages, images) -> str`: `messages` are chat messages for the real chat
template (a user turn with `{"type": "image"}` placeholders and the question text) and `images` the
PIL images in placeholder order. `eager_answer_fn` is the transformers fp32 reference; a compiled
artifact plugs in its own function, and `agreement` compares the two reports answer by answer.

`evaluate` and `agreement` need neither torch nor transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from qvl.toolchain.eval.synthetic_vqa import messages_for
from qvl.toolchain.export.hf_compat import image_only_processor

AnswerFn = Callable[[list, list], str]


def normalize_answer(text: str) -> str:
    """Exact-match normal form: surrounding whitespace stripped, lowercase, trailing period(s) removed."""
    text = str(text).strip().lower()
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text


@dataclass
class EvalRecord:
    question: str
    expected: str
    predicted: str
    correct: bool
    kind: str = ""
    seed: int | None = None


@dataclass
class EvalReport:
    accuracy: float
    correct: int
    total: int
    seconds: float
    records: list[EvalRecord] = field(default_factory=list)

    @property
    def by_kind(self) -> dict[str, float]:
        """Accuracy per question kind (colour/count/left/number, or `user`)."""
        groups: dict[str, list[bool]] = {}
        for r in self.records:
            groups.setdefault(r.kind, []).append(r.correct)
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in self.by_kind.items())
        return f"accuracy {self.accuracy:.4f} ({self.correct}/{self.total}) [{kinds}] in {self.seconds:.1f}s"


def evaluate(
    answer_fn: AnswerFn,
    samples: Iterable[dict],
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Ask every sample's question through `answer_fn` and score normalised exact match."""
    samples = list(samples)
    t0 = time.perf_counter()
    records: list[EvalRecord] = []
    for i, s in enumerate(samples):
        images = list(s.get("images") or [])
        messages = s.get("messages") or messages_for(s["question"], len(images))
        predicted = answer_fn(messages, images)
        records.append(
            EvalRecord(
                question=s["question"],
                expected=s["answer"],
                predicted=predicted,
                correct=normalize_answer(predicted) == normalize_answer(s["answer"]),
                kind=s.get("kind") or "user",
                seed=s.get("seed"),
            )
        )
        if progress:
            progress(i + 1, len(samples))
    correct = sum(r.correct for r in records)
    return EvalReport(
        accuracy=correct / len(records) if records else 0.0,
        correct=correct,
        total=len(records),
        seconds=time.perf_counter() - t0,
        records=records,
    )


def agreement(report_a: EvalReport, report_b: EvalReport, normalized: bool = True) -> float:
    """Fraction of questions on which both reports gave the same answer (normalised unless told not to)."""
    ra: Sequence[EvalRecord] = report_a.records
    rb: Sequence[EvalRecord] = report_b.records
    if len(ra) != len(rb):
        raise ValueError(f"reports cover different question sets ({len(ra)} vs {len(rb)} questions)")
    for i, (a, b) in enumerate(zip(ra, rb)):
        if a.question != b.question or a.expected != b.expected:
            raise ValueError(f"reports differ at question {i}: {a.question!r} vs {b.question!r}")
    if not ra:
        return 1.0
    norm = normalize_answer if normalized else (lambda s: s)
    return sum(norm(a.predicted) == norm(b.predicted) for a, b in zip(ra, rb)) / len(ra)


def eager_answer_fn(checkpoint_dir: str | Path, max_new_tokens: int = 8, threads: int | None = None) -> AnswerFn:
    """Greedy answers from transformers' Qwen3VLForConditionalGeneration (fp32) on `checkpoint_dir`.

    Prompt text and pixels come from transformers' own processor (`image_only_processor`), so this is the
    reference a compiled artifact is compared with.
    """
    # [export] extra, only here: `qvl-compile eval ART` scores an artifact through the torch-free runtime.
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    checkpoint_dir = Path(checkpoint_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    processor = image_only_processor(checkpoint_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    model.eval()
    tok = processor.tokenizer
    gen_eos = model.generation_config.eos_token_id
    eos = list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    pad = model.generation_config.pad_token_id
    # Greedy, whatever the checkpoint's generation_config.json says about sampling.
    model.generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos[0],
    )

    def answer(messages: list, images: list) -> str:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=list(images) or None, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc)
        new = out[0, enc["input_ids"].shape[1] :]
        return tok.decode(new, skip_special_tokens=True)

    return answer
