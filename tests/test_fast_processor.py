"""The runtime's preprocessing against the processor a published checkpoint names: `Qwen2VLImageProcessorFast`
(transformers' torchvision backend), on a real photo and versions of it.

The runtime is bit-exact with transformers' PIL processor (tests/test_image_preprocess.py; the eager oracle uses
that one). Against the torchvision one it must give the same grids (same token counts, same prompt) and pixel
values at most one 8-bit level apart (the two bicubic resizes round some values to the other neighbour).

Needs torchvision, which the default environment does not have (PyPI's wheel is a CUDA build that does not
import beside the CPU torch; `toolchain/eval/torchvision_processor.py` says how it is made to): point
`QVL_TORCHVISION_PATH` at a directory holding it, e.g.
`pip install --no-deps --target /tmp/tv torchvision==0.28.0 && QVL_TORCHVISION_PATH=/tmp/tv pytest tests/test_fast_processor.py`.
The processor runs in a subprocess, so transformers in this process never switches to torchvision backends.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.runtime.image_preprocess import ImageProcessorConfig, load_image, preprocess_images
from qvl.toolchain.checkpoints.presets import PRESETS
from qvl.toolchain.eval.torchvision_processor import compare

CONFIGS = {"tiny": copy.deepcopy(PRESETS["tiny"].preprocessor), "2b": copy.deepcopy(PRESETS["2b"].preprocessor)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    """Grace Hopper's portrait (matplotlib's sample data: a real 512x600 JPEG photo) and versions of it: a
    smaller one, a wide crop, a 3x enlargement (downscaled again by the tiny config) and a grey one."""
    cbook = pytest.importorskip("matplotlib.cbook")
    src = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    d = tmp_path_factory.mktemp("photos")
    out = {"grace_hopper.jpg": str(src)}
    with Image.open(src) as im:
        im = im.convert("RGB")
        variants = {"half.png": im.resize((256, 300), Image.Resampling.LANCZOS),
                    "wide_crop.png": im.crop((0, 150, 512, 350)),
                    "x3.png": im.resize((1536, 1800), Image.Resampling.BICUBIC),
                    "grey.png": im.convert("L")}
    for name, image in variants.items():
        image.save(d / name)
        out[name] = str(d / name)
    return out


@pytest.fixture(scope="module")
def torchvision_outputs(photos, tmp_path_factory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("tv")
    (d / "request.json").write_text(json.dumps({"photos": photos, "configs": CONFIGS}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = os.environ.get("QVL_TORCHVISION_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "qvl.toolchain.eval.torchvision_processor", "--request",
                           str(d / "request.json"), "--npz", str(d / "tv.npz")],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode == 3:
        pytest.skip("torchvision is not importable (set QVL_TORCHVISION_PATH; see the module docstring)")
    assert proc.returncode == 0, proc.stderr
    with np.load(d / "tv.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("config", CONFIGS)
def test_runtime_matches_the_torchvision_processor_within_one_level(torchvision_outputs, photos, config):
    cfg = CONFIGS[config]
    one_level = cfg.get("rescale_factor", 1 / 255) / min(cfg["image_std"])
    for name, path in photos.items():
        pv, grid = preprocess_images([load_image(path)], ImageProcessorConfig.from_dict(cfg))
        theirs = torchvision_outputs[f"{config}/{name}/pixel_values"]
        assert np.array_equal(grid, torchvision_outputs[f"{config}/{name}/image_grid_thw"]), name
        assert pv.shape == theirs.shape, name
        stats = compare(pv, theirs, cfg)
        # never more than one 8-bit level, plus float32 round-off of the normalisation
        assert stats["max_abs_diff"] <= one_level + 1e-6, (name, stats)
        assert stats["max_roundoff"] <= 1e-6, (name, stats)
        # the same bicubic filter in both: only values near a rounding boundary land on the other level
        assert stats["fraction_off_by_a_level"] < 0.01, (name, stats)
