"""The OpenAI chat-completions wire format the server speaks: request and response models, and its error JSON.

Requests are validated here (types and ranges, with the offending field as the error's `param`); what the runtime
cannot do (n > 1, logprobs, tools, penalties, non-text response formats) is a 400 naming the field, not silently
ignored. Fields OpenAI defines that change nothing here (`user`, `metadata`, `store`, `detail` of an image, ...)
and unknown fields are ignored, as vLLM and llama-server do. `top_k` and `repetition_penalty` are accepted as
extensions (vLLM's names).

Sampling: greedy unless `temperature` > 0 (an omitted temperature is greedy too: the runtime's default, what
`qvl-compile run` does; OpenAI itself samples at 1.0 then). With a temperature, omitted `top_p` / `top_k` come
from the artifact's generation_config.json, as `run --temperature` does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as a 400: the first problem, its field path as `param`."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-")))
    msg = first.get("msg", "invalid value")
    return ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Model):
    url: str
    detail: str | None = None  # accepted, ignored: the image is preprocessed at the artifact's own resolution


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(_Model):
    url: str
    fps: float | None = None  # frames sampled per second (default: the artifact's video processor config)


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Union[TextPart, ImagePart, VideoPart]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, value: Any) -> Any:
        # a clear message for audio/file parts instead of a union mismatch listing every variant
        if isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") not in ("text", "image_url", "video_url"):
                    raise ValueError(f"content part type {part.get('type')!r} is not supported (text, image_url and "
                                     f"video_url are)")
        return value


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # extension (vLLM)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # extension (vLLM)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields the runtime does not implement: only their "off" value is accepted
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops or None

    def unsupported(self) -> ApiError | None:
        """The first field set to something this server cannot do, as a 400 (None when all is fine)."""
        checks = [
            ("n", self.n not in (None, 1), "only n=1 is supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("top_logprobs", self.top_logprobs not in (None, 0), "logprobs are not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0.0), "presence_penalty is not supported (repetition_penalty is)"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0.0), "frequency_penalty is not supported (repetition_penalty is)"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("tools", bool(self.tools), "tools are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tools are not supported"),
            ("response_format", (self.response_format or {"type": "text"}).get("type") != "text",
             "only the text response format is supported"),
        ]
        for param, bad, message in checks:
            if bad:
                return ApiError(400, message, param=param, code="unsupported_parameter")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return ApiError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
        return None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qvl-compile"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(stats) -> Usage:
    """`GenerationStats` -> usage counts (completion tokens include the end-of-turn token when one was generated)."""
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens,
                 total_tokens=stats.prompt_tokens + stats.generated_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.reused_tokens))
