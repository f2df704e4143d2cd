"""`qvl.runtime.load(artifact)` -> a model that answers chat messages with images, torch-free.

Pipeline per request: chat template + image preprocessing (`prompt.py`, `image_preprocess.py`) ->
vision graph -> image embeddings and DeepStack features scattered into the prompt positions ->
MRoPE position ids (`mrope.py`) -> chunked prefill -> decode loop with sampling (`sampling.py`) and
streaming detokenization with stop strings (`detokenize.py`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qvl.errors import QvlError
from qvl.runtime.detokenize import StopStrings, StreamDecoder
from qvl.runtime.backends.base import Runner
from qvl.runtime.mrope import decode_position_ids, rope_index
from qvl.runtime.prompt import PreparedPrompt, PromptBuilder
from qvl.runtime.sampling import Sampler, SamplingConfig, check_options

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    vision_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    stop_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes from prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    step_logits: list[np.ndarray] = field(default_factory=list)


class Model:
    """Generation over one runner (`runtime/backends/base.Runner`): `Model(runner)`.

    `Model(path, device=..., threads=...)` is kept for the toolchain's callers: it builds the runner with
    `backends.select.load_runner` (default device "cpu", so measurements stay where they were)."""

    def __init__(self, runner: Runner | str | Path, device: str = "cpu", threads: int | None = None,
                 device_note: str | None = None):
        if isinstance(runner, (str, Path)):
            from qvl.runtime.backends.select import load_runner

            check_options(threads=threads)  # ORT would silently take 0 as "default" and fail on negatives
            runner, sel = load_runner(Path(runner), device=device, threads=threads)
            device_note = sel.note
        self.runner = runner
        self.engine = runner  # the name callers used before the runner protocol
        self.device = runner.device
        self.device_note = device_note  # why `device="auto"` ended on the CPU, else None
        artifact = Path(runner.artifact)
        self.prompts = PromptBuilder.from_dir(artifact)
        gen_path = Path(artifact) / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        eos = self.generation_config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        im_end = self.prompts.token_to_id("<|im_end|>")
        self.stop_ids = sorted(set(eos_ids + ([im_end] if im_end is not None else [])))
        self.context_length = self.engine.context_length

    # -- inputs ----------------------------------------------------------------------------------

    def prepare(self, messages: Any, images: list | None = None) -> PreparedPrompt:
        if images:
            messages = _attach_images(messages, images)
        return self.prompts.build(messages, add_generation_prompt=True)

    def _prompt_tensors(self, prompt: PreparedPrompt, stats: GenerationStats):
        ids = prompt.input_ids
        embeds = self.engine.embed(ids)[None]  # [1, L, H]
        deepstack = None
        if prompt.num_images:
            t = time.perf_counter()
            image_embeds, ds = self.engine.encode_images(prompt.pixel_values, prompt.image_grid_thw)
            stats.vision_seconds = time.perf_counter() - t
            mask = ids == self.prompts.image_token_id
            if int(mask.sum()) != image_embeds.shape[0]:
                raise QvlError(f"{int(mask.sum())} image tokens in the prompt but {image_embeds.shape[0]} image features")
            embeds[0, mask] = image_embeds
            deepstack = np.zeros((len(ds), 1, len(ids), embeds.shape[-1]), dtype=np.float32)
            for k, feat in enumerate(ds):
                deepstack[k, 0, mask] = feat
        merge = self.engine.model_info.spatial_merge_size
        position_ids, rope_delta = rope_index(ids, prompt.mm_token_type_ids, prompt.image_grid_thw, merge)
        return embeds, position_ids, deepstack, rope_delta

    # -- generation ------------------------------------------------------------------------------

    def generate_ids(
        self,
        prompt: PreparedPrompt,
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        seed: int | None = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        keep_logits: bool = False,
        stats: GenerationStats | None = None,
        ignore_stop: bool = False,  # [bench] decode exactly max_new_tokens, past any stop id
    ) -> Iterator[tuple[int, np.ndarray | None]]:
        """Yield (token id, logits or None) for each generated token; stop ids are yielded too.

        `ignore_stop=True` (used by `qvl-compile bench`) keeps decoding after a stop id, so exactly
        `max_new_tokens` tokens come out, as eager `generate(min_new_tokens=max_new_tokens)` does.
        """
        check_options(max_new_tokens=max_new_tokens, seed=seed)
        stats = stats if stats is not None else GenerationStats()
        sampling = sampling or SamplingConfig(do_sample=False)
        n = len(prompt)
        stats.prompt_tokens = n
        if n + max_new_tokens > self.context_length:
            raise QvlError(
                f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context of {self.context_length}",
                hint="shorten the prompt, use smaller images or lower --max-new-tokens",
            )
        t0 = time.perf_counter()
        embeds, position_ids, deepstack, rope_delta = self._prompt_tensors(prompt, stats)
        cache = self.engine.new_cache(capacity=n + max_new_tokens)
        try:
            yield from self._generate(cache, embeds, position_ids, deepstack, rope_delta, prompt, max_new_tokens,
                                      sampling, seed, prefill_chunk, keep_logits, stats, ignore_stop, t0)
        finally:  # done, stopped early by the consumer (generator closed) or failed: release the cache
            self.engine.free(cache)

    def _generate(self, cache, embeds, position_ids, deepstack, rope_delta, prompt, max_new_tokens, sampling,
                  seed, prefill_chunk, keep_logits, stats, ignore_stop, t0):
        n = len(prompt)
        chunk = max(1, int(prefill_chunk))
        on_device_argmax = greedy_only(sampling) and not keep_logits
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            ds = None if deepstack is None else deepstack[:, :, a:b]
            # Greedy without logit processing needs only the argmax: a device backend keeps the logits there.
            if on_device_argmax:
                logits = None
                token = int(self.engine.greedy_step(cache, embeds[:, a:b], position_ids[:, :, a:b], ds)[0])
            else:
                logits = self.engine.step(cache, embeds[:, a:b], position_ids[:, :, a:b], ds)[0]
        stats.prefill_seconds = time.perf_counter() - t0 - stats.vision_seconds
        sampler = Sampler(seed)
        history = [int(i) for i in prompt.input_ids]
        t_dec = time.perf_counter()
        for k in range(max_new_tokens):
            if not on_device_argmax:
                token = sampler.next_token(logits, sampling, history)
            if k == 0:
                stats.time_to_first_token = time.perf_counter() - t0
                t_dec = time.perf_counter()
            stats.generated_tokens = k + 1
            yield token, (logits if keep_logits else None)
            history.append(token)
            if token in self.stop_ids and not ignore_stop:
                stats.stop_reason = "stop_token"
                break
            if k + 1 == max_new_tokens:
                stats.stop_reason = "max_new_tokens"
                break
            pos = decode_position_ids(cache.length, 1, rope_delta)
            if on_device_argmax:
                token = int(self.engine.greedy_step(cache, self.engine.embed([token])[None], pos)[0])
            else:
                logits = self.engine.step(cache, self.engine.embed([token])[None], pos)[0]
        stats.decode_seconds = time.perf_counter() - t_dec

    def stream(
        self,
        messages: Any,
        images: list | None = None,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = 0,
        stop: list[str] | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens arrive (never a partial UTF-8 character, nothing past a stop string)."""
        # Same ranges as the CLI flags; checked before any image is loaded. (A generator body runs on the
        # first next(), which is where a caller iterating stream() sees the QvlError.)
        check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, seed=seed)
        sampling = _sampling_config(self.generation_config, temperature, top_p, top_k, repetition_penalty)
        prompt = self.prepare(messages, images)
        decoder = StreamDecoder(self.prompts.tokenizer, skip_special_tokens=True)
        stops = StopStrings(stop or [])
        with contextlib.closing(self.generate_ids(prompt, max_new_tokens, sampling, seed, stats=stats)) as tokens:
            for token, _ in tokens:
                if token in self.stop_ids:
                    break
                piece = stops.feed(decoder.push(token))
                if piece:
                    yield piece
                if stops.stopped:
                    if stats is not None:
                        stats.stop_reason = "stop_string"
                    return
        tail = stops.feed(decoder.finish()) + stops.flush()
        if tail:
            yield tail

    def generate(self, messages: Any, images: list | None = None, **kwargs) -> str:
        return "".join(self.stream(messages, images, **kwargs))


