"""Synthetic checkpoints load with transformers exactly like published ones; bad checkpoints fail cleanly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli


def test_tiny_loads_with_transformers_without_missing_keys(tiny_checkpoint):
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(tiny_checkpoint)
    assert cfg.model_type == "qwen3_vl"
    assert cfg.tie_word_embeddings
    ds = cfg.vision_config.deepstack_visual_indexes
    assert all(0 <= i < cfg.vision_config.depth for i in ds)
    assert len(ds) <= cfg.text_config.num_hidden_layers
    rope = cfg.text_config.rope_parameters
    assert sum(rope["mrope_section"]) == cfg.text_config.head_dim // 2 and rope["mrope_interleaved"]
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # tied: the lm_head *is* the embedding
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_tiny_generates_decisively(tiny_checkpoint):
    from qvl.toolchain.eval.reference import EagerReference

    ref = EagerReference(tiny_checkpoint, threads=1)
    res = ref.answer([{"role": "user", "content": [{"type": "text", "text": "Describe the weather today."}]}], 12)
    assert len(res.token_ids) == 12 and len(res.step_logits) == 12
    # decisive: the winning logit leads the runner-up by far more than fp32 engine noise (~1e-4)
    gaps = [np.sort(l)[-1] - np.sort(l)[-2] for l in res.step_logits]
    assert min(gaps) > 1e-2, gaps


def test_tokenizer_special_ids_match_config(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert tok.token_to_id("<|image_pad|>") == cfg["image_token_id"] == 151655
    assert tok.token_to_id("<|video_pad|>") == cfg["video_token_id"] == 151656
    assert tok.token_to_id("<|vision_start|>") == cfg["vision_start_token_id"] == 151652
    assert tok.token_to_id("<|vision_end|>") == cfg["vision_end_token_id"] == 151653
    for t, i in {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}.items():
        assert tok.token_to_id(t) == i
    assert tok.get_vocab_size() <= cfg["text_config"]["vocab_size"]


def test_2b_preset_is_the_published_architecture():
    import torch

    from qvl.toolchain.checkpoints.synthetic import tensor_specs
    from qvl.toolchain.checkpoints.presets import PRESETS

    cfg = PRESETS["2b"].config
    t, v = cfg["text_config"], cfg["vision_config"]
    assert (t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]) == (28, 2048, 16, 8)
    assert (t["head_dim"], t["intermediate_size"], t["vocab_size"]) == (128, 6144, 151936)
    assert t["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert (v["depth"], v["hidden_size"], v["patch_size"], v["spatial_merge_size"]) == (24, 1024, 16, 2)
    assert v["deepstack_visual_indexes"] == [5, 11, 17]
    total = sum(int(torch.Size(s).numel()) for _, s in tensor_specs(cfg))
    assert total == 2_127_532_032


@pytest.fixture
def broken_copy(tiny_checkpoint, tmp_path):
    def make(edit):
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, dst)
        edit(dst)
        return dst

    return make


def test_missing_directory_is_a_one_line_error(tmp_path):
    proc = run_cli("reference", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(proc, "checkpoint directory not found")


def test_wrong_model_type_is_a_one_line_error(broken_copy):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))

    proc = run_cli("reference", str(broken_copy(edit)), "--prompt", "hi")
    assert_one_line_error(proc, "unsupported model_type 'llama'")


def test_missing_safetensors_is_a_one_line_error(broken_copy):
    proc = run_cli("reference", str(broken_copy(lambda d: (d / "model.safetensors").unlink())), "--prompt", "hi")
    assert_one_line_error(proc, "no model.safetensors")


def test_pickle_only_checkpoint_is_refused(broken_copy):
    def edit(d):
        (d / "model.safetensors").rename(d / "pytorch_model.bin")

    proc = run_cli("reference", str(broken_copy(edit)), "--prompt", "hi")
    assert_one_line_error(proc, "pickle", "safetensors only")


def test_truncated_safetensors_is_a_one_line_error(broken_copy):
    def edit(d):
        p = d / "model.safetensors"
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    proc = run_cli("reference", str(broken_copy(edit)), "--prompt", "hi")
    assert_one_line_error(proc, "truncated safetensors")


def test_unreadable_image_is_a_one_line_error(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    proc = run_cli("reference", str(tiny_checkpoint), "--image", str(bad), "--prompt", "hi")
    assert_one_line_error(proc, "cannot read image")


def test_make_checkpoint_unknown_preset(tmp_path):
    proc = run_cli("make-checkpoint", "--preset", "7b", "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "unknown preset")
    assert not (tmp_path / "x").exists()


def test_reference_cli_answers(tiny_checkpoint):
    proc = run_cli("reference", str(tiny_checkpoint), "--prompt", "Hello there", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 5 and out["prompt_tokens"] > 5
