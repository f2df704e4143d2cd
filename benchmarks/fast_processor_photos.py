"""The runtime's preprocessing vs transformers' torchvision image processor (`Qwen2VLImageProcessorFast`, what
published checkpoints name) and the PIL one (the oracle's), on photos: grids, max / mean |Δ|, how many values
land on another 8-bit level. Writes benchmarks/fast_processor_photos.json.

    pip install --no-deps --target /tmp/tv torchvision==0.28.0     # PyPI's CUDA build; see the module below
    PYTHONPATH=/tmp/tv python benchmarks/fast_processor_photos.py [PHOTO ...] [--out FILE]

Photos: matplotlib's grace_hopper.jpg, its versions from tests/test_fast_processor.py, and any given paths.
The measurement runs in `qvl.toolchain.eval.torchvision_processor` (its docstring: why torchvision needs help
to import beside the CPU torch).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from qvl.toolchain.checkpoints.presets import PRESETS


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("fast_processor_photos.json"))
    args = ap.parse_args()
    from matplotlib import cbook

    src = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        photos = {"grace_hopper.jpg": str(src)}
        with Image.open(src) as im:
            im = im.convert("RGB")
            for name, image in {"grace_hopper_half.png": im.resize((256, 300), Image.Resampling.LANCZOS),
                                "grace_hopper_wide_crop.png": im.crop((0, 150, 512, 350)),
                                "grace_hopper_x3.png": im.resize((1536, 1800), Image.Resampling.BICUBIC),
                                "grace_hopper_grey.png": im.convert("L")}.items():
                image.save(d / name)
                photos[name] = str(d / name)
        photos.update({p.name: str(p) for p in args.photos})
        configs = {"tiny": copy.deepcopy(PRESETS["tiny"].preprocessor), "2b": copy.deepcopy(PRESETS["2b"].preprocessor)}
        (d / "request.json").write_text(json.dumps({"photos": photos, "configs": configs}))
        rc = subprocess.call([sys.executable, "-m", "qvl.toolchain.eval.torchvision_processor",
                              "--request", str(d / "request.json"), "--json", str(args.out)])
    if rc == 0:
        for r in json.loads(args.out.read_text())["records"]:
            print(f"{r['config']:>4} {r['photo']:<28} {str(r['size']):>12} grid {r['grid'][0]} "
                  f"grid equal {r['grid_equal_torchvision']} PIL bit-exact {r['bit_exact_pil']} "
                  f"max|Δ| {r['max_abs_diff']:.5f} ({r['levels_max']:.2f} levels) "
                  f"off by a level {100 * r['fraction_off_by_a_level']:.3f}% mean|Δ| {r['mean_abs_diff']:.2e}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
