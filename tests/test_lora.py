"""`compile SRC --lora DIR [--lora-scale S]`: PEFT LoRA adapters merged before export (toolchain/export/lora.py).

The adapters are made by PEFT itself on the tiny checkpoint (text and vision linears, several ranks, random
non-zero lora_B so they change the model); the artifact is compiled through the console script and checked by
`parity` against eager transformers with the adapter applied through PEFT (`PeftModel` + `merge_and_unload`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli

MIXED = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "qkv", "linear_fc1"],
             rank_pattern={"v_proj": 2, "qkv": 8}, alpha_pattern={"linear_fc1": 3})
RSLORA = dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "down_proj", "linear_fc2"])


def _peft_adapter(checkpoint: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A LoRA adapter saved by PEFT itself; PEFT initialises lora_B to zero (no effect), so B is set at random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    mixed = _peft_adapter(tiny_checkpoint, root / "mixed", 0, **MIXED)
    return {
        "mixed": mixed,
        "other": _edited(mixed, root / "other", tensors=lambda t: {k: 2 * v for k, v in t.items()}),  # other weights
        "rslora": _peft_adapter(tiny_checkpoint, root / "rslora", 2, **RSLORA),
    }


@pytest.fixture(scope="module")
def lora_artifact(tiny_checkpoint, adapters, tmp_path_factory):
    """`compile CK --target cpu --lora mixed` through the console script: (artifact, the process)."""
    out = tmp_path_factory.mktemp("lora-art") / "art"
    proc = run_cli("compile", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--lora", str(adapters["mixed"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _base_state(checkpoint: Path):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


# -- compile, manifest, parity ----------------------------------------------------------------------------------


def test_compile_records_adapter_in_manifest(lora_artifact, adapters):
    import blake3

    from qvl.artifacts.manifest import read_manifest

    art, proc = lora_artifact
    assert "LoRA adapter mixed:" in proc.stderr
    a = read_manifest(art).adapter
    assert a is not None and a.kind == "lora" and a.name == "mixed" and a.scale == 1.0
    assert Path(a.path) == adapters["mixed"].absolute()
    files = {n: blake3.blake3((adapters["mixed"] / n).read_bytes()).hexdigest()
             for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert {n: f["blake3"] for n, f in a.files.items()} == files
    from qvl.toolchain.export.lora import adapter_digest

    assert a.digest == adapter_digest(a.files)
    assert list(a.ranks) == [2, 4, 8]  # r, and the rank_pattern's v_proj 2 / qkv 8
    cfg = json.loads((adapters["mixed"] / "adapter_config.json").read_text())
    assert sorted(a.target_modules) == sorted(cfg["target_modules"])
    n_text_layers, depth = 4, 6  # the tiny preset
    # q/v/o/gate in every text layer; qkv in every vision block; linear_fc1 in every block, the merger and deepstack mergers
    assert a.modules["text"] == 4 * n_text_layers and a.modules["vision"] >= 2 * depth
    export_step = next(s for s in read_manifest(art).steps if s["name"] == "export")
    assert export_step["lora_merge"]["modules"] == dict(a.modules)


def test_parity_applies_adapter_through_peft(lora_artifact, tiny_checkpoint, adapters):
    art, _ = lora_artifact
    proc = run_cli("parity", str(art), "--checkpoint", str(tiny_checkpoint), "--steps", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["source_matches"] is True
    assert report["adapter"]["path"] == str(adapters["mixed"].absolute()) and report["adapter"]["scale"] == 1.0
    assert all(c["vision_max_abs_diff"] is not None for c in report["cases"] if c["name"] != "text-only")


def test_adapter_changes_text_and_vision_outputs(lora_artifact, tiny_checkpoint, tmp_path):
    """Against the base model the LoRA artifact is far outside parity tolerance, in the decoder and the vision tower."""
    from qvl.runtime.model import Model
    from qvl.toolchain.eval.parity import LOGIT_TOL, VISION_TOL, suite_cases, suite_images, vision_diff
    from qvl.toolchain.eval.reference import EagerReference

    art, _ = lora_artifact
    base = EagerReference(tiny_checkpoint, threads=1)
    model = Model(art, device="cpu", threads=1)
    cases = dict((name, msgs) for name, msgs, _ in suite_cases(suite_images(tmp_path)))
    ref = base.answer(cases["text-only"], max_new_tokens=1)
    out = list(model.generate_ids(model.prepare(cases["text-only"]), 1, keep_logits=True))
    assert float(np.abs(out[0][1] - ref.step_logits[0]).max()) > 100 * LOGIT_TOL
    prompt = model.prepare(cases["image-square"])
    assert vision_diff(base, model, prompt) > 100 * VISION_TOL


def test_verify_shows_adapter(lora_artifact):
    art, _ = lora_artifact
    proc = run_cli("verify", str(art))
    assert proc.returncode == 0, proc.stderr
    assert "merged LoRA adapter mixed" in proc.stdout and "rank 2/4/8" in proc.stdout


def test_parity_refuses_another_adapter(lora_artifact, tiny_checkpoint, adapters):
    art, _ = lora_artifact
    proc = run_cli("parity", str(art), "--checkpoint", str(tiny_checkpoint), "--lora", str(adapters["other"]))
    assert_one_line_error(proc, "is not the one merged into this artifact")


def test_parity_adapter_resolution(lora_artifact, adapters, tmp_path):
    """The recorded path gone -> ask for --lora; a copy of the same adapter elsewhere is accepted; an artifact
    without an adapter refuses --lora."""
    from qvl.artifacts.manifest import read_manifest
    from qvl.errors import QvlError
    from qvl.toolchain.eval.parity import lora_adapter_of
    from qvl.toolchain.export.lora import adapter_for_artifact

    art, _ = lora_artifact
    section = read_manifest(art, verify_graphs=False).adapter
    copy = shutil.copytree(adapters["mixed"], tmp_path / "copy")
    assert adapter_for_artifact(section, copy).digest == section.digest
    moved = type(section).from_json({**section.to_json(), "path": str(tmp_path / "gone")})
    with pytest.raises(QvlError, match="which is not there"):
        adapter_for_artifact(moved, None)
    plain = tmp_path / "plain"
    plain.mkdir()
    raw = json.loads((art / "manifest.json").read_text())
    raw.pop("adapter")
    (plain / "manifest.json").write_text(json.dumps(raw))
    os.link(art / "weights.bin", plain / "weights.bin")
    assert lora_adapter_of(plain, None) is None
    with pytest.raises(QvlError, match="has no LoRA adapter merged"):
        lora_adapter_of(plain, adapters["mixed"])


def test_manifest_adapter_section_is_validated(lora_artifact):
    from qvl.artifacts.schema import Adapter, Manifest
    from qvl.errors import QvlError

    art, _ = lora_artifact
    raw = json.loads((art / "manifest.json").read_text())
    m = Manifest.from_json(raw)
    assert isinstance(m.adapter, Adapter) and m.to_json() == raw  # round trip, keys and all
    old = {k: v for k, v in raw.items() if k != "adapter"}
    assert Manifest.from_json(old).adapter is None  # manifests written before (or without) --lora
    for key, bad in (("kind", "ia3"), ("digest", "abc"), ("scale", "1"), ("ranks", [0]), ("modules", {"text": -1})):
        with pytest.raises(QvlError, match=f"corrupt manifest.*adapter.{key}"):
            Manifest.from_json({**raw, "adapter": {**raw["adapter"], key: bad}})


# -- the merge itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,scale", [("mixed", 1.0), ("rslora", 0.5)])
def test_merge_equals_peft_merge_and_unload(tiny_checkpoint, adapters, name, scale):
    """qvl's merge (rank / alpha patterns, rsLoRA, --lora-scale) gives PEFT's merged weights, every tensor."""
    from qvl.toolchain.export.lora import LoraAdapter, peft_merged

    adapter = LoraAdapter.load(adapters[name], scale=scale)
    ours = _base_state(tiny_checkpoint)
    adapter.merge_into(ours)
    theirs = peft_merged(_base_state(tiny_checkpoint), adapter)
    base = _base_state(tiny_checkpoint).state_dict()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not bool((a[k] == base[k]).all())]
    assert len(changed) == len(adapter.modules)  # every adapted weight changed, nothing else
    # the same fp32 operations in PEFT's order ((B @ A) * scaling, then W += delta): bit-identical, not just close
    assert [k for k in a if not bool((a[k] == b[k]).all())] == []


def test_merged_model_agrees_with_unmerged_peft_forward(tiny_checkpoint, adapters):
    """The merged weights compute what PEFT's unmerged forward (x W^T + s x A^T B^T) computes, text and vision."""
    import torch
    from peft import PeftModel

    from qvl.toolchain.export.lora import LoraAdapter

    merged = _base_state(tiny_checkpoint)
    LoraAdapter.load(adapters["mixed"]).merge_into(merged)
    unmerged = PeftModel.from_pretrained(_base_state(tiny_checkpoint), str(adapters["mixed"])).eval()
    base = _base_state(tiny_checkpoint)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 12), generator=gen)
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, 3 * 2 * 16 * 16, generator=gen)
    with torch.inference_mode():
        logits = [m(input_ids=ids).logits for m in (merged, unmerged, base)]
        vision = [m.model.visual(pixels, grid_thw=grid).pooler_output
                  for m in (merged, unmerged.base_model.model, base)]
    for ours, peft_out, base_out in (logits, vision):
        # agreement to fp32 rounding, while the adapter moved the outputs far more than that
        gap = float((ours - peft_out).abs().max())
        assert gap <= 1e-4 * float(peft_out.abs().max()), gap
        assert float((base_out - peft_out).abs().max()) > 100 * gap


