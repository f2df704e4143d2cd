"""qvl.runtime.prompt against transformers' own Qwen3VLProcessor (image-only bridge) as the oracle."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.errors import QvlError
from qvl.runtime.image_preprocess import ImageProcessorConfig
from qvl.runtime.prompt import PromptBuilder, find_chat_template

pytest.importorskip("transformers")

_RNG = np.random.default_rng(2024)
IMG_A = Image.fromarray(_RNG.integers(0, 256, (60, 90, 3), dtype=np.uint8))
IMG_B = Image.fromarray(_RNG.integers(0, 256, (300, 200, 4), dtype=np.uint8), "RGBA")
IMG_C = Image.fromarray(_RNG.integers(0, 256, (40, 700), dtype=np.uint8), "L")


def _text(t):
    return {"type": "text", "text": t}


def _image(im):
    return {"type": "image", "image": im}


CASES = {
    "text_only": [{"role": "user", "content": [_text("Hello there, how are you?")]}],
    "string_content": [{"role": "user", "content": "Hi  \n\n world   ünïcödé 123456 e\u0301 \r\n\tend"}],
    "one_image": [{"role": "user", "content": [_image(IMG_A), _text("Describe this image.")]}],
    "two_images": [
        {"role": "user", "content": [_image(IMG_A), _text("and"), _image(IMG_B), _text("compare them")]}
    ],
    "system_message": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [_image(IMG_C), _text("What is it?")]},
    ],
    "multi_turn": [
        {"role": "system", "content": [_text("Be brief.")]},
        {"role": "user", "content": [_image(IMG_A), _text("What?")]},
        {"role": "assistant", "content": "A cat. <think>x</think> <tool_call>"},
        {"role": "user", "content": [_text("And this one? <|im_start|>"), _image(IMG_B)]},
        {"role": "assistant", "content": [_text("A dog.")], "tool_calls": None},
        {"role": "user", "content": "Thanks!"},
    ],
    "openai_image_url": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG_A}}, _text("Caption?")]}
    ],
}


def _oracle_images(messages):
    images = []
    for m in messages:
        if isinstance(m["content"], list):
            for b in m["content"]:
                if b["type"] == "image":
                    images.append(b["image"])
                elif b["type"] == "image_url":
                    images.append(b["image_url"]["url"])
    return images


def _oracle(proc, messages, add_generation_prompt=True, **kwargs):
    text = proc.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    images = _oracle_images(messages)
    return text, proc(text=[text], images=images or None, return_tensors="np")


@pytest.fixture(scope="module")
def proc(tiny_checkpoint):
    from qvl.toolchain.export.hf_compat import image_only_processor

    return image_only_processor(tiny_checkpoint)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    return PromptBuilder.from_dir(tiny_checkpoint)


def _assert_same(prepared, text, ref):
    assert prepared.text == text
    assert prepared.input_ids.dtype == np.int64 and prepared.mm_token_type_ids.dtype == np.int64
    assert np.array_equal(prepared.input_ids, ref["input_ids"][0])
    assert np.array_equal(prepared.mm_token_type_ids, ref["mm_token_type_ids"][0])
    if "pixel_values" in ref:
        assert np.array_equal(prepared.image_grid_thw, ref["image_grid_thw"])
        assert np.array_equal(prepared.pixel_values, ref["pixel_values"])
    else:
        assert prepared.pixel_values is None and prepared.image_grid_thw is None


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_processor(proc, builder, name, add_generation_prompt):
    messages = CASES[name]
    text, ref = _oracle(proc, messages, add_generation_prompt)
    prepared = builder.build(copy.deepcopy(messages), add_generation_prompt=add_generation_prompt)
    _assert_same(prepared, text, ref)
    n_images = len(_oracle_images(messages))
    assert prepared.num_images == n_images
    assert int((prepared.mm_token_type_ids == 1).sum()) == (
        0 if n_images == 0 else int(ref["image_grid_thw"].prod(axis=1).sum()) // 4
    )


def test_template_kwargs_and_tools(proc, builder):
    messages = CASES["two_images"]
    text, ref = _oracle(proc, messages, add_vision_id=True)
    assert "Picture 2: " in text
    _assert_same(builder.build(copy.deepcopy(messages), add_vision_id=True), text, ref)

    tools = [{"type": "function", "function": {"name": "météo", "description": "Wetter <&> 天气",
                                                "parameters": {"type": "object", "properties": {}}}}]
    text = proc.apply_chat_template(copy.deepcopy(CASES["text_only"]), tools=tools, tokenize=False,
                                    add_generation_prompt=True)
    assert builder.render(CASES["text_only"], tools=tools) == text
    assert "天气" in text and "<&>" in text  # tojson neither escapes non-ASCII nor HTML


def test_image_paths_match_full_transformers_path(proc, builder, tmp_path):
    """apply_chat_template(tokenize=True) loads the files itself (transformers' load_image)."""
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    IMG_A.save(png)
    IMG_C.convert("RGB").save(jpg, quality=85)
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(png)}, _text("vs"), {"type": "image", "url": str(jpg)}, _text("?")]}]
    ref = proc.apply_chat_template(copy.deepcopy(messages), tokenize=True, return_dict=True,
                                   add_generation_prompt=True, return_tensors="np")
    prepared = builder.build(messages)
    assert np.array_equal(prepared.input_ids, ref["input_ids"][0])
    assert np.array_equal(prepared.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert np.array_equal(prepared.image_grid_thw, ref["image_grid_thw"])
    assert np.array_equal(prepared.pixel_values, ref["pixel_values"])


TRICKY = [
    "",
    "plain words",
    "  leading and trailing  ",
    "tabs\tand\r\nwindows\nnewlines\n\n\n",
    "numbers 1234567890 and 3.14159",
    "ünïcödé, e\u0301 (NFC), 日本語のテキスト, emoji 🙂👍🏽",
    "specials inline: <|im_start|>user\nhi<|im_end|><|endoftext|><|vision_start|><|image_pad|><|vision_end|>",
    "non-special added: <think>hmm</think> <tool_call>{}</tool_call>",
    "<|im_start|><|im_start|>  <|im_end|>",
    "don't won't I'LL 's 're",
]


def test_tokenizer_agrees_with_transformers(proc, builder):
    tok = proc.tokenizer
    for s in TRICKY:
        assert builder.encode(s).tolist() == tok(s)["input_ids"], s
        ids = tok(s)["input_ids"]
        for skip in (True, False):
            assert builder.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), s
    assert builder.decode(np.array(tok(TRICKY[6])["input_ids"])) == tok.decode(tok(TRICKY[6])["input_ids"],
                                                                               skip_special_tokens=True)


