"""Property-based fuzzing of the runtime's untrusted-input parsers (issue #12, "trustworthy by contract").

Contract: chat messages and image files either work or raise `QvlError` (one line + hint in the CLI,
exit 2) -- never another exception, which the CLI would print as a traceback. Example counts are
bounded so the file stays under ~30 s on 2 shared cores; `derandomize=True` keeps CI reproducible.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qvl.errors import QvlError
from qvl.runtime.image_preprocess import MAX_IMAGE_PIXELS, ImageProcessorConfig, load_image, preprocess_images
from qvl.runtime.model import _attach_images
from qvl.runtime.prompt import PromptBuilder
from qvl.runtime.sampling import check_options

# The committed sentinel has the Qwen3-VL chat template, a tokenizer and a preprocessor config: a real
# prompt builder without torch or an export.
SENTINEL = Path(__file__).resolve().parents[1] / "toolchain" / "data" / "sentinel"

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder.from_dir(SENTINEL)


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


PNG, JPEG = _tiny_png(), _tiny_jpeg()

# -- (a) chat messages -------------------------------------------------------------------------------

# Text that is never an absolute path, so a fuzzed image "path" cannot name /dev/zero or a FIFO.
safe_text = st.text(max_size=12).filter(lambda s: not s.startswith("/"))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=True, allow_infinity=True), safe_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(safe_text, inner, max_size=3)),
    max_leaves=8,
)
image_value = st.one_of(
    json_value,
    st.binary(max_size=64),
    st.just(PNG),  # a real image: the success path
    st.builds(lambda b: "data:image/png;base64," + b, st.sampled_from(["", "!!!", "iVBORw0KGgo=", "AAAA"])),
    st.sampled_from(["http://example.com/x.png", "file://nowhere.png", "data:text/plain,hi", ".", ""]),
    st.dictionaries(st.sampled_from(["url", "path", "image", "detail"]), json_value, max_size=2),
)
part_type = st.one_of(st.sampled_from(["text", "image", "image_url", "video", "input_audio", "tool"]), safe_text)
part = st.one_of(
    json_value,
    st.fixed_dictionaries({"type": part_type}, optional={"text": json_value}),
    st.fixed_dictionaries({"type": st.just("image")},
                          optional={k: image_value for k in ("image", "url", "path", "base64")}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(image_value, st.none())}),
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer"]), json_value)
message = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={
        "role": role,
        "content": st.one_of(json_value, st.lists(part, max_size=3)),
        "tool_calls": json_value,
        "reasoning_content": json_value,
    }),
)
conversation = st.one_of(json_value, st.lists(message, max_size=4))


@settings(FUZZ, max_examples=300)
@given(conversation)
def test_messages_build_or_qvl_error(builder, messages):
    try:
        builder.build(messages)
    except QvlError:
        pass


@settings(FUZZ, max_examples=150)
@given(conversation, st.lists(image_value, max_size=2))
def test_messages_with_images_argument_build_or_qvl_error(builder, messages, images):
    # `Model.generate(messages, images=[...])` slots the images in first, then builds the prompt.
    try:
        builder.build(_attach_images(messages, images) if images else messages)
    except QvlError:
        pass


def test_surrogates_in_text_are_a_qvl_error(builder):
    # Non-UTF-8 bytes from argv/stdin arrive as lone surrogates; the tokenizer would raise TypeError.
    with pytest.raises(QvlError, match="not valid UTF-8"):
        builder.build([{"role": "user", "content": "caf\udce9"}])


# -- generation options: any value is accepted or a QvlError (never numpy's/ORT's own exceptions) ---------

option_value = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=3))


@settings(FUZZ, max_examples=200)
@given(st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "threads", "seed"]),
       option_value)
def test_generation_options_pass_or_qvl_error(name, value):
    try:
        check_options(**{name: value})
    except QvlError as e:
        assert name in str(e) and "\n" not in str(e)


# -- (b) image files -----------------------------------------------------------------------------------

CFG = ImageProcessorConfig()


def _load_and_preprocess(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    try:
        preprocess_images([load_image(str(path))], CFG)
    except QvlError:
        pass


@st.composite
def mutated(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(FUZZ, max_examples=150)
@given(st.one_of(st.binary(max_size=256), st.builds(lambda b: PNG[:8] + b, st.binary(max_size=64)),
                 st.builds(lambda b: JPEG[:4] + b, st.binary(max_size=64))))
def test_arbitrary_bytes_load_or_qvl_error(tmp_path_factory, data):
    _load_and_preprocess(tmp_path_factory.mktemp("b"), data)


@settings(FUZZ, max_examples=200)
@given(st.one_of(mutated(PNG), mutated(JPEG)))
def test_mutated_png_and_jpeg_load_or_qvl_error(tmp_path_factory, data):
    _load_and_preprocess(tmp_path_factory.mktemp("m"), data)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


side = st.one_of(st.integers(0, 300), st.sampled_from([1, 4000, 65535, 2**31 - 1, 2**32 - 1]))


# (bit depth, colour type): mostly combinations PIL accepts (so decoding starts), sometimes garbage.
VALID_PNG_MODES = [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (8, 3), (8, 4), (16, 4),
                   (8, 6), (16, 6)]
png_mode = st.one_of(st.sampled_from(VALID_PNG_MODES), st.tuples(st.integers(0, 255), st.integers(0, 255)))


@settings(FUZZ, max_examples=150)
@given(side, side, png_mode, st.integers(0, 2))
def test_png_with_fuzzed_header_fields_load_or_qvl_error(tmp_path_factory, width, height, mode, interlace):
    depth, color = mode
    # Random byte flips mostly break a CRC and stop at the header; here the IHDR is garbage with a
    # valid CRC, so the decoder itself meets impossible sizes, depths and colour types.
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    rest = PNG[8 + 25:]  # the original IDAT/IEND after the 25-byte IHDR chunk
    data = PNG[:8] + _png_chunk(b"IHDR", ihdr) + rest
    _load_and_preprocess(tmp_path_factory.mktemp("h"), data)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRCs) with a tiny IDAT: a decompression bomb
    as far as the header is concerned."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def test_decompression_bomb_header_is_a_qvl_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    assert 30000 * 30000 > MAX_IMAGE_PIXELS
    with pytest.raises(QvlError, match="pixel limit"):
        load_image(str(path))


def test_extreme_aspect_ratio_is_a_qvl_error(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (1, 4000), "white").save(path)
    with pytest.raises(QvlError, match="aspect ratio"):
        preprocess_images([load_image(str(path))], CFG)
