"""qvl.runtime.mrope against transformers' Qwen3-VL (the oracle): rope index, decode positions, cos/sin."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLTextRotaryEmbedding

from qvl.runtime import mrope
from qvl.toolchain.checkpoints.presets import published_2b_config

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
MERGE = 2


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint):
    return AutoConfig.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def config_2b():
    return Qwen3VLConfig(**published_2b_config())


@pytest.fixture(scope="module", params=["tiny", "2b"])
def config(request, tiny_config, config_2b):
    return tiny_config if request.param == "tiny" else config_2b


@pytest.fixture(scope="module")
def meta_model(config):
    with torch.device("meta"):  # no weights are allocated; get_rope_index only needs the config
        return Qwen3VLModel(config)


def build_prompt(segments, seed=0):
    """segments: ("text", n) | ("image", (t,h,w)) | ("video", (t,h,w)). Returns ids, image grids, video grids."""
    rng = np.random.default_rng(seed)
    ids, images, videos = [], [], []
    for kind, arg in segments:
        if kind == "text":
            ids += rng.integers(0, 2000, size=arg).tolist()
        elif kind == "image":
            t, h, w = arg
            ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // MERGE**2) + [VISION_END]
            images.append(list(arg))
        else:  # video: "<t.s seconds>" text, then one vision block per frame (Qwen3-VL chat template)
            t, h, w = arg
            for _ in range(t):
                ids += rng.integers(0, 2000, size=3).tolist()
                ids += [VISION_START] + [VIDEO_PAD] * (h * w // MERGE**2) + [VISION_END]
            videos.append(list(arg))
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(images, dtype=np.int64).reshape(-1, 3) if images else None,
        np.asarray(videos, dtype=np.int64).reshape(-1, 3) if videos else None,
    )


PROMPTS = {
    "single": [("text", 5), ("image", (1, 12, 18)), ("text", 7)],
    "tiny_grid": [("text", 3), ("image", (1, 2, 2)), ("text", 2)],
    "large": [("text", 4), ("image", (1, 64, 48)), ("text", 9)],
    "multi": [
        ("text", 6),
        ("image", (1, 12, 18)),
        ("text", 2),
        ("image", (1, 2, 2)),
        ("image", (1, 64, 48)),
        ("text", 3),
        ("image", (1, 8, 4)),
        ("text", 5),
    ],
    "image_first_and_last": [("image", (1, 6, 10)), ("text", 1), ("image", (1, 10, 6))],
    "text_only": [("text", 11)],
    "video": [("text", 4), ("video", (3, 8, 12)), ("text", 2), ("image", (1, 4, 4)), ("text", 3)],
}


def torch_rope_index(model, ids2d, types2d, images, videos, mask=None):
    pos, deltas = model.get_rope_index(
        torch.from_numpy(ids2d),
        torch.from_numpy(types2d).int(),
        image_grid_thw=None if images is None else torch.from_numpy(images),
        video_grid_thw=None if videos is None else torch.from_numpy(videos),
        attention_mask=None if mask is None else torch.from_numpy(mask),
    )
    return pos.numpy(), deltas.numpy()


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_rope_index_matches_transformers(meta_model, name):
    ids, images, videos = build_prompt(PROMPTS[name])
    types_ = mrope.mm_token_type_ids(ids)
    ref_pos, ref_delta = torch_rope_index(meta_model, ids[None], types_[None], images, videos)

    pos, deltas = mrope.get_rope_index(ids[None], types_[None], images, videos, spatial_merge_size=MERGE)
    assert pos.dtype == np.int64 and pos.shape == (3, 1, len(ids))
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_delta)

    pos1, delta1 = mrope.rope_index(ids, image_grid_thw=images, video_grid_thw=videos, spatial_merge_size=MERGE)
    np.testing.assert_array_equal(pos1, ref_pos)
    assert isinstance(delta1, int) and delta1 == int(ref_delta[0, 0])


def test_rope_delta_single_image_by_hand():
    # 5 text + start + 6*9 pads + end + 7 text: the image spans max(6, 9) = 9 positions instead of 54.
    ids, images, _ = build_prompt(PROMPTS["single"])
    pos, delta = mrope.rope_index(ids, image_grid_thw=images)
    n_pad = 12 * 18 // 4
    assert delta == 9 - n_pad
    assert pos[:, 0, -1].tolist() == [len(ids) - 1 + delta] * 3
    image = pos[:, 0, 6 : 6 + n_pad]
    assert image[0].tolist() == [6] * n_pad  # temporal
    assert image[1].reshape(6, 9)[:, 0].tolist() == list(range(6, 12))  # height rows
    assert image[2].reshape(6, 9)[0].tolist() == list(range(6, 15))  # width columns


def test_rope_index_batched_left_padding(meta_model):
    a, ia, _ = build_prompt(PROMPTS["single"], seed=1)
    b, ib, _ = build_prompt(PROMPTS["multi"], seed=2)
    length = max(len(a), len(b))
    ids = np.zeros((2, length), dtype=np.int64)
    mask = np.zeros((2, length), dtype=np.int64)
    for row, seq in enumerate((a, b)):
        ids[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = 1
    types_ = mrope.mm_token_type_ids(ids)
    grids = np.concatenate([ia, ib])
    ref_pos, ref_delta = torch_rope_index(meta_model, ids, types_, grids, None, mask)
    pos, deltas = mrope.get_rope_index(ids, types_, grids, attention_mask=mask)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_delta)


def test_rope_index_rejects_mismatched_grids():
    ids, images, _ = build_prompt(PROMPTS["multi"])
    with pytest.raises(ValueError):
        mrope.rope_index(ids, image_grid_thw=images[:2])  # too few grids
    with pytest.raises(ValueError):
        mrope.rope_index(ids, image_grid_thw=images[::-1])  # wrong sizes for the groups


class _FakeCache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self, layer_idx=0):
        return self.n


@pytest.mark.parametrize("name", ["single", "multi", "video", "text_only"])
def test_decode_positions_match_compute_3d_position_ids(meta_model, name):
    ids, images, videos = build_prompt(PROMPTS[name])
    types_ = torch.from_numpy(mrope.mm_token_type_ids(ids)[None]).int()
    t_ids = torch.from_numpy(ids[None])
    grids = dict(
        image_grid_thw=None if images is None else torch.from_numpy(images),
        video_grid_thw=None if videos is None else torch.from_numpy(videos),
    )
    if images is None and videos is None:
        grids["image_grid_thw"] = torch.zeros(0, 3, dtype=torch.long)  # force the mrope path
    meta_model.rope_deltas = None
    prefill = meta_model.compute_3d_position_ids(
        input_ids=t_ids, inputs_embeds=torch.empty(1, len(ids), 1), mm_token_type_ids=types_, **grids
    )
    pos, delta = mrope.rope_index(ids, image_grid_thw=images, video_grid_thw=videos)
    np.testing.assert_array_equal(pos, prefill.numpy())
    assert delta == int(meta_model.rope_deltas[0, 0])
    for cache_len, step in [(len(ids), 1), (len(ids) + 1, 1), (len(ids) + 5, 3)]:
        ref = meta_model.compute_3d_position_ids(
            input_ids=t_ids[:, :step],
            inputs_embeds=torch.empty(1, step, 1),
            cache=_FakeCache(cache_len),
            mm_token_type_ids=types_,
            **grids,
        )
        got = mrope.decode_position_ids(cache_len, step, delta)
        assert got.dtype == np.int64 and got.shape == (3, 1, step)
        np.testing.assert_array_equal(got, ref.numpy())
    # generate's own rule (last position + 1) agrees for a text-final prompt
    np.testing.assert_array_equal(mrope.next_position_ids(pos, 3), mrope.decode_position_ids(len(ids), 3, delta))


def test_decode_position_ids_batched():
    got = mrope.decode_position_ids(10, 2, np.array([[-3], [0]]))
    assert got.shape == (3, 2, 2)
    assert got[:, 0].tolist() == [[7, 8]] * 3 and got[:, 1].tolist() == [[10, 11]] * 3


def test_positions_fed_by_generate(tiny_checkpoint):
    """End to end: the 3D positions transformers' generate feeds the decoder, prefill and every decode step."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    ids, images, _ = build_prompt([("text", 4), ("image", (1, 4, 6)), ("text", 3), ("image", (1, 2, 2)), ("text", 2)])
    n_patches = int((images[:, 0] * images[:, 1] * images[:, 2]).sum())
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=torch.from_numpy(ids[None]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                mm_token_type_ids=torch.from_numpy(mrope.mm_token_type_ids(ids)[None]).int(),
                pixel_values=torch.randn(n_patches, 3 * 2 * 16 * 16, generator=gen),
                image_grid_thw=torch.from_numpy(images),
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
            )
    finally:
        handle.remove()
    pos, delta = mrope.rope_index(ids, image_grid_thw=images)
    assert len(seen) == 4
    # generate passes [4, B, L]: row 0 = plain text positions (mask only), rows 1..3 = MRoPE.
    first = seen[0].numpy()
    np.testing.assert_array_equal(first[1:], pos)
    np.testing.assert_array_equal(first[0, 0], np.arange(len(ids)))
    for k, step in enumerate(seen[1:]):
        step = step.numpy()
        np.testing.assert_array_equal(step[1:], mrope.decode_position_ids(len(ids) + k, 1, delta))
        np.testing.assert_array_equal(step[0, 0], [len(ids) + k])


