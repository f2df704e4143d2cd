"""Prompt building for Qwen3-VL without transformers: chat template, image placeholders, token ids.

Reproduces what `Qwen3VLProcessor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)`
followed by `processor(text=[text], images=images)` computes:

* **Template rendering** exactly like `transformers.utils.chat_template_utils`: a jinja2
  `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols` extension
  and a `{% generation %}` tag, a `tojson` filter that does not HTML-escape (`json.dumps(ensure_ascii=False)`),
  globals `raise_exception`, `strftime_now`, a restricted `dict` and an underscore-rejecting `namespace`.
  The template sees `messages` rebuilt from plain JSON types (images become `"<PngImageFile>"`-style
  placeholders), `tools`, `documents=None`, `add_generation_prompt`, and the tokenizer's named special
  tokens (`eos_token`, `pad_token`, ...) plus any extra keyword arguments (e.g. `add_vision_id=True`).
* **Message normalisation** like `ProcessorMixin.apply_chat_template`: keys whose value is None are
  dropped, OpenAI `{"type": "image_url", "image_url": {"url": ...}}` blocks become
  `{"type": "image", "url": ...}`, content may be a string or a list of blocks, and the images are the
  `image` / `url` / `path` / `base64` values of `type == "image"` blocks, in conversation order.
* **Placeholder expansion**: the i-th `<|image_pad|>` becomes `grid_t * grid_h * grid_w // merge_size**2`
  copies of itself (`Qwen3VLProcessor.replace_image_token`); the i-th `<|video_pad|>` (a `type == "video"`
  block: `video` / `url` / `path`, options `fps` / `max_frames` / `total_pixels`) becomes its timestamped frame
  groups (`replace_video_token`; decoding and preprocessing in `runtime/video.py`).
* **Tokenization** with `tokenizers.Tokenizer.from_file("tokenizer.json")`, `add_special_tokens=True`
  (the file's post-processor; for Qwen it adds nothing, there is no BOS), and `mm_token_type_ids`
  (0 text, 1 image token, 2 video token). Token ids are looked up in the tokenizer, never hard-coded.

Chat template precedence, as transformers loads a processor directory (`chat_template_source.py`):
`processor_config.json["chat_template"]`, then `chat_template.json` (legacy processor file), then
`chat_template.jinja`, then the tokenizer's `tokenizer_config.json["chat_template"]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qvl.errors import QvlError
from qvl.runtime.chat_template_source import resolve_chat_template
from qvl.runtime.image_preprocess import (DEFAULT_MAX_IMAGE_TOKENS, ImageProcessorConfig, check_image_limits,
                                          load_image, preprocess_images)
from qvl.runtime.video import (DEFAULT_MAX_VIDEO_TOKENS, VIDEO_OPTION_KEYS, VIDEO_SOURCE_KEYS, PreparedVideo,
                               VideoProcessorConfig, check_video_options, load_video, video_placeholder)

# The named special tokens transformers passes to every chat template (`tokenizer.special_tokens_map`).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Defaults of transformers' Qwen2Tokenizer.__init__ for named tokens absent from tokenizer_config.json
# (an explicit null in the config means "no such token").
_QWEN2_TOKENIZER_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# Qwen3VLProcessor's fallbacks when the tokenizer does not name these tokens.
_DEFAULT_MM_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
_IMAGE_PIXEL_KEYS = ("min_pixels", "max_pixels")  # per-image resize bounds in a content block (qwen-vl-utils' keys)

MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2


@dataclass(frozen=True, eq=False)
class PreparedPrompt:
    input_ids: np.ndarray  # int64 [L]
    mm_token_type_ids: np.ndarray  # int64 [L]: 0 text, 1 image placeholder, 2 video placeholder
    pixel_values: np.ndarray | None  # float32 [sum(grid_h * grid_w), C*T*P*P], None without images
    image_grid_thw: np.ndarray | None  # int64 [n_images, 3], None without images
    text: str  # the rendered chat template, before placeholder expansion
    pixel_values_videos: np.ndarray | None = None  # float32 [sum(t * h * w), C*T*P*P], None without videos
    video_grid_thw: np.ndarray | None = None  # int64 [n_videos, 3], None without videos
    video_timestamps: tuple[tuple[float, ...], ...] = ()  # seconds per temporal group, per video (in the prompt)

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def num_videos(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# ---------------------------------------------------------------------------------------------------
# Jinja environment (transformers.utils.chat_template_utils._cached_compile_jinja_template)


@lru_cache(maxsize=16)
def compile_chat_template(chat_template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers' AssistantTracker: `{% generation %}...{% endgeneration %}` renders its body
        # (transformers only records the span when asked for an assistant mask).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise QvlError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None


# ---------------------------------------------------------------------------------------------------
# Message normalisation (transformers' _message_objects_to_dicts, _normalize_chat_messages,
# ProcessorMixin._normalize_conversations, _plain_template_data, _alias_reasoning_fields)


def _objects_to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _objects_to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as the template and the image collection see them (a fresh copy; media left as-is)."""
    messages = _objects_to_dicts(getattr(messages, "messages", messages))
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QvlError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise QvlError(f"each message must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            blocks = []
            for block in content:
                if isinstance(block, str):
                    block = {"type": "text", "text": block}  # our convenience: a bare string part is text
                if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
                    info = block["image_url"]
                    block = {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
                elif isinstance(block, dict) and block.get("type") == "video_url" and "video_url" in block:
                    # vLLM's OpenAI extension; per-video options (fps, ...) may sit beside the url
                    info = block["video_url"]
                    extra = {k: info[k] for k in VIDEO_OPTION_KEYS if isinstance(info, dict) and k in info}
                    block = {"type": "video", "url": info.get("url", "") if isinstance(info, dict) else info, **extra}
                blocks.append(block)
            message["content"] = blocks
        out.append(message)
    return out


def check_utf8(text: str, what: str) -> None:
    """QvlError unless `text` is valid Unicode. Command-line bytes that are not UTF-8 arrive as lone
    surrogates (Python's surrogateescape), which the tokenizer rejects with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QvlError(f"{what} is not valid UTF-8 text (undecodable byte at character {e.start})",
                       hint="pass text in UTF-8") from None


def collect_images(messages: list[dict]) -> list[Any]:
    """The image sources of `type == "image"` blocks, in order (ProcessorMixin's collection)."""
    images = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "image":
                continue
            for key in _IMAGE_SOURCE_KEYS:
                if key in block:
                    value = block[key]
                    if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
                        value = "data:image/*;base64," + value
                    images.append(value)
                    break
            else:
                raise QvlError("an image content block has no 'image', 'url', 'path' or 'base64' key")
    return images


def collect_image_options(messages: list[dict]) -> list[dict[str, int]]:
    """Per image block, in `collect_images` order: its `min_pixels` / `max_pixels` keys (the per-image resize
    bounds qwen-vl-utils reads from a content block), checked to be integers >= 1."""
    options = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if isinstance(block, dict) and block.get("type") == "image":
                opts = {k: block[k] for k in _IMAGE_PIXEL_KEYS if block.get(k) is not None}
                check_image_limits(**opts)
                options.append(opts)
    return options


def collect_videos(messages: list[dict]) -> list[tuple[Any, dict]]:
    """(source, options) of every `type == "video"` block, in order: the source is its `video` / `url` / `path`
    value (ProcessorMixin's keys), the options its `fps` / `max_frames` / `total_pixels` keys, checked."""
    videos = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "video":
                continue
            key = next((k for k in VIDEO_SOURCE_KEYS if k in block), None)
            if key is None:
                raise QvlError("a video content block has no 'video', 'url' or 'path' key")
            opts = {k: block[k] for k in VIDEO_OPTION_KEYS if block.get(k) is not None}
            check_video_options(**opts)
            videos.append((block[key], opts))
    return videos


def _plain_template_data(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list) -> list:
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


# ---------------------------------------------------------------------------------------------------
# Checkpoint / artifact files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QvlError(f"cannot read {path}: {e}") from None


def find_chat_template(directory: str | os.PathLike) -> str:
    """The chat template of a checkpoint/artifact directory, in transformers' processor precedence
    (`chat_template_source.resolve_chat_template`: which file it came from, and why)."""
    return resolve_chat_template(directory).template


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # serialized AddedToken
        return value["content"]
    return None


def special_tokens_map(tokenizer_config: dict) -> dict[str, str]:
    """transformers' `tokenizer.special_tokens_map` for a tokenizer_config.json: the named special tokens
    (class defaults of Qwen2Tokenizer where a key is absent, none where it is null) plus model-specific
    ones (`extra_special_tokens` / `model_specific_special_tokens` dicts, other `*_token` string keys)."""
    out: dict[str, str] = {}
    is_qwen2 = str(tokenizer_config.get("tokenizer_class", "")).startswith("Qwen2Tokenizer")
    for key in _NAMED_SPECIAL_TOKENS:
        if key in tokenizer_config:
            value = _token_content(tokenizer_config[key])
        else:
            value = _QWEN2_TOKENIZER_DEFAULTS.get(key) if is_qwen2 else None
        if value is not None:
            out[key] = value
    auto = {
        k: _token_content(v)
        for k, v in tokenizer_config.items()
        if k.endswith("_token") and k not in _NAMED_SPECIAL_TOKENS and _token_content(v) is not None
    }
    explicit = tokenizer_config.get("model_specific_special_tokens") or {}
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, dict):
        out.update({k: _token_content(v) for k, v in extra.items() if _token_content(v) is not None})
    out.update({k: v for k, v in auto.items()})
    if isinstance(explicit, dict):
        out.update({k: _token_content(v) for k, v in explicit.items() if _token_content(v) is not None})
    return out


# ---------------------------------------------------------------------------------------------------


class PromptBuilder:
    """Chat messages -> token ids + pixel values for one checkpoint/artifact directory."""

    def __init__(
        self,
        tokenizer,  # tokenizers.Tokenizer
        chat_template: str,
        image_config: ImageProcessorConfig,
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.chat_template_source: str | None = None  # the file `from_dir` read it from (None: given in code)
        self.image_config = image_config
        # Image tokens one image may become (one vision call of merge_size**2 as many patches); see
        # `image_preprocess.DEFAULT_MAX_IMAGE_TOKENS`. `set_image_limits` changes it and the resize bounds.
        self.max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS
        self.special_tokens = dict(special_tokens or {})
        self._template = compile_chat_template(chat_template)
        tokens = {k: self.special_tokens.get(k, v) for k, v in _DEFAULT_MM_TOKENS.items()}
        self.image_token = tokens["image_token"]
        self.video_token = tokens["video_token"]
        self.vision_start_token = tokens["vision_start_token"]
        self.vision_end_token = tokens["vision_end_token"]
        self.image_token_id = self._required_id(self.image_token)
        self.video_token_id = self.token_to_id(self.video_token)
        self.vision_start_token_id = self.token_to_id(self.vision_start_token)
        self.vision_end_token_id = self.token_to_id(self.vision_end_token)
        # Videos (runtime/video.py): the video processor config is read on first use (`video_config`), so a
        # malformed one never stops an image request; per-request defaults set by `set_video_limits`.
        self._video_config: VideoProcessorConfig | None = None
        self.video_config_dir: Path | None = None
        self.max_video_tokens: int | None = DEFAULT_MAX_VIDEO_TOKENS
        self.video_options: dict[str, Any] = {}  # fps / max_frames / total_pixels for every video

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, template_file: str | None = None) -> "PromptBuilder":
        """`template_file`: take the chat template from that file (an artifact's `source.chat_template`, the
        file the exporter resolved) instead of resolving the precedence again."""
        from tokenizers import Tokenizer

        d = Path(directory)
        if not d.is_dir():
            raise QvlError(f"no such directory {d}")
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise QvlError(f"missing {tok_path}", hint="the checkpoint/artifact directory needs its tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise QvlError(f"cannot read {tok_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        cfg_path = d / "tokenizer_config.json"
        tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(tok_cfg, dict):
            raise QvlError(f"cannot read {cfg_path}: not a JSON object")
        image_config = ImageProcessorConfig.from_file(d / "preprocessor_config.json")
        source = resolve_chat_template(d, template_file)
        builder = cls(tokenizer, source.template, image_config, special_tokens_map(tok_cfg))
        builder.chat_template_source = source.file
        builder.video_config_dir = d
        return builder

    @property
    def video_config(self) -> VideoProcessorConfig:
        """The video processor settings (`VideoProcessorConfig.from_dir` of the directory; class defaults when
        the builder was made in code)."""
        if self._video_config is None:
            d = self.video_config_dir
            self._video_config = VideoProcessorConfig.from_dir(d) if d is not None else VideoProcessorConfig()
        return self._video_config

    @video_config.setter
    def video_config(self, cfg: VideoProcessorConfig) -> None:
        self._video_config = cfg

    def set_video_limits(self, max_video_tokens: int | None = None, fps: float | None = None,
                         max_frames: int | None = None, total_pixels: int | None = None, flags: bool = False) -> None:
        """Defaults for every later `build`: the token limit per video, the sampling rate, the frame cap and the
        pixel budget over all frames (None keeps the current value)."""
        check_video_options(flags=flags, max_video_tokens=max_video_tokens, fps=fps, max_frames=max_frames,
                            total_pixels=total_pixels)
        if max_video_tokens is not None:
            self.max_video_tokens = int(max_video_tokens)
        for key, value in (("fps", fps), ("max_frames", max_frames), ("total_pixels", total_pixels)):
            if value is not None:
                self.video_options[key] = value

    def set_image_limits(self, max_image_tokens: int | None = None, min_pixels: int | None = None,
                         max_pixels: int | None = None, flags: bool = False) -> None:
        """Defaults for every later `build`: the image-token limit per image and the resize bounds (what the
        processor's `min_pixels` / `max_pixels` arguments set). None keeps the current value."""
        check_image_limits(flags=flags, max_image_tokens=max_image_tokens, min_pixels=min_pixels,
                           max_pixels=max_pixels)
        self.image_config = self.image_config.with_pixels(min_pixels, max_pixels)
        if max_image_tokens is not None:
            self.max_image_tokens = int(max_image_tokens)

    # -- tokens ------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def _required_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise QvlError(f"the tokenizer has no {token} token")
        return token_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as the processor's tokenizer call gives them (add_special_tokens=True)."""
        check_utf8(text, "the prompt")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def mm_token_type_ids(self, input_ids: np.ndarray) -> np.ndarray:
        types = np.zeros(input_ids.shape, dtype=np.int64)
        types[input_ids == self.image_token_id] = MM_IMAGE
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = MM_VIDEO
        return types

    # -- template ----------------------------------------------------------------------------------

    def render(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The chat template applied to `messages` (processor.apply_chat_template(..., tokenize=False))."""
        return self._render(normalize_messages(messages), add_generation_prompt, tools, template_kwargs)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools, template_kwargs: dict) -> str:
        import jinja2

        chat = _alias_reasoning_fields(_plain_template_data(messages))
        kwargs = _plain_template_data({**self.special_tokens, **template_kwargs})
        try:
            return self._template.render(
                messages=chat,
                tools=_plain_template_data(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except jinja2.exceptions.TemplateError as e:
            raise QvlError(f"chat template error: {e}") from None
        except (TypeError, AttributeError, KeyError) as e:  # malformed messages the template trips over
            raise QvlError(f"chat template error: malformed messages ({type(e).__name__}: {e})") from None

    # -- everything --------------------------------------------------------------------------------

    def expand_image_tokens(self, text: str, image_grid_thw: np.ndarray) -> str:
        """Replace the i-th image token by its grid's number of merged patches, in order."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(image_grid_thw):
            raise QvlError(
                f"the prompt has {len(pieces) - 1} {self.image_token} placeholders but {len(image_grid_thw)} images"
            )
        merge_length = self.image_config.merge_size**2
        out = [pieces[0]]
        for thw, piece in zip(image_grid_thw, pieces[1:]):
            out.append(self.image_token * (int(np.prod(thw)) // merge_length))
            out.append(piece)
        return "".join(out)

    def expand_video_tokens(self, text: str, videos: Sequence[PreparedVideo]) -> str:
        """Replace the i-th video token by its timestamped per-frame-group placeholder, in order. Each placeholder
        wraps every frame group in `<|vision_start|>...<|vision_end|>`, so the chat template's own wrapper around the
        video token is collapsed first (Qwen's processor, and transformers' since 5.25: no extra outer pair)."""
        wrapper = self.vision_start_token + self.video_token + self.vision_end_token
        if videos:
            text = text.replace(wrapper, self.video_token)
        pieces = text.split(self.video_token)
        if len(pieces) - 1 != len(videos):
            raise QvlError(f"the prompt has {len(pieces) - 1} {self.video_token} placeholders but {len(videos)} videos")
        merge = self.video_config.merge_size
        out = [pieces[0]]
        for video, piece in zip(videos, pieces[1:]):
            out.append(video_placeholder(video.grid_thw, video.timestamps, merge, self.video_token,
                                         self.vision_start_token, self.vision_end_token))
            out.append(piece)
        return "".join(out)

    def _load_videos(self, videos: list[tuple[Any, dict]], options: dict, max_video_tokens: int | None,
                     max_frame_tokens: int | None) -> list[PreparedVideo]:
        if self.video_token_id is None:
            raise QvlError(f"the tokenizer has no {self.video_token} token: this model takes no video")
        request = self.video_config.with_request(**{**self.video_options, **options})
        limit = self.max_video_tokens if max_video_tokens is None else max_video_tokens
        return [load_video(src, request.with_request(**opts), max_video_tokens=limit, max_frame_tokens=max_frame_tokens)
                for src, opts in videos]

    def build(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_image_tokens: int | None = None,
        fps: float | None = None,
        video_max_frames: int | None = None,
        video_total_pixels: int | None = None,
        max_video_tokens: int | None = None,
        **template_kwargs: Any,
    ) -> PreparedPrompt:
        """Render, load and preprocess the images and videos, expand placeholders, tokenize.

        `min_pixels` / `max_pixels`: this request's resize bounds (the processor's call arguments); an image
        block's own `min_pixels` / `max_pixels` keys override them for that image. `max_image_tokens`: this
        request's limit per image (default `self.max_image_tokens`); an image above it is a QvlError. It also
        bounds one temporal group of a video (one vision call).

        Videos (`{"type": "video", "video": PATH, "fps": ..., "max_frames": ..., "total_pixels": ...}`):
        `fps` / `video_max_frames` / `video_total_pixels` are this request's sampling rate, frame cap and pixel
        budget over all frames (a block's own keys override them); `max_video_tokens` this request's limit per
        video (default `self.max_video_tokens`)."""
        check_image_limits(min_pixels=min_pixels, max_pixels=max_pixels, max_image_tokens=max_image_tokens)
        check_video_options(fps=fps, max_frames=video_max_frames, total_pixels=video_total_pixels,
                            max_video_tokens=max_video_tokens)
        normalized = normalize_messages(messages)
        sources = collect_images(normalized)
        videos = collect_videos(normalized)
        text = self._render(normalized, add_generation_prompt, tools, template_kwargs)

        n_placeholders = text.count(self.image_token)
        if n_placeholders != len(sources):
            raise QvlError(
                f"the chat template wrote {n_placeholders} {self.image_token} placeholders for {len(sources)} images",
                hint="put each image in its own {'type': 'image', 'image': ...} content block",
            )
        n_video_placeholders = text.count(self.video_token)
        if n_video_placeholders != len(videos):
            raise QvlError(
                f"the chat template wrote {n_video_placeholders} {self.video_token} placeholders for {len(videos)} "
                "videos",
                hint="put each video in its own {'type': 'video', 'video': PATH} content block",
            )

        pixel_values = image_grid_thw = None
        expanded = text
        image_limit = self.max_image_tokens if max_image_tokens is None else max_image_tokens
        if sources:
            request = self.image_config.with_pixels(min_pixels, max_pixels)
            cfgs = [request.with_pixels(**o) for o in collect_image_options(normalized)]
            images = [load_image(s) for s in sources]
            pixel_values, image_grid_thw = preprocess_images(images, cfgs, max_image_tokens=image_limit)
            expanded = self.expand_image_tokens(text, image_grid_thw)
        pixel_values_videos = video_grid_thw = None
        prepared: list[PreparedVideo] = []
        if videos:
            options = {k: v for k, v in (("fps", fps), ("max_frames", video_max_frames),
                                         ("total_pixels", video_total_pixels)) if v is not None}
            prepared = self._load_videos(videos, options, max_video_tokens, image_limit)
            pixel_values_videos = np.concatenate([v.pixel_values for v in prepared], axis=0)
            video_grid_thw = np.array([v.grid_thw for v in prepared], dtype=np.int64)
            expanded = self.expand_video_tokens(expanded, prepared)

        input_ids = self.encode(expanded)
        for token, token_id, what in ((self.image_token, self.image_token_id, "image"),
                                      (self.video_token, self.video_token_id, "video")):
            expected = expanded.count(token)
            n_ids = int((input_ids == token_id).sum()) if token_id is not None else 0
            if n_ids != expected:  # transformers' _check_special_mm_tokens
                raise QvlError(f"tokenizing produced {n_ids} {what} tokens for {expected} placeholders")
        return PreparedPrompt(
            input_ids=input_ids,
            mm_token_type_ids=self.mm_token_type_ids(input_ids),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            text=text,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_timestamps=tuple(tuple(v.timestamps[:v.grid_thw[0]]) for v in prepared),
        )


__all__ = [
    "MM_IMAGE",
    "MM_TEXT",
    "MM_VIDEO",
    "PreparedPrompt",
    "PromptBuilder",
    "check_utf8",
    "collect_image_options",
    "collect_images",
    "collect_videos",
    "compile_chat_template",
    "find_chat_template",
    "normalize_messages",
    "special_tokens_map",
]