def greedy_only(sampling: SamplingConfig) -> bool:
    """True when the next token is the plain argmax of the logits (no sampling, no repetition penalty)."""
    return not sampling.do_sample and sampling.repetition_penalty in (None, 1.0)


def _sampling_config(gen: dict, temperature, top_p, top_k, repetition_penalty) -> SamplingConfig:
    """Greedy unless a temperature > 0 is given; then the artifact's generation_config fills the rest
    (Qwen's recommended top_k/top_p), as transformers' `generate` resolves it."""
    do_sample = temperature is not None and temperature > 0
    try:
        if not do_sample:
            return SamplingConfig(do_sample=False, repetition_penalty=repetition_penalty)
        return SamplingConfig.from_generation_config(
            gen, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty,
        )
    except ValueError as exc:
        raise QvlError(str(exc)) from None


def _attach_images(messages: Any, images: list) -> Any:
    """`generate(messages, images=[...])`: images fill the image parts that have no source, in order."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": [{"type": "text", "text": messages}]}]
    if not isinstance(messages, (list, tuple)):
        return messages  # not a conversation: prompt building rejects it with a QvlError
    return _fill(messages, images)


def _fill(messages: list, images: list) -> list:
    # Anything that is not a well-formed message/part is passed through untouched: the prompt builder
    # reports malformed messages as QvlErrors, this helper must not fail first with a TypeError.
    queue = list(images)
    out = []
    for m in messages:
        if isinstance(m, dict):
            m = dict(m)
            if isinstance(m.get("content"), list):
                parts = []
                for p in m["content"]:
                    if isinstance(p, dict):
                        p = dict(p)
                        if p.get("type") == "image" and p.get("image") is None and queue:
                            p["image"] = queue.pop(0)
                    parts.append(p)
                m["content"] = parts
        out.append(m)
    if queue:  # images without a slot go in front of the last user message's content
        for m in reversed(out):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, str):
                    content = [{"type": "text", "text": content}]
                elif not isinstance(content, list):
                    content = [] if content is None else [content]
                m["content"] = [{"type": "image", "image": im} for im in queue] + content
                break
    return out


def load(artifact: str | Path, device: str = "auto", threads: int | None = None) -> Model:
    """Load `artifact` on `device`: "auto" (CUDA when onnxruntime has a usable CUDA provider for it, else the
    CPU, with `Model.device_note` saying why), "cpu", "cuda" (ONNX Runtime's CUDA provider) or "trt" (a
    TensorRT engine kit's built engines). The rules are in `runtime/backends/select.py`."""
    from qvl.runtime.backends.select import check_device, load_runner

    check_device(device)
    check_options(threads=threads)
    runner, sel = load_runner(Path(artifact), device=device, threads=threads)
    return Model(runner, device_note=sel.note)
