"""What a request may ask for, and turning its messages into the runtime's (images resolved to bytes, safely).

Images (`image_url` parts) are read by the server, never by the prompt builder from a client-given path:

* `data:image/...;base64,` URLs are decoded; any other media type, bad base64 or bytes that are not an image are
  a 400 before the model sees anything;
* a local file (`file:///...`, an absolute path, or a path relative to the allow-listed directory) only when the
  server was started with `--allow-dir DIR` and the path, with every symlink resolved, lies inside DIR; the file is
  opened without following a last-component symlink and must be a regular file within the body-size limit;
* `http(s)://` URLs are a 400: the server makes no network fetches.

Every image's header is read (not decoded) to refuse one over `max_image_pixels` before decoding; its tokens are
bounded by the prompt builder's per-image limit, and the whole prompt by the slot's context.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvl.runtime.serve.openai_schema import ApiError, ChatCompletionRequest

DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request body; also the largest image file read from --allow-dir
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width * height of one image, checked from its header
    max_images: int = DEFAULT_MAX_IMAGES  # images in one request
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a slot; more is a 429
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # when the request gives none (then at most what the slot has left)
    allow_dir: Path | None = None  # local image files only under this directory (resolved); None: no local files


def _bad_image(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_image")


def _check_image_bytes(raw: bytes, limits: ServeLimits, param: str) -> bytes:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:  # lazy: reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise _bad_image("image too large (decompression-bomb limit)", param) from None
    except Exception as exc:  # PIL raises many types for garbage: all are "not an image" to the client
        raise _bad_image(f"the data is not a readable image ({type(exc).__name__})", param) from None
    if width * height > limits.max_image_pixels:
        raise _bad_image(f"image of {width}x{height} = {width * height:,} pixels is over the server's limit of "
                         f"{limits.max_image_pixels:,} pixels", param)
    return raw


def _data_url(url: str, limits: ServeLimits, param: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    media, *options = header.split(";")
    if not sep or "base64" not in options:
        raise _bad_image("only base64 data URLs are supported (data:image/png;base64,...)", param)
    if not media.lower().startswith("image/"):
        raise _bad_image(f"data URL media type {media or 'text/plain'!r} is not an image", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("the data URL's base64 payload is malformed", param) from None
    return _check_image_bytes(raw, limits, param)


def _local_file(path: str, limits: ServeLimits, param: str) -> bytes:
    if limits.allow_dir is None:
        raise ApiError(400, "local image files are not allowed (start the server with --allow-dir DIR)", param=param,
                       code="image_path_not_allowed")
    root = Path(os.path.realpath(limits.allow_dir))
    candidate = Path(path) if os.path.isabs(path) else root / path
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and root not in resolved.parents:
        raise ApiError(400, "image path is outside the allowed directory", param=param, code="image_path_not_allowed")
    try:  # the resolved path: no symlink left to swap except the last component, which O_NOFOLLOW refuses
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _bad_image(f"cannot open the image file: {exc.strerror or exc}", param) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _bad_image("the image path is not a regular file", param)
        if info.st_size > limits.max_body_bytes:
            raise _bad_image(f"the image file has {info.st_size:,} bytes, over the limit of {limits.max_body_bytes:,}",
                             param)
        raw = f.read(limits.max_body_bytes + 1)
    return _check_image_bytes(raw, limits, param)


def resolve_image(url: str, limits: ServeLimits, param: str) -> bytes:
    """The bytes of one `image_url` (see the module docstring), or an ApiError(400)."""
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return _data_url(url, limits, param)
    if lowered.startswith(("http://", "https://")):
        raise ApiError(400, "remote image URLs are not fetched; send the image as a data: URL", param=param,
                       code="invalid_image_url")
    if lowered.startswith("file://"):
        return _local_file(url[7:], limits, param)
    if "://" in url[:32]:
        raise ApiError(400, f"unsupported image URL scheme {url.split('://', 1)[0]!r}", param=param,
                       code="invalid_image_url")
    return _local_file(url, limits, param)


def runtime_messages(request: ChatCompletionRequest, limits: ServeLimits) -> list[dict[str, Any]]:
    """The request's messages as the prompt builder takes them: text parts, and images as their (checked) bytes."""
    out, images = [], 0
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages.{i}.content.{j}"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise ApiError(400, "images are only accepted in user messages", param=param, code="invalid_image")
            images += 1
            if images > limits.max_images:
                raise ApiError(400, f"more than {limits.max_images} images in one request", param=param,
                               code="too_many_images")
            parts.append({"type": "image", "image": resolve_image(part.image_url.url, limits, param + ".image_url")})
        out.append({"role": role, "content": parts})
    return out