# ---------------------------------------------------------------- cos / sin


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.float32).view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_text_inv_freq_vs_torch(config):
    rot = Qwen3VLTextRotaryEmbedding(config.text_config)  # buffers only, no weights
    head_dim, theta, section, interleaved = mrope.text_rope_parameters(config.text_config.to_dict())
    assert section == list(rot.mrope_section) and interleaved
    ours = mrope.text_inv_freq(head_dim, theta)
    ref = rot.inv_freq.numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # torch's pow is SLEEF (1 ULP); ours is correctly rounded. The 2B config differs in one element.
    assert _ulp_diff(ours, ref) <= 1


def _torch_cos_sin(rot, pos):
    x = torch.empty(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rot(x, torch.from_numpy(pos))
    return cos.numpy(), sin.numpy()


@pytest.mark.parametrize("name", ["multi", "video"])
def test_mrope_cos_sin_matches_rotary_embedding(config, name):
    rot = Qwen3VLTextRotaryEmbedding(config.text_config)
    ids, images, videos = build_prompt(PROMPTS[name])
    pos, delta = mrope.rope_index(ids, image_grid_thw=images, video_grid_thw=videos)
    pos = np.concatenate([pos, mrope.decode_position_ids(len(ids), 4, delta)], axis=-1)
    ref_cos, ref_sin = _torch_cos_sin(rot, pos)
    head_dim, _, section, _ = mrope.text_rope_parameters(config.text_config.to_dict())
    cos, sin = mrope.mrope_cos_sin(pos, rot.inv_freq.numpy(), section)
    assert cos.shape == sin.shape == (1, pos.shape[-1], head_dim) and cos.dtype == sin.dtype == np.float32
    # Same float32 angles; cos/sin themselves are correctly rounded vs SLEEF's 1-ULP results.
    assert _ulp_diff(cos, ref_cos) <= 1 and _ulp_diff(sin, ref_sin) <= 1
    np.testing.assert_allclose(cos, ref_cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, ref_sin, rtol=0, atol=1e-7)


def test_mrope_cos_sin_large_positions_and_batch(config):
    rot = Qwen3VLTextRotaryEmbedding(config.text_config)
    rng = np.random.default_rng(0)
    pos = rng.integers(0, config.text_config.max_position_embeddings, size=(3, 2, 64)).astype(np.int64)
    ref_cos, ref_sin = _torch_cos_sin(rot, pos)
    _, _, section, _ = mrope.text_rope_parameters(config.text_config.to_dict())
    cos, sin = mrope.mrope_cos_sin(pos, rot.inv_freq.numpy(), section)
    assert _ulp_diff(cos, ref_cos) <= 1 and _ulp_diff(sin, ref_sin) <= 1
    # [B, L] positions broadcast to the three axes, like transformers' expand(3, -1, -1)
    cos2, _ = mrope.mrope_cos_sin(pos[0], rot.inv_freq.numpy(), section)
    ref2, _ = _torch_cos_sin(rot, pos[0][None])
    assert _ulp_diff(cos2, ref2) <= 1


def test_mrope_cos_sin_with_numpy_inv_freq_tiny(tiny_config):
    # Where numpy's inv_freq equals torch's (the tiny config), the whole host path needs no torch at all.
    rot = Qwen3VLTextRotaryEmbedding(tiny_config.text_config)
    head_dim, theta, section, _ = mrope.text_rope_parameters(tiny_config.text_config.to_dict())
    inv = mrope.text_inv_freq(head_dim, theta)
    np.testing.assert_array_equal(inv, rot.inv_freq.numpy())
    ids, images, _ = build_prompt(PROMPTS["multi"])
    pos, _ = mrope.rope_index(ids, image_grid_thw=images)
    cos, sin = mrope.mrope_cos_sin(pos, inv, section)
    ref_cos, ref_sin = _torch_cos_sin(rot, pos)
    np.testing.assert_allclose(cos, ref_cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, ref_sin, rtol=0, atol=1e-7)


def test_mrope_cos_sin_chunked_layout_matches_qwen2_vl():
    section = [16, 24, 24]
    inv = mrope.text_inv_freq(128, 1e6)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5000, size=(3, 1, 16)).astype(np.int64)
    freqs = torch.from_numpy(pos)[..., None].float() * torch.from_numpy(inv)
    fake = types.SimpleNamespace(mrope_section=section)
    ref_cos = Qwen2VLRotaryEmbedding.recomposition_frequencies(fake, freqs.cos()).numpy()
    cos, _ = mrope.mrope_cos_sin(pos, inv, section, interleaved=False)
    assert _ulp_diff(cos, ref_cos) <= 1


def test_runtime_mrope_imports_no_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(mrope))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "transformers"}


def test_text_rope_parameters_from_raw_config_json():
    assert mrope.text_rope_parameters(published_2b_config()["text_config"]) == (128, 5000000.0, [24, 20, 20], True)
