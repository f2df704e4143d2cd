"""A checkpoint directory whose chat-template files disagree: the runtime renders with the same template as
transformers' processor (the eager oracle), token for token, and the artifact keeps and records that choice.

Precedence (transformers 5.x, `ProcessorMixin.get_processor_dict`): processor_config.json's entry, then
chat_template.json, then chat_template.jinja, then (the tokenizer's, where the processor has none)
tokenizer_config.json's entry. Each file here carries a template that writes its own name into the prompt,
so the rendered text says which one won.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.errors import QvlError
from qvl.runtime.chat_template_source import TEMPLATE_FILES, resolve_chat_template
from qvl.runtime.prompt import PromptBuilder
from qvl.toolchain.checkpoints.presets import chat_template
from qvl.toolchain.export.hf_compat import image_only_processor

MESSAGES = [
    {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And its size?"},
]
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "generation_config.json")


def _marked(name: str) -> str:
    """Qwen3-VL's template after a system line naming `name` (literal text: kept by lstrip/trim_blocks)."""
    return f"<|im_start|>system\nTemplate from {name}.<|im_end|>\n" + chat_template()


def _write_sources(d: Path, names=TEMPLATE_FILES) -> None:
    """Every file in `names` holds its own marked template (tokenizer_config.json keeps its other keys)."""
    for name in names:
        template = _marked(name)
        if name == "chat_template.jinja":
            (d / name).write_text(template, encoding="utf-8")
        elif name == "tokenizer_config.json":
            cfg = json.loads((d / name).read_text())
            (d / name).write_text(json.dumps({**cfg, "chat_template": template}, indent=2))
        else:  # processor_config.json, chat_template.json: {"chat_template": ...}
            (d / name).write_text(json.dumps({"chat_template": template}, indent=2))


def _drop(d: Path, name: str) -> None:
    """Take `name`'s template away: delete the file, or (tokenizer_config.json) only its entry."""
    if name == "tokenizer_config.json":
        cfg = json.loads((d / name).read_text())
        cfg.pop("chat_template", None)
        (d / name).write_text(json.dumps(cfg, indent=2))
    else:
        (d / name).unlink()


def _messages(image) -> list:
    msgs = copy.deepcopy(MESSAGES)
    msgs[0]["content"][0]["image"] = image
    return msgs


def _oracle(processor, image):
    """transformers' own processor: the rendered text and the input ids."""
    text = processor.apply_chat_template(_messages(image), tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0]
    return text, ids


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))


