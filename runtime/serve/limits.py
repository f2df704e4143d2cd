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

Videos (`video_url` parts: `data:video/...;base64,` or an allow-listed local file, as for images; needs PyAV) are
probed from their container header before any frame is decoded: the frame count bounds the decoding work (every
frame up to the last sampled one is decoded, so a 32 MB data URL of a long, static clip could cost minutes of CPU),
so more than `max_video_frames` frames, frames over `max_image_pixels`, or more than `max_videos` videos are a 400;
the visual tokens are bounded by the prompt builder's per-video limit.
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
DEFAULT_MAX_VIDEOS = 1
DEFAULT_MAX_VIDEO_FRAMES = 1800  # 1 minute at 30 fps


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request body; also the largest image file read from --allow-dir
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width * height of one image, checked from its header
    max_images: int = DEFAULT_MAX_IMAGES  # images in one request
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a slot; more is a 429
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # when the request gives none (then at most what the slot has left)
    allow_dir: Path | None = None  # local image files only under this directory (resolved); None: no local files
    max_videos: int = DEFAULT_MAX_VIDEOS  # videos in one request
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES  # frames in one video's header (bounds the decoding work)


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


def _bad_video(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_video")


def _check_video_bytes(raw: bytes, limits: ServeLimits, param: str) -> bytes:
    from qvl.errors import QvlError
    from qvl.runtime.video import probe_video

    try:
        info = probe_video(raw)  # the container header (and, without a frame count in it, a demux): no decoding
    except QvlError as exc:
        raise _bad_video(str(exc).replace("cannot read video <bytes>", "the data is not a readable video"), param) \
            from None
    if info.total_num_frames > limits.max_video_frames:
        raise _bad_video(f"video of {info.total_num_frames:,} frames is over the server's limit of "
                         f"{limits.max_video_frames:,} frames", param)
    if info.width * info.height > limits.max_image_pixels:
        raise _bad_video(f"video frames of {info.width}x{info.height} are over the server's limit of "
                         f"{limits.max_image_pixels:,} pixels", param)
    return raw


# what each kind of part is checked with: (noun, data-URL media prefix, error code prefix, bytes check)
_KINDS = {"image": ("image", "image/", _bad_image, _check_image_bytes),
          "video": ("video", "video/", _bad_video, _check_video_bytes)}


def _data_url(url: str, limits: ServeLimits, param: str, kind: str = "image") -> bytes:
    noun, media_prefix, bad, check = _KINDS[kind]
    header, sep, payload = url[5:].partition(",")
    media, *options = header.split(";")
    if not sep or "base64" not in options:
        raise bad(f"only base64 data URLs are supported (data:{media_prefix}...;base64,...)", param)
    if not media.lower().startswith(media_prefix):
        raise bad(f"data URL media type {media or 'text/plain'!r} is not {'an' if noun == 'image' else 'a'} {noun}",
                  param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data URL's base64 payload is malformed", param) from None
    return check(raw, limits, param)


def _local_file(path: str, limits: ServeLimits, param: str, kind: str = "image") -> bytes:
    noun, _, bad, check = _KINDS[kind]
    if limits.allow_dir is None:
        raise ApiError(400, f"local {noun} files are not allowed (start the server with --allow-dir DIR)", param=param,
                       code=f"{noun}_path_not_allowed")
    root = Path(os.path.realpath(limits.allow_dir))
    candidate = Path(path) if os.path.isabs(path) else root / path
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and root not in resolved.parents:
        raise ApiError(400, f"{noun} path is outside the allowed directory", param=param,
                       code=f"{noun}_path_not_allowed")
    try:  # the resolved path: no symlink left to swap except the last component, which O_NOFOLLOW refuses
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise bad(f"cannot open the {noun} file: {exc.strerror or exc}", param) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise bad(f"the {noun} path is not a regular file", param)
        if info.st_size > limits.max_body_bytes:
            raise bad(f"the {noun} file has {info.st_size:,} bytes, over the limit of {limits.max_body_bytes:,}", param)
        raw = f.read(limits.max_body_bytes + 1)
    return check(raw, limits, param)


def resolve_image(url: str, limits: ServeLimits, param: str, kind: str = "image") -> bytes:
    """The bytes of one `image_url` (or, kind "video", `video_url`; see the module docstring), or an ApiError(400)."""
    noun = _KINDS[kind][0]
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return _data_url(url, limits, param, kind)
    if lowered.startswith(("http://", "https://")):
        raise ApiError(400, f"remote {noun} URLs are not fetched; send the {noun} as a data: URL", param=param,
                       code=f"invalid_{noun}_url")
    if lowered.startswith("file://"):
        return _local_file(url[7:], limits, param, kind)
    if "://" in url[:32]:
        raise ApiError(400, f"unsupported {noun} URL scheme {url.split('://', 1)[0]!r}", param=param,
                       code=f"invalid_{noun}_url")
    return _local_file(url, limits, param, kind)


def runtime_messages(request: ChatCompletionRequest, limits: ServeLimits) -> list[dict[str, Any]]:
    """The request's messages as the prompt builder takes them: text parts, and images as their (checked) bytes."""
    out, images, videos = [], 0, 0
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
            if part.type == "video_url":
                if role != "user":
                    raise _bad_video("videos are only accepted in user messages", param)
                videos += 1
                if videos > limits.max_videos:
                    raise ApiError(400, f"more than {limits.max_videos} videos in one request", param=param,
                                   code="too_many_videos")
                raw = resolve_image(part.video_url.url, limits, param + ".video_url", kind="video")
                parts.append({"type": "video", "video": raw,
                              **({"fps": part.video_url.fps} if part.video_url.fps is not None else {})})
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
