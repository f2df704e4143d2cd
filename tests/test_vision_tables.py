"""qvl.runtime.vision_tables against transformers' vision_utils helpers and Qwen3VLVisionModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from qvl.runtime import vision_tables as vt
from qvl.toolchain.checkpoints.presets import published_2b_config

GRIDS = {
    "single": [[1, 12, 18]],
    "tiny": [[1, 2, 2]],
    "large": [[1, 64, 48]],
    "multi": [[1, 12, 18], [1, 2, 2], [1, 64, 48], [1, 8, 4]],
    "video": [[3, 4, 6], [1, 6, 2]],
    "huge_2b": [[1, 96, 130]],  # beyond the 48x48 learned grid in both directions
}


@pytest.fixture(scope="module")
def tiny_vision(tiny_checkpoint):
    return AutoConfig.from_pretrained(tiny_checkpoint).vision_config


@pytest.fixture(scope="module")
def vision_2b():
    return Qwen3VLConfig(**published_2b_config()).vision_config


@pytest.fixture(scope="module", params=["tiny", "2b"])
def vision_config(request, tiny_vision, vision_2b):
    return tiny_vision if request.param == "tiny" else vision_2b


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_position_ids(name):
    grid = np.asarray(GRIDS[name])
    ref = get_vision_position_ids(torch.from_numpy(grid), 2).numpy()
    got = vt.vision_position_ids(grid, 2)
    assert got.dtype == np.int64 and got.shape == (int(grid.prod(1).sum()), 2)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_cu_seqlens_and_segments(name):
    grid = np.asarray(GRIDS[name])
    ref = get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
    got = vt.vision_cu_seqlens(grid)
    assert got.dtype == np.int32 == ref.dtype
    np.testing.assert_array_equal(got, ref)
    seg = vt.vision_segment_ids(grid)
    assert seg.dtype == np.int64 and len(seg) == got[-1]
    for s in range(len(got) - 1):  # segment s covers exactly [cu[s], cu[s+1])
        assert (seg[got[s] : got[s + 1]] == s).all()
    if len(seg) <= 4000:  # the dense N x N mask gets big
        mask = vt.block_diagonal_mask(seg)
        ref_mask = np.zeros_like(mask)
        for s in range(len(got) - 1):
            ref_mask[got[s] : got[s + 1], got[s] : got[s + 1]] = True
        np.testing.assert_array_equal(mask, ref_mask)
    img = vt.vision_image_ids(grid)
    assert np.bincount(img).tolist() == grid.prod(1).tolist()


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("align_corners", [True, False])
def test_interpolation_bit_identical(vision_config, name, align_corners):
    side = int(vision_config.num_position_embeddings**0.5)
    grid = np.asarray(GRIDS[name])
    ref_i, ref_w = get_vision_interpolation_indices_and_weights(
        torch.from_numpy(grid), side, mode="bilinear", align_corners=align_corners, spatial_merge_size=2
    )
    idx, w = vt.vision_interpolation_indices_and_weights(grid, side, 2, align_corners=align_corners)
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == w.shape == (len(ref_i), 4)
    np.testing.assert_array_equal(idx, ref_i.numpy())
    np.testing.assert_array_equal(w.view(np.int32), ref_w.numpy().view(np.int32))  # bit-identical
    assert idx.min() >= 0 and idx.max() < side * side


def test_inv_freq_and_rotary(vision_config):
    rot = Qwen3VLVisionRotaryEmbedding(vision_config)
    head_dim = vt.vision_head_dim(vision_config.to_dict())
    inv = vt.vision_inv_freq(head_dim, vision_config.rope_parameters["rope_theta"])
    np.testing.assert_array_equal(inv, rot.inv_freq.numpy())
    grid = np.asarray(GRIDS["multi"] + GRIDS["video"])
    pos = vt.vision_position_ids(grid, 2)
    with torch.no_grad():
        ref_cos, ref_sin = rot(torch.empty(1), torch.from_numpy(pos))
    cos, sin = vt.vision_rotary_cos_sin(pos, inv)
    assert cos.shape == sin.shape == (len(pos), head_dim) and cos.dtype == np.float32
    # float32 angles are identical; cos/sin within 1 ULP of torch's SLEEF kernels
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-7)


def test_vision_tables_bundle(vision_config):
    grid = np.asarray(GRIDS["multi"])
    tables = vt.vision_tables(grid, vision_config.to_dict())
    n = int(grid.prod(1).sum())
    head_dim = vt.vision_head_dim(vision_config.to_dict())
    assert tables["position_ids"].shape == (n, 2)
    assert tables["cos"].shape == tables["sin"].shape == (n, head_dim)
    assert tables["interp_indices"].shape == tables["interp_weights"].shape == (n, 4)
    assert tables["segment_ids"].shape == (n,)
    assert tables["cu_seqlens"].tolist() == [0, 216, 220, 3292, 3324]
    # a raw config.json dict (no rope_parameters) gives the same tables
    raw = published_2b_config()["vision_config"] if head_dim == 64 else None
    if raw is not None:
        t2 = vt.vision_tables(grid, raw)
        for k in tables:
            np.testing.assert_array_equal(tables[k], t2[k])


def test_vision_model_with_host_tables_is_identical(tiny_vision):
    """Feeding our tables to Qwen3VLVisionModel gives exactly the same output as letting it compute them,
    and the block-diagonal segments mean each image is encoded exactly as on its own."""
    torch.manual_seed(0)
    model = Qwen3VLVisionModel._from_config(tiny_vision, attn_implementation="eager").eval()
    grid = np.asarray([[1, 4, 6], [1, 2, 2], [2, 4, 4]])
    n = int(grid.prod(1).sum())
    x = torch.randn(n, 3 * 2 * 16 * 16)
    g = torch.from_numpy(grid)
    tables = vt.vision_tables(grid, tiny_vision.to_dict())
    with torch.no_grad():
        ref = model(x, g).last_hidden_state
        got = model(
            x,
            g,
            interp_indices=torch.from_numpy(tables["interp_indices"]),
            interp_weights=torch.from_numpy(tables["interp_weights"]),
            position_ids=torch.from_numpy(tables["position_ids"]),
            cu_seqlens=torch.from_numpy(tables["cu_seqlens"]),
        ).last_hidden_state
        assert torch.equal(ref, got)
        # one image alone == its slice of the packed batch (within float tolerance: different matmul shapes)
        offsets = np.concatenate([[0], np.cumsum(grid.prod(1))])
        for i in range(len(grid)):
            alone = model(x[offsets[i] : offsets[i + 1]], g[i : i + 1]).last_hidden_state
            torch.testing.assert_close(alone, ref[offsets[i] : offsets[i + 1]], rtol=1e-5, atol=1e-5)


def test_rejects_bad_grids():
    with pytest.raises(ValueError):
        vt.vision_position_ids([[1, 3, 4]], 2)
    with pytest.raises(ValueError):
        vt.vision_cu_seqlens([[0, 2, 2]])


def test_runtime_vision_tables_imports_no_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(vt))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "transformers"}