@pytest.fixture
def disagreeing(tiny_checkpoint, tmp_path) -> Path:
    """Tokenizer and processor files of the tiny checkpoint, plus four template files that all disagree."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(tiny_checkpoint / name, d / name)
    _write_sources(d)
    return d


def test_each_file_wins_in_turn_and_the_runtime_renders_what_transformers_renders(disagreeing, image):
    d = disagreeing
    for i, winner in enumerate(TEMPLATE_FILES):
        source = resolve_chat_template(d)
        assert source.file == winner and source.shadowed == TEMPLATE_FILES[i + 1:]
        builder = PromptBuilder.from_dir(d)
        assert builder.chat_template_source == winner
        prompt = builder.build(_messages(image))
        text, ids = _oracle(image_only_processor(d), image)
        assert prompt.text == text and f"Template from {winner}." in text  # the winner's template rendered
        for loser in TEMPLATE_FILES:
            if loser != winner:
                assert f"Template from {loser}." not in text
        assert np.array_equal(prompt.input_ids, ids)  # token for token, image placeholders expanded
        _drop(d, winner)
    with pytest.raises(QvlError, match="no chat template"):
        PromptBuilder.from_dir(d)
    with pytest.raises(ValueError, match="chat template"):  # transformers refuses too (tokenizer has none either)
        _oracle(image_only_processor(d), image)


def test_the_tokenizer_alone_would_pick_the_jinja_file_but_prompts_follow_the_processor(disagreeing):
    """Why the oracle asks the processor: AutoTokenizer reads chat_template.jinja (over tokenizer_config.json)
    and ignores chat_template.json, so the tokenizer's and the processor's templates differ here."""
    from transformers import AutoTokenizer

    (disagreeing / "processor_config.json").unlink()
    assert "Template from chat_template.jinja." in AutoTokenizer.from_pretrained(str(disagreeing)).chat_template
    assert resolve_chat_template(disagreeing).file == "chat_template.json"
    assert "Template from chat_template.json." in image_only_processor(disagreeing).chat_template


def test_a_null_legacy_entry_leaves_it_to_the_jinja_file_as_in_transformers(disagreeing, image):
    (disagreeing / "processor_config.json").unlink()
    (disagreeing / "chat_template.json").write_text(json.dumps({"chat_template": None}))
    builder = PromptBuilder.from_dir(disagreeing)
    assert builder.chat_template_source == "chat_template.jinja"
    text, ids = _oracle(image_only_processor(disagreeing), image)
    prompt = builder.build(_messages(image))
    assert prompt.text == text and "Template from chat_template.jinja." in text
    assert np.array_equal(prompt.input_ids, ids)


def test_the_eager_oracle_prompts_like_the_runtime(disagreeing, tiny_checkpoint, image):
    """`EagerReference` (the parity oracle) on the whole checkpoint: same prompt ids, PIL image processor."""
    from qvl.toolchain.eval.reference import EagerReference

    shutil.copy2(tiny_checkpoint / "model.safetensors", disagreeing / "model.safetensors")
    ref = EagerReference(disagreeing)
    assert ref.image_processor_name == "Qwen2VLImageProcessorPil"
    msgs = _messages(image)
    inputs = ref.prepare(msgs)
    prompt = PromptBuilder.from_dir(disagreeing).build(msgs)
    assert np.array_equal(inputs["input_ids"][0].numpy(), prompt.input_ids)
    assert np.array_equal(inputs["pixel_values"].numpy(), prompt.pixel_values)
    assert "Template from processor_config.json." in ref.processor.decode(inputs["input_ids"][0])


# -- artifacts ------------------------------------------------------------------------------------------------


def _rerecord(art: Path, chat_template_file: str | None) -> None:
    """Re-write the manifest over the side files now in `art`, as the exporter records them."""
    from qvl.artifacts.manifest import write_manifest

    fields = json.loads((art / "manifest.json").read_text())
    fields["source"]["chat_template"] = chat_template_file
    write_manifest(art, {k: v for k, v in fields.items() if k not in ("format", "format_version", "created")})


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    return art


def test_export_records_the_winning_file(tiny_artifact, tiny_checkpoint):
    """make-checkpoint writes the template to chat_template.json and tokenizer_config.json, as published
    Qwen3-VL checkpoints do; the processor reads chat_template.json."""
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["source"]["chat_template"] == "chat_template.json"
    assert resolve_chat_template(tiny_checkpoint).shadowed == ("tokenizer_config.json",)
    for name in ("chat_template.json", "tokenizer_config.json"):
        assert name in manifest["side_files"]


def test_an_artifact_with_disagreeing_side_files_prompts_like_the_oracle(artifact_copy, tiny_checkpoint, tmp_path,
                                                                         image):
    from qvl.runtime import load

    _write_sources(artifact_copy)
    _rerecord(artifact_copy, "processor_config.json")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(tiny_checkpoint / name, ckpt / name)
    _write_sources(ckpt)
    model = load(artifact_copy, device="cpu", threads=1)
    assert model.prompts.chat_template_source == "processor_config.json"
    prompt = model.prepare(_messages(image))
    text, ids = _oracle(image_only_processor(ckpt), image)
    assert prompt.text == text and np.array_equal(prompt.input_ids, ids)


def test_the_runtime_uses_the_recorded_file_even_where_the_precedence_differs(artifact_copy, image):
    """An artifact behaves as it was exported: the manifest's `source.chat_template` names the file."""
    from qvl.runtime import load

    _write_sources(artifact_copy, ("chat_template.jinja",))  # chat_template.json (unmarked) outranks it
    _rerecord(artifact_copy, "chat_template.jinja")
    assert resolve_chat_template(artifact_copy).file == "chat_template.json"
    model = load(artifact_copy, device="cpu", threads=1)
    assert model.prompts.chat_template_source == "chat_template.jinja"
    assert "Template from chat_template.jinja." in model.prepare(_messages(image)).text


def test_a_manifest_naming_a_missing_or_foreign_template_file_is_refused(artifact_copy):
    from qvl.artifacts.manifest import read_manifest, write_manifest

    fields = read_manifest(artifact_copy).derive()
    fields["source"]["chat_template"] = "chat_template.jinja"  # not a file of this artifact
    with pytest.raises(QvlError, match="source.chat_template does not name a recorded side file"):
        write_manifest(artifact_copy, fields)


@pytest.mark.slow
def test_export_of_a_disagreeing_checkpoint_answers_like_eager(disagreeing, tiny_checkpoint, tmp_path):
    """The whole way: export records processor_config.json, `run --greedy` answers what `reference` answers."""
    from conftest import run_cli

    shutil.copy2(tiny_checkpoint / "model.safetensors", disagreeing / "model.safetensors")
    art = tmp_path / "art"
    assert run_cli("export", str(disagreeing), "--out", str(art)).returncode == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["source"]["chat_template"] == "processor_config.json"
    assert "processor_config.json" in manifest["side_files"]
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(img)
    common = ("--image", str(img), "--prompt", "What is it?", "--max-new-tokens", "8")
    run = run_cli("run", str(art), *common, "--greedy", "--json", "--device", "cpu")
    ref = run_cli("reference", str(disagreeing), *common, "--json")
    assert run.returncode == 0 and ref.returncode == 0, (run.stderr, ref.stderr)
    ours, eager = json.loads(run.stdout), json.loads(ref.stdout)
    assert ours["prompt_tokens"] == eager["prompt_tokens"] and ours["text"] == eager["text"]
