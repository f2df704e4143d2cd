"""Eager PyTorch reference: the parity oracle for every other part of qvl-compile.

Loads a checkpoint with transformers in fp32 and answers (images, messages) with greedy decoding,
keeping the logits of every step. Nothing here is optimised; it is what "matches eager" means.
Prompts are transformers' `Qwen3VLProcessor` (`hf_compat.image_only_processor`): the chat template in the
processor's file precedence, images through `Qwen2VLImageProcessorPil` (`image_processor_name`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvl.runtime.image_preprocess import load_image
from qvl.runtime.prompt import collect_images, collect_videos, normalize_messages
from qvl.toolchain.export.checkpoint_io import validate_checkpoint
from qvl.toolchain.export.hf_compat import image_only_processor
from qvl.toolchain.eval.video_reference import process_with_videos


@dataclass
class ReferenceResult:
    prompt_ids: np.ndarray  # int64 [L]
    token_ids: list[int]  # generated ids (stop token included when hit)
    text: str
    step_logits: list[np.ndarray] = field(default_factory=list)  # float32 [V] per generated token


def _load_images(messages: list[dict]) -> list:
    # The runtime's own message walk, so both sides see the same images in the same order.
    return [load_image(src) for src in collect_images(normalize_messages(messages))]


class EagerReference:
    def __init__(self, checkpoint: Path, dtype: str = "float32", threads: int | None = None, lora=None):
        """`lora` (a `toolchain/export/lora.LoraAdapter`): applied through PEFT itself and merged (`peft_merged`),
        the oracle for an artifact compiled with `--lora`."""
        # torch / transformers ([export] extra) only here: parity imports this module, and its suite
        # (suite_images, suite_cases) serves torch-free callers.
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        self.info = validate_checkpoint(Path(checkpoint))
        if lora is not None:
            lora.check_against(self.info)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            str(checkpoint), dtype=getattr(torch, dtype), attn_implementation="eager"
        ).eval()
        if lora is not None:
            from qvl.toolchain.export.lora import peft_merged

            self.model = peft_merged(self.model, lora).eval()
        # transformers' processor-precedence chat template and the PIL image processor (see hf_compat)
        self.processor = image_only_processor(Path(checkpoint))
        self.image_processor_name = type(self.processor.image_processor).__name__
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    def prepare(self, messages: list[dict]):
        images = _load_images(messages)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        videos = collect_videos(normalize_messages(messages))
        if videos:  # transformers' own video processor (toolchain/eval/video_reference.py)
            return process_with_videos(self.processor, self.info.path, text, images, videos)
        return self.processor(text=[text], images=images or None, return_tensors="pt")

    def answer(self, messages: list[dict], max_new_tokens: int = 32, keep_logits: bool = True) -> ReferenceResult:
        torch = self.torch
        inputs = self.prepare(messages)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_logits=keep_logits,
                return_dict_in_generate=True,
                eos_token_id=self.eos_ids,
                pad_token_id=self.eos_ids[0] if self.eos_ids else None,
            )
        prompt_len = inputs["input_ids"].shape[1]
        ids = out.sequences[0, prompt_len:].tolist()
        logits = [l[0].float().numpy().copy() for l in out.logits] if keep_logits else []
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return ReferenceResult(inputs["input_ids"][0].numpy(), ids, text, logits)
