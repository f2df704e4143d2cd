"""Checkpoint presets (issue #18 item 3): the published dense Qwen3-VL 2B / 4B / 8B Instruct configs, and the
variants `make-checkpoint` applies to any preset (`--untied`, `--vocab-size`).

The 4B and 8B configs were written from memory (no network here; `toolchain/checkpoints/presets.py` lists the
fields): what a test can check is that they have exactly the 2B file's structure, differ from it only in the fields
that differ between the published models, and imply the published parameter counts (4.44 B, 8.77 B) for the model
transformers builds from them -- on the meta device, so no multi-GB checkpoint is ever written.
"""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli

# The published sizes (Hugging Face model cards: Qwen3-VL-4B-Instruct 4.44 B, Qwen3-VL-8B-Instruct 8.77 B parameters).
PUBLISHED_BILLIONS = {"4b": 4.44, "8b": 8.77}
# Fields in which the 4B / 8B configs may differ from the 2B one (everything else is the family's shared value).
SIZE_FIELDS = {
    "": {"tie_word_embeddings"},
    "text_config": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "tie_word_embeddings"},
    "vision_config": {"depth", "hidden_size", "intermediate_size", "out_hidden_size", "deepstack_visual_indexes"},
}


def _sections(cfg: dict) -> dict:
    return {"": {k: v for k, v in cfg.items() if not isinstance(v, dict)},
            "text_config": cfg["text_config"], "vision_config": cfg["vision_config"]}


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_published_config_has_the_2b_structure_and_differs_only_in_sizes(size):
    from qvl.toolchain.checkpoints.presets import published_config
    from qvl.toolchain.export.checkpoint_schema import validate_config

    cfg, ref = published_config(size), published_config("2b")
    validate_config(cfg, size)
    assert set(cfg) == set(ref)
    for name, section in _sections(cfg).items():
        base = _sections(ref)[name]
        assert set(section) == set(base), name
        differing = {k for k in section if section[k] != base[k]}
        assert differing <= SIZE_FIELDS[name], (name, differing - SIZE_FIELDS[name])
    assert cfg["text_config"]["rope_scaling"] == ref["text_config"]["rope_scaling"]  # interleaved [24, 20, 20]
    assert cfg["vision_config"]["out_hidden_size"] == cfg["text_config"]["hidden_size"]
    assert cfg["tie_word_embeddings"] == cfg["text_config"]["tie_word_embeddings"] == (size == "4b")


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_preset_parameter_count_on_the_meta_device_is_the_published_size(size):
    """What `make-checkpoint --preset 4b|8b` would write: the tensors of transformers' model built on the meta
    device (tensor_specs is what make_checkpoint plans its shards from), checked against the validator."""
    from qvl.toolchain.checkpoints.presets import PRESETS
    from qvl.toolchain.checkpoints.synthetic import tensor_specs
    from qvl.toolchain.export.checkpoint_tensors import check_tensors, expected_tensors
    from qvl.toolchain.export.safetensors_header import TensorEntry

    preset = PRESETS[size]
    specs = tensor_specs(preset.config)
    n = sum(_numel(shape) for _, shape in specs)
    assert round(n / 1e9, 2) == PUBLISHED_BILLIONS[size], n
    names = {name for name, _ in specs}
    assert ("lm_head.weight" in names) == (not preset.tied)  # a tied checkpoint omits it, like the published ones
    expected = expected_tensors(preset.config)
    assert expected.tied == preset.tied
    check_tensors({name: TensorEntry("BF16", shape, 0, 0) for name, shape in specs}, expected, size)
    assert preset.weight_dtype == "bfloat16" and preset.shard_bytes == 1 << 30  # written shard by shard


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_untied_variant_adds_an_lm_head_of_vocab_by_hidden():
    from qvl.toolchain.checkpoints.presets import PRESETS, variant
    from qvl.toolchain.checkpoints.synthetic import tensor_specs

    tiny = PRESETS["tiny"]
    untied = variant(tiny, untied=True)
    assert untied.config["tie_word_embeddings"] is False and untied.config["text_config"]["tie_word_embeddings"] is False
    assert tiny.config["tie_word_embeddings"] is True  # the preset itself is not modified
    tied_specs, untied_specs = dict(tensor_specs(tiny.config)), dict(tensor_specs(untied.config))
    t = tiny.config["text_config"]
    assert set(untied_specs) - set(tied_specs) == {"lm_head.weight"}
    assert untied_specs["lm_head.weight"] == (t["vocab_size"], t["hidden_size"])


def test_small_vocab_variant_moves_every_token_id_below_the_vocabulary():
    from qvl.toolchain.checkpoints.presets import PRESETS, variant
    from qvl.toolchain.checkpoints.tokenizer_builder import QWEN_ADDED_TOKENS, build_tokenizer

    v = variant(PRESETS["tiny"], vocab_size=96)
    cfg = v.config
    ids = [cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]
    ids += [cfg["text_config"]["bos_token_id"], cfg["text_config"]["eos_token_id"]]
    assert cfg["text_config"]["vocab_size"] == 96 and max(ids) < 96
    assert v.first_special_id + len(QWEN_ADDED_TOKENS) == 96 and v.alphabet is not None
    tok = build_tokenizer(v.learned_vocab, first_special_id=v.first_special_id, alphabet=v.alphabet)
    assert max(tok.get_vocab(with_added_tokens=True).values()) == 95
    assert tok.token_to_id("<|image_pad|>") == cfg["image_token_id"]
    with pytest.raises(ValueError, match="vocab_size must be >= 64"):
        variant(PRESETS["tiny"], vocab_size=40)


def test_make_checkpoint_cli_small_untied_checkpoint_validates(tmp_path):
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint

    out = tmp_path / "ck"
    proc = run_cli("make-checkpoint", "--preset", "tiny", "--untied", "--vocab-size", "96", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    info = validate_checkpoint(out)
    assert "lm_head.weight" in info.tensors and info.tensors["lm_head.weight"].shape == (96, 64)
    assert f"parameters: {info.num_parameters}" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["vocab_size"] == 96


@pytest.mark.parametrize("args, needle", [
    (["--preset", "tiny", "--vocab-size", "10"], "--vocab-size must be at least 64"),
    (["--preset", "sentinel", "--untied"], "do not apply to the sentinel"),
    (["--preset", "16b"], "choose one of: tiny, 2b, 4b, 8b, sentinel"),
])
def test_make_checkpoint_cli_user_errors(args, needle, tmp_path):
    out = tmp_path / "ck"
    assert_one_line_error(run_cli("make-checkpoint", *args, "--out", str(out)), needle)
    assert not out.exists()