def test_scale_zero_merge_is_the_base_model(tiny_checkpoint, adapters):
    from qvl.toolchain.export.lora import LoraAdapter

    model = _base_state(tiny_checkpoint)
    LoraAdapter.load(adapters["mixed"], scale=0.0).merge_into(model)
    base = _base_state(tiny_checkpoint).state_dict()
    assert all(bool((t == base[k]).all()) for k, t in model.state_dict().items())


@pytest.mark.slow
def test_scale_zero_artifact_equals_base(tiny_checkpoint, adapters, tmp_path):
    """`compile --lora A --lora-scale 0` answers like the base model (within fp32 parity), and records scale 0."""
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.model import Model
    from qvl.toolchain.eval.parity import LOGIT_TOL, suite_cases, suite_images
    from qvl.toolchain.eval.reference import EagerReference

    out = tmp_path / "art0"
    proc = run_cli("compile", str(tiny_checkpoint), "--target", "cpu", "--out", str(out),
                   "--lora", str(adapters["mixed"]), "--lora-scale", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(out).adapter.scale == 0.0
    base = EagerReference(tiny_checkpoint, threads=1)
    model = Model(out, device="cpu", threads=1)
    for name, messages, _ in suite_cases(suite_images(tmp_path / "img"))[:2]:
        ref = base.answer(messages, max_new_tokens=4)
        got = list(model.generate_ids(model.prepare(messages), 4, keep_logits=True))
        assert [t for t, _ in got] == ref.token_ids
        assert max(float(np.abs(l - r).max()) for (_, l), r in zip(got, ref.step_logits)) <= LOGIT_TOL


# -- bad adapters -----------------------------------------------------------------------------------------------


def _edited(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter `src` with config keys replaced and/or its tensors rewritten by `tensors(dict) -> dict`."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def _wider_b(t: dict) -> dict:
    import torch

    key = next(k for k in sorted(t) if k.endswith("q_proj.lora_B.weight"))
    return {**t, key: torch.zeros(t[key].shape[0] + 8, t[key].shape[1])}


def _bad_pickle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    return dst


def _bad_json(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    return dst


CLI_CASES = {
    "pickle-only": (_bad_pickle, "only pickle adapter weights"),
    "garbled-config": (_bad_json, "cannot parse"),
    "dora": (lambda s, d: _edited(s, d, {"use_dora": True}), "DoRA"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_adapter_is_one_line_error(case, tiny_checkpoint, adapters, tmp_path):
    make, needle = CLI_CASES[case]
    bad = make(adapters["mixed"], tmp_path / "adapter")
    out = tmp_path / "out"
    proc = run_cli("compile", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--lora", str(bad))
    assert_one_line_error(proc, needle)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def _drop_a_b(t: dict) -> dict:
    key = next(k for k in sorted(t) if k.endswith("lora_B.weight"))
    return {k: v for k, v in t.items() if k != key}


def _with_key(suffix: str, shape):
    def add(t: dict) -> dict:
        import torch

        return {**t, f"base_model.model.model.language_model.layers.0.self_attn.q_proj.{suffix}": torch.zeros(shape)}

    return add


def _renamed(t: dict) -> dict:
    return {k.replace("language_model.layers", "layers"): v for k, v in t.items()}  # a Qwen2-VL-style module tree


def _tied_lm_head(t: dict) -> dict:
    import torch

    return {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(151936, 4)}


LIBRARY_CASES = {
    "not-lora": ({"peft_type": "IA3"}, None, "is not a LoRA adapter"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "lora-bias": ({"lora_bias": True}, None, "lora_bias"),
    "pissa": ({"init_lora_weights": "pissa"}, None, "init_lora_weights 'pissa'"),
    "bias-all": ({"bias": "all"}, None, "bias 'all'"),
    "rank-vs-config": ({"r": 5}, None, "but adapter_config.json says 5"),
    "bad-rank-pattern": ({"rank_pattern": {"v_proj": 0}}, None, "rank_pattern must map"),
    "only-lora-A": (None, _drop_a_b, "not both lora_A and lora_B"),
    "dora-magnitude": (None, _with_key("lora_magnitude_vector", (128,)), "DoRA magnitude"),
    "embedding-lora": (None, _with_key("lora_embedding_A", (4, 64)), "embedding LoRA"),
    "conv-shape": (None, _with_key("lora_A.weight", (4, 3, 2, 16, 16)), "only linear-layer LoRA"),
}
# against the checkpoint (meta-device model): module tree, target names, tied lm_head
LIBRARY_CASES.update({
    "other-module-tree": (None, _renamed, "this checkpoint does not have"),
    "shape-mismatch": (None, _wider_b, "does not fit this checkpoint"),
    "target-matches-nothing": ({"target_modules": ["q_proj", "qq_proj"]}, None, "'qq_proj' match nothing"),
    "tied-lm-head": (None, _tied_lm_head, "ties to the embedding table"),
})


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_bad_adapter_refused_before_export(case, tiny_checkpoint, adapters, tmp_path):
    """The rest of the refusals, on the library entry point the CLI calls first (`adapter_option`)."""
    from qvl.errors import QvlError
    from qvl.toolchain.export.lora import adapter_option

    config, tensors, needle = LIBRARY_CASES[case]
    bad = _edited(adapters["mixed"], tmp_path / "adapter", config, tensors)
    with pytest.raises(QvlError) as exc:
        adapter_option(tiny_checkpoint, bad, None)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_lora_option_misuse(lora_artifact, tiny_checkpoint, adapters, tmp_path):
    art, _ = lora_artifact
    out = tmp_path / "out"
    proc = run_cli("compile", str(art), "--out", str(out), "--lora", str(adapters["mixed"]))
    assert_one_line_error(proc, "is an artifact")
    from qvl.errors import QvlError
    from qvl.toolchain.export.lora import adapter_option

    with pytest.raises(QvlError, match="--lora-scale needs --lora"):
        adapter_option(tiny_checkpoint, None, 0.5)
    with pytest.raises(QvlError, match="finite"):
        adapter_option(tiny_checkpoint, adapters["mixed"], float("nan"))
    with pytest.raises(QvlError, match="not found"):
        adapter_option(tiny_checkpoint, tmp_path / "nowhere", None)
    assert not out.exists()
