"""`qvl.runtime.load(artifact)` -> a model that answers chat messages with images, torch-free.

Pipeline per request: chat template + image / video preprocessing (`prompt.py`, `image_preprocess.py`,
`video.py`) -> vision graph (one call per image or video frame pair) -> embeddings and DeepStack features
scattered into the prompt positions -> MRoPE position ids (`mrope.py`) -> chunked prefill -> decode loop with sampling (`sampling.py`)
and streaming detokenization with stop strings (`detokenize.py`).

With a `PrefixCache` (`cache=`, or `Model.session()`), a conversation's KV cache and its images' vision
features are kept between calls: the next call prefills only the prompt past the longest prefix it shares with
what the cache holds, and encodes only images not seen before (`runtime/prefix_cache.py`). Without one, every
call starts from scratch (what the toolchain's bench, parity and calibration measure).

With `speculative=DraftConfig(...)` (greedy only), decoding is exact speculative decoding by prompt lookup
(`runtime/speculative.py`): tokens drafted from the prompt and the answer so far are verified in one decoder step
(`Runner.verify_step`: the greedy choice after every position), the accepted ones kept and the cache truncated
back (`Runner.truncate`); the output is the plain greedy output, token for token.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qvl.errors import QvlError
from qvl.runtime.detokenize import StopStrings, StreamDecoder
from qvl.runtime.generation_defaults import GenerationDefaults
from qvl.runtime.backends.base import Runner
from qvl.runtime.mrope import decode_position_ids, rope_index
from qvl.runtime.prefix_cache import (DEFAULT_IMAGE_CACHE_BYTES, DEFAULT_MIN_REUSE, ImageFeatures, ImageSpan,
                                      PrefixCache, image_digest, runner_identity)
from qvl.runtime.prompt import PreparedPrompt, PromptBuilder
from qvl.runtime.sampling import Sampler, SamplingConfig, check_options
from qvl.runtime.speculative import DraftConfig, PromptLookup, SpeculationStats, accept

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
    # With a PrefixCache: prompt tokens whose KV came from the cache (the rest, prompt_tokens - reused_tokens,
    # was prefilled), and the images the vision encoder ran on / took from the image cache (images wholly
    # inside the reused prefix need neither).
    reused_tokens: int = 0
    images_encoded: int = 0
    image_cache_hits: int = 0
    # With `speculative=`: decode steps, tokens drafted / accepted, tokens per step (None: plain decoding), and
    # why speculation is off when it was asked for but the artifact cannot verify (then decoding is plain).
    speculation: SpeculationStats | None = None
    speculation_note: str | None = None

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

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
        self.device_note = device_note  # why `device="auto"` ended on the CPU (or an int8 saturation note), else None
        self.plan = None  # the placement plan under --ram-budget / --vram-budget (`load`), else None
        artifact = Path(runner.artifact)
        # The chat template from the file the exporter resolved (manifest `source.chat_template`; artifacts
        # exported before it was recorded resolve transformers' precedence again, which gives the same file).
        manifest = getattr(runner, "manifest", None)
        template_file = getattr(getattr(manifest, "source", None), "chat_template", None)
        self.prompts = PromptBuilder.from_dir(artifact, template_file=template_file)
        # generation_config.json validated (the exporter checked it too): `run` / `chat` decode by it
        # (`generation_defaults.resolve_decoding`); the raw dict stays for callers that read it.
        self.generation_defaults = GenerationDefaults.from_dir(artifact)
        gen_path = Path(artifact) / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        eos_ids = list(self.generation_defaults.eos_token_id)
        im_end = self.prompts.token_to_id("<|im_end|>")
        self.stop_ids = sorted(set(eos_ids + ([im_end] if im_end is not None else [])))
        self.context_length = self.engine.context_length
        self._identity = runner_identity(runner)  # image-cache keys: vision outputs of this runner only

    # -- inputs ----------------------------------------------------------------------------------

    def prepare(self, messages: Any, images: list | None = None) -> PreparedPrompt:
        if images:
            messages = _attach_images(messages, images)
        return self.prompts.build(messages, add_generation_prompt=True)

    def _images(self, prompt: PreparedPrompt, digests: bool) -> list[_Image]:
        """Each image and video of the prompt, in prompt order: its placeholder positions, its pixel-value rows, its
        grid (and digest). A video is one item: the vision graph runs once per frame group of it (`encode_images`
        with its [t, h, w] grid), its features fill its `<|video_pad|>` positions like an image's."""
        items = []
        if prompt.num_images:
            items += self._visual_items(prompt.input_ids, prompt.pixel_values, prompt.image_grid_thw,
                                        self.prompts.image_token_id, self.prompts.image_config.merge_size, "image",
                                        digests)
        if prompt.num_videos:
            items += self._visual_items(prompt.input_ids, prompt.pixel_values_videos, prompt.video_grid_thw,
                                        self.prompts.video_token_id, self.prompts.video_config.merge_size, "video",
                                        digests)
            items.sort(key=lambda item: int(item.positions[0]))  # prefix-cache spans go in prompt order
        return items

    def _visual_items(self, ids, pixel_values, grid_thw, token_id, merge_size, what, digests) -> list[_Image]:
        token_pos = np.flatnonzero(ids == token_id)
        merge = merge_size ** 2
        grids = np.asarray(grid_thw, dtype=np.int64)
        rows = [int(np.prod(g)) for g in grids]
        tokens = [r // merge for r in rows]
        if sum(tokens) != token_pos.size or sum(rows) != pixel_values.shape[0]:
            raise QvlError(f"{token_pos.size} {what} tokens in the prompt but {sum(tokens)} {what} features")
        out, tok_off, row_off = [], 0, 0
        for grid, r, t in zip(grids, rows, tokens):
            pv = pixel_values[row_off:row_off + r]
            digest = image_digest(self._identity, pv, grid) if digests else ""
            out.append(_Image(token_pos[tok_off:tok_off + t], pv, grid, digest))
            tok_off, row_off = tok_off + t, row_off + r
        return out

    def _image_features(self, image: _Image, cache: PrefixCache | None, stats: GenerationStats) -> ImageFeatures:
        feats = cache.images.get(image.digest) if cache is not None else None
        if feats is not None:
            stats.image_cache_hits += 1
            return feats
        embeds, ds = self.engine.encode_images(image.pixel_values, image.grid[None])
        stats.images_encoded += 1
        if embeds.shape[0] != image.positions.size:
            raise QvlError(f"{image.positions.size} image tokens in the prompt but {embeds.shape[0]} image features")
        feats = ImageFeatures(np.asarray(embeds), tuple(np.asarray(d) for d in ds))
        if cache is not None:
            cache.images.put(image.digest, feats)
        return feats

    def _rope(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        merge = self.engine.model_info.spatial_merge_size
        return rope_index(prompt.input_ids, prompt.mm_token_type_ids, prompt.image_grid_thw, merge,
                          video_grid_thw=prompt.video_grid_thw)

    def _prompt_tensors(self, prompt: PreparedPrompt, stats: GenerationStats, images: list[_Image] | None = None,
                        start: int = 0, cache: PrefixCache | None = None, rope: tuple | None = None):
        """Inputs for prompt positions [start, L): embeddings [1, L - start, H], DeepStack features (None when no
        image reaches into that range) and the full prompt's position ids [3, 1, L] with its rope delta (`rope`,
        when already computed)."""
        ids = prompt.input_ids
        images = self._images(prompt, digests=False) if images is None else images
        embeds = self.engine.embed(ids[start:])[None]  # [1, L - start, H]
        deepstack = None
        t = time.perf_counter()
        for image in images:
            inside = image.positions >= start
            if not inside.any():
                continue  # wholly inside the reused prefix: its KV is cached
            feats = self._image_features(image, cache, stats)
            local = image.positions[inside] - start
            embeds[0, local] = feats.embeds[inside]
            if deepstack is None:
                deepstack = np.zeros((len(feats.deepstack), 1, len(ids) - start, embeds.shape[-1]), dtype=np.float32)
            for k, feat in enumerate(feats.deepstack):
                deepstack[k, 0, local] = feat[inside]
        if images:
            stats.vision_seconds = time.perf_counter() - t
        position_ids, rope_delta = rope if rope is not None else self._rope(prompt)
        return embeds, position_ids, deepstack, rope_delta

    # -- generation ------------------------------------------------------------------------------

    def session(self, image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, min_reuse: int = DEFAULT_MIN_REUSE) -> "Session":
        """A conversation that keeps its KV cache and its images' vision features between calls (see `Session`)."""
        return Session(self, PrefixCache(image_cache_bytes=image_cache_bytes, min_reuse=min_reuse))

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
        cache: PrefixCache | None = None,
        speculative: DraftConfig | None = None,
        forced_tokens: Sequence[int] | None = None,  # [bench] emit these ids instead of the model's picks
    ) -> Iterator[tuple[int, np.ndarray | None]]:
        """Yield (token id, logits or None) for each generated token; stop ids are yielded too.

        `speculative` (greedy only: sampling, a repetition penalty or `keep_logits` are a `QvlError`): exact
        speculative decoding by prompt lookup, the same tokens as without; `stats.speculation` counts steps, drafted
        and accepted tokens. On an artifact whose decoder returns the last position's logits only (exported
        before `logit_positions`) decoding is plain and `stats.speculation_note` says why.

        `ignore_stop=True` (used by `qvl-compile bench`) keeps decoding after a stop id, so exactly
        `max_new_tokens` tokens come out, as eager `generate(min_new_tokens=max_new_tokens)` does.

        `cache` (a `PrefixCache`): start from the longest prefix of `prompt` that its kept KV cache holds, take
        image features from its image cache, and keep this generation's KV cache in it afterwards (also when the
        consumer stops reading early; not after an error).

        `forced_tokens` (used by `benchmarks/followup_ttft.py`): the k-th generated token is `forced_tokens[k]`
        rather than the model's pick (the model's own after them), and is fed back as a picked token would be. The
        steps and their cost are unchanged, so this times a model that answered these ids: random weights answer
        with token soup that does not tokenize back into itself, a trained model's answer does.
        """
        check_options(max_new_tokens=max_new_tokens, seed=seed)
        forced = [int(t) for t in forced_tokens] if forced_tokens is not None else []
        if forced and speculative is not None:
            raise ValueError("forced_tokens and speculative decoding exclude each other")
        stats = stats if stats is not None else GenerationStats()
        sampling = sampling or SamplingConfig(do_sample=False)
        speculative = self._check_speculative(speculative, sampling, keep_logits, stats)
        n = len(prompt)
        stats.prompt_tokens = n
        if n + max_new_tokens > self.context_length:
            raise QvlError(
                f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context of {self.context_length}",
                hint="shorten the prompt, use smaller images or lower --max-new-tokens",
            )
        t0 = time.perf_counter()
        images = self._images(prompt, digests=cache is not None)
        spans = [ImageSpan(int(im.positions[0]), int(im.positions[-1]) + 1, im.digest) for im in images]
        rope = self._rope(prompt)  # the whole prompt's position ids [3, 1, L]: a reused prefix must have the same
        reuse = cache.match(self.engine, prompt.input_ids, rope[0][:, 0], spans) if cache is not None else 0
        embeds, position_ids, deepstack, rope_delta = self._prompt_tensors(prompt, stats, images, reuse, cache, rope)
        kv = self._kv_cache(cache, reuse, n + max_new_tokens)
        stats.reused_tokens = reuse
        if cache is not None:
            cache.reused_tokens += reuse
            cache.prefilled_tokens += n - reuse
        fed: list[int] = []  # generated tokens run through the decoder (all but the last one yielded)
        box = [kv]  # the KV cache (a speculative step's truncation may hand back another object)
        completed = False
        try:
            yield from self._generate(box, embeds, position_ids[:, :, reuse:], deepstack, rope_delta, prompt,
                                      max_new_tokens, sampling, seed, prefill_chunk, keep_logits, stats, ignore_stop,
                                      t0, fed, speculative, forced)
            completed = True
        except GeneratorExit:  # the consumer stopped reading: every step so far completed
            completed = True
            raise
        finally:  # kept for the next call, or released (no cache, or failed mid-step)
            kv = box[0]
            if cache is not None and completed and kv.length > n + len(fed):
                # speculative decoding stopped inside a step's accepted drafts: keep what was yielded (as plain
                # decoding would have it)
                try:
                    kv = box[0] = self.engine.truncate(kv, n + len(fed), n + max_new_tokens)
                except BaseException:
                    self.engine.free(kv)
                    raise
            if cache is not None and completed and kv.length == n + len(fed):
                held_ids = np.concatenate([prompt.input_ids.astype(np.int64), np.asarray(fed, dtype=np.int64)])
                held_pos = np.concatenate([position_ids[:, 0], decode_position_ids(n, len(fed), rope_delta)[:, 0]], axis=1)
                cache.keep(self.engine, kv, held_ids, held_pos, spans)
            else:
                self.engine.free(kv)

    def _kv_cache(self, cache: PrefixCache | None, reuse: int, capacity: int):
        """A KV cache holding the prompt's first `reuse` positions, with room for `capacity`."""
        kv = cache.take(self.engine) if cache is not None else None
        if kv is not None and reuse == 0:  # a new conversation: release the old one before allocating
            self.engine.free(kv)
            kv = None
        if kv is None:
            return self.engine.new_cache(capacity=capacity)
        try:
            return self.engine.truncate(kv, reuse, capacity)
        except BaseException:
            self.engine.free(kv)
            raise

    def _check_speculative(self, speculative: DraftConfig | None, sampling: SamplingConfig, keep_logits: bool,
                           stats: GenerationStats) -> DraftConfig | None:
        """The draft config to decode with, or None (not asked for, or the artifact cannot verify: a note)."""
        if speculative is None:
            return None
        if not isinstance(speculative, DraftConfig):
            raise QvlError(f"speculative must be a DraftConfig, not {type(speculative).__name__}")
        if not greedy_only(sampling) or keep_logits:
            what = ("sampling" if sampling.do_sample else "a repetition penalty" if not greedy_only(sampling)
                    else "keep_logits")
            raise QvlError(f"speculative decoding is greedy only: it cannot be combined with {what}",
                           hint="drop --temperature / --repetition-penalty, or --speculative")
        if self.engine.max_verify_positions < 2:
            stats.speculation_note = (f"speculative decoding off: the decoder of {self.engine.artifact} returns the "
                                      "last position's logits only (exported before `logit_positions`); decoding is "
                                      "plain (same output). Re-compile it from the checkpoint with this qvl-compile "
                                      "to speculate (compiling from an older fp32 artifact keeps its decoder)")
            return None
        stats.speculation = SpeculationStats()
        return speculative

    def _generate(self, box, embeds, position_ids, deepstack, rope_delta, prompt, max_new_tokens, sampling,
                  seed, prefill_chunk, keep_logits, stats, ignore_stop, t0, fed=None, speculative=None, forced=()):
        fed = [] if fed is None else fed
        cache = box[0]
        n = embeds.shape[1]  # the positions to prefill (the prompt past any reused prefix)
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
        if speculative is not None:
            yield from self._speculate(box, token, prompt, max_new_tokens, stats, ignore_stop, rope_delta, t0, fed,
                                       speculative)
            return
        sampler = Sampler(seed)
        history = [int(i) for i in prompt.input_ids]
        t_dec = time.perf_counter()
        for k in range(max_new_tokens):
            if not on_device_argmax:
                token = sampler.next_token(logits, sampling, history)
            if k < len(forced):
                token = forced[k]
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
                token_next = int(self.engine.greedy_step(cache, self.engine.embed([token])[None], pos)[0])
            else:
                logits = self.engine.step(cache, self.engine.embed([token])[None], pos)[0]
            fed.append(token)
            if on_device_argmax:
                token = token_next
        stats.decode_seconds = time.perf_counter() - t_dec

    def _speculate(self, box, token, prompt, max_new_tokens, stats, ignore_stop, rope_delta, t0, fed, config):
        """Greedy decoding from the prefill's `token`, each step verifying drafted tokens: yields exactly the
        tokens plain greedy decoding yields, one at a time (nothing past a stop id or `max_new_tokens`)."""
        engine, spec = self.engine, stats.speculation
        capacity = len(prompt) + max_new_tokens
        most = engine.max_verify_positions - 1  # drafts one verify step can take
        lookup = PromptLookup(config, [int(i) for i in prompt.input_ids])
        pending = [token]  # the last step's tokens, not yielded yet; all but the last are in the cache
        k = 0
        t_dec = time.perf_counter()
        while True:
            for j, tok in enumerate(pending):
                if k == 0:
                    stats.time_to_first_token = time.perf_counter() - t0
                    t_dec = time.perf_counter()
                k += 1
                stats.generated_tokens = k
                yield tok, None
                lookup.extend([tok])
                stop = tok in self.stop_ids and not ignore_stop
                if stop or k == max_new_tokens:
                    stats.stop_reason = "stop_token" if stop else "max_new_tokens"
                    if spec.per_step:  # count only the tokens of the last step that were emitted
                        spec.per_step[-1] -= len(pending) - 1 - j
                    stats.decode_seconds = time.perf_counter() - t_dec
                    return
                if j < len(pending) - 1:
                    fed.append(tok)  # an accepted draft: already in the cache
            token = pending[-1]
            cache = box[0]
            # at most the tokens still allowed: this step yields up to len(draft) + 1
            draft = lookup.propose(min(most, max_new_tokens - k - 1))
            embeds = engine.embed([token] + draft)[None]
            pos = decode_position_ids(cache.length, 1 + len(draft), rope_delta)
            if draft:
                greedy = [int(g) for g in engine.verify_step(cache, embeds, pos)[0]]
                pending, accepted = accept(draft, greedy)
                if accepted < len(draft):  # drop the rejected drafts' positions
                    box[0] = engine.truncate(cache, cache.length - (len(draft) - accepted), capacity)
            else:
                pending, accepted = [int(engine.greedy_step(cache, embeds, pos)[0])], 0
            fed.append(token)
            spec.steps += 1
            spec.drafted += len(draft)
            spec.accepted += accepted
            spec.per_step.append(len(pending))

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
        cache: PrefixCache | None = None,
        speculative: DraftConfig | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens arrive (never a partial UTF-8 character, nothing past a stop string).

        `cache`: a `PrefixCache` to reuse the prefix and images of an earlier call from (see `generate_ids`).
        `speculative`: a `DraftConfig` for exact speculative decoding (greedy only; see `generate_ids`)."""
        # Same ranges as the CLI flags; checked before any image is loaded. (A generator body runs on the
        # first next(), which is where a caller iterating stream() sees the QvlError.)
        check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, seed=seed)
        sampling = _sampling_config(self.generation_config, temperature, top_p, top_k, repetition_penalty)
        if speculative is not None:
            self._check_speculative(speculative, sampling, False, GenerationStats())
        prompt = self.prepare(messages, images)
        decoder = StreamDecoder(self.prompts.tokenizer, skip_special_tokens=True)
        stops = StopStrings(stop or [])
        with contextlib.closing(self.generate_ids(prompt, max_new_tokens, sampling, seed, stats=stats,
                                                  cache=cache, speculative=speculative)) as tokens:
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


class Session:
    """One conversation on a `Model` that keeps its KV cache and its images' vision features between calls.

    `model.session()`; then `stream` / `generate` exactly as on the model, each time with the whole conversation
    so far. A call prefills only the part of the prompt past what it shares with the previous call's prompt and
    answer, and runs the vision encoder only on images it has not seen: greedy answers are the model's answers
    to the same messages from scratch (bit for bit where every decoder node computes a position alone: qvl's CPU
    kernels, runtime/kernels; elsewhere up to the float rounding of prefilling a position in another call). A conversation that shares (almost) nothing with the previous one starts
    over, freeing the old KV cache. `reset()` frees everything (also `with model.session() as chat:`). One
    generation at a time: not thread-safe."""

    def __init__(self, model: Model, cache: PrefixCache | None = None):
        self.model = model
        self.cache = cache if cache is not None else PrefixCache()

    def stream(self, messages: Any, images: list | None = None, **kwargs) -> Iterator[str]:
        return self.model.stream(messages, images, cache=self.cache, **kwargs)

    def generate(self, messages: Any, images: list | None = None, **kwargs) -> str:
        return "".join(self.stream(messages, images, **kwargs))

    def generate_ids(self, prompt: PreparedPrompt, max_new_tokens: int = 128, **kwargs):
        return self.model.generate_ids(prompt, max_new_tokens, cache=self.cache, **kwargs)

    def reset(self) -> None:
        """Free the kept KV cache and forget the encoded images."""
        self.cache.clear()

    close = reset

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()


@dataclass(frozen=True, eq=False)
class _Image:
    positions: np.ndarray  # its placeholder tokens' prompt positions
    pixel_values: np.ndarray  # its rows of the prompt's pixel values
    grid: np.ndarray  # [3]
    digest: str  # "" when not needed (no PrefixCache)


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


def load(artifact: str | Path, device: str = "auto", threads: int | None = None, ram_budget: int | None = None,
         vram_budget: int | None = None, warm: bool = False, context: int | None = None,
         vision: bool = True) -> Model:
    """Load `artifact` on `device`: "auto" (CUDA when onnxruntime has a usable CUDA provider for it, else the
    CPU, with `Model.device_note` saying why), "cpu", "cuda" (ONNX Runtime's CUDA provider) or "trt" (a
    TensorRT engine kit's built engines). The rules are in `runtime/backends/select.py`.

    `ram_budget` / `vram_budget` (bytes): run a partitioned artifact (`qvl-compile partition`) as the placement
    planner decides (`runtime/placement.py`; the plan is `Model.plan`), its KV cache planned for `context` positions
    (default: the planner's, 4096; a longer sequence is refused), and with `vision` False for text-only requests
    (the vision encoder is then not planned for; an image later is refused). `warm`: read the artifact's files into the
    page cache in parallel sequential reads on a background thread while the sessions load
    (`runtime/residency.warm_in_background`)."""
    from qvl.runtime.backends.select import check_device, load_runner

    check_device(device)
    check_options(threads=threads)
    if warm:  # while the sessions load (benchmarks/README.md "Cold start": reading first, then loading, was slower)
        from qvl.runtime.residency import warm_in_background

        warm_in_background(Path(artifact), threads=threads or 2)
    runner, sel = load_runner(Path(artifact), device=device, threads=threads, ram_budget=ram_budget,
                              vram_budget=vram_budget, context=context, vision=vision)
    model = Model(runner, device_note=sel.note)
    model.plan = sel.plan
    return model