def test_token_ids_come_from_the_tokenizer(proc, builder):
    assert builder.image_token_id == proc.image_token_id
    assert builder.video_token_id == proc.video_token_id
    assert builder.vision_start_token_id == proc.vision_start_token_id
    assert builder.vision_end_token_id == proc.vision_end_token_id
    assert builder.special_tokens == proc.tokenizer.special_tokens_map  # what the template gets as kwargs


def test_other_special_token_ids(tiny_checkpoint, tmp_path):
    """A checkpoint whose special tokens live at other ids: nothing may be hard-coded."""
    from qvl.toolchain.export.hf_compat import image_only_processor
    from qvl.toolchain.checkpoints.presets import chat_template
    from qvl.toolchain.checkpoints.tokenizer_builder import build_tokenizer, tokenizer_config

    d = tmp_path / "shifted"
    d.mkdir()
    for name in ("config.json", "preprocessor_config.json", "chat_template.json"):
        shutil.copy(tiny_checkpoint / name, d / name)
    first = 5000
    build_tokenizer(first_special_id=first).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(chat_template(), 2048, first_special_id=first)))

    shifted = PromptBuilder.from_dir(d)
    assert shifted.image_token_id == first + 12
    other_proc = image_only_processor(d)
    for name in ("two_images", "multi_turn"):
        text, ref = _oracle(other_proc, CASES[name])
        _assert_same(shifted.build(copy.deepcopy(CASES[name])), text, ref)


def test_chat_template_precedence(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert find_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.jinja").write_text("from jinja\n")
    assert find_chat_template(tmp_path) == "from jinja\n"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from legacy json"}))
    assert find_chat_template(tmp_path) == "from legacy json"
    with pytest.raises(QvlError):
        find_chat_template(tmp_path / "missing")


# --- user errors ---------------------------------------------------------------------------------------


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_placeholder_without_image_is_a_user_error(builder):
    with pytest.raises(QvlError) as exc:
        builder.build([{"role": "user", "content": "sneaky <|image_pad|> token"}])
    assert "placeholder" in _one_line(exc)


def test_missing_or_corrupt_image_in_messages(builder, tmp_path):
    with pytest.raises(QvlError) as exc:
        builder.build([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "no.png")}]}])
    assert _one_line(exc).startswith("cannot read image ")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(QvlError) as exc:
        builder.build([{"role": "user", "content": [{"type": "image", "url": str(bad)}, _text("hi")]}])
    assert _one_line(exc).startswith(f"cannot read image {bad}: ")


def test_video_and_malformed_messages_are_user_errors(builder):
    with pytest.raises(QvlError):
        builder.build([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])
    with pytest.raises(QvlError):
        builder.build([])
    with pytest.raises(QvlError):
        builder.build(["not a dict"])
    with pytest.raises(QvlError):
        builder.build([{"role": "user", "content": [{"type": "image"}]}])


def test_template_raise_exception_is_a_user_error(builder):
    pb = PromptBuilder(builder.tokenizer, "{{ raise_exception('only user turns, please') }}", ImageProcessorConfig())
    with pytest.raises(QvlError, match="only user turns"):
        pb.build([{"role": "user", "content": "x"}])


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys, qvl.runtime.prompt, qvl.runtime.image_preprocess\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
