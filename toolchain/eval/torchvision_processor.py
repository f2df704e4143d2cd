"""The runtime's image preprocessing against transformers' torchvision image processor, on photos.

A published Qwen3-VL checkpoint's preprocessor_config.json names `Qwen2VLImageProcessorFast`; transformers 5.x
loads that name as `Qwen2VLImageProcessor` with the torchvision backend whenever torchvision imports, and as
`Qwen2VLImageProcessorPil` otherwise. The runtime (`runtime/image_preprocess.py`) is bit-exact with the PIL one,
which the eager oracle uses explicitly (`hf_compat.image_only_processor`). This module measures the torchvision
one: the same resize sizes (`smart_resize`, so the same grids and token counts), and pixel values that differ
where torch's antialiased bicubic resize rounds a value to the other neighbouring 8-bit level than Pillow's
(one level = `rescale_factor / image_std` after normalising), plus float32 round-off from its fused
rescale+normalise.

Run it in its own process (`python -m qvl.toolchain.eval.torchvision_processor`): with torchvision importable,
transformers picks torchvision backends everywhere in that process, and the test suite's oracle must not change.

torchvision on the CPU torch wheel: PyPI's `torchvision==0.28.0` (the match for torch 2.13.0) is a CUDA build;
its C++ extension links libtorch_cuda.so, which the CPU torch does not have, so it does not load and `import
torchvision` then fails in `_meta_registrations` (`operator torchvision::nms does not exist`). Image transforms
never use those ops (nms, roi_align, ...): `import_torchvision` declares the two op schemas torchvision registers
fake kernels for and imports it; the transforms are torchvision's own Python over torch's own kernels. The CPU
build (`+cpu`, from download.pytorch.org) imports without this.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

_schemas = None  # the torch.library.Library that declares the missing ops (kept alive)


def import_torchvision():
    """Import torchvision; returns (module, how): how = "extension loaded" or "extension missing: ops declared"."""
    global _schemas
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchvision is not installed")
    import torch

    loaded = False
    for ext in sorted(Path(spec.origin).parent.glob("_C*")):  # what torchvision.extension loads
        try:
            torch.ops.load_library(str(ext))
            loaded = True
        except (OSError, ImportError, RuntimeError):
            pass
    if not loaded and _schemas is None:
        _schemas = torch.library.Library("torchvision", "DEF")
        _schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision, "extension loaded" if loaded else "extension missing: ops declared"


def torchvision_processor(config: dict):
    """transformers' Qwen2VLImageProcessor (torchvision backend) for a preprocessor_config.json dict."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(**copy.deepcopy(config))


def compare(ours: np.ndarray, theirs: np.ndarray, config: dict) -> dict:
    """How far the runtime's pixel values are from the torchvision processor's."""
    step = float(config.get("rescale_factor", 1 / 255)) / float(np.min(config.get("image_std", [1.0])))
    d = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    off_a_level = d > step / 2  # the two resizes rounded to different 8-bit levels
    return {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "levels_max": float(d.max() / step),  # in 8-bit levels
        "fraction_off_by_a_level": float(off_a_level.mean()),
        "fraction_roundoff_only": float(((d > 0) & ~off_a_level).mean()),
        "max_roundoff": float(d[~off_a_level].max()) if (~off_a_level).any() else 0.0,
        "one_level": step,
    }


def torchvision_outputs(photos: dict[str, str], configs: dict[str, dict]) -> dict[str, np.ndarray]:
    """{f"{config}/{photo}/pixel_values" | "/image_grid_thw": array} from the torchvision processor; images are
    opened with the runtime's `load_image` (EXIF orientation applied), as the runtime opens them."""
    from qvl.runtime.image_preprocess import load_image

    out = {}
    for cname, cfg in configs.items():
        proc = torchvision_processor(cfg)
        for pname, path in photos.items():
            res = proc(images=[load_image(path)], return_tensors="np")
            out[f"{cname}/{pname}/pixel_values"] = np.asarray(res["pixel_values"], dtype=np.float32)
            out[f"{cname}/{pname}/image_grid_thw"] = np.asarray(res["image_grid_thw"], dtype=np.int64)
    return out


def measure(photos: dict[str, str], configs: dict[str, dict]) -> list[dict]:
    """One record per (config, photo): grids equal, sizes, and `compare` against the torchvision processor and
    the PIL processor (bit-exact expected)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qvl.runtime.image_preprocess import ImageProcessorConfig, load_image, preprocess_images

    tv = torchvision_outputs(photos, configs)
    records = []
    for cname, cfg in configs.items():
        pil = Qwen2VLImageProcessorPil(**copy.deepcopy(cfg))
        for pname, path in photos.items():
            image = load_image(path)
            pv, grid = preprocess_images([image], ImageProcessorConfig.from_dict(cfg))
            ref = pil(images=[image], return_tensors="np")
            theirs, their_grid = tv[f"{cname}/{pname}/pixel_values"], tv[f"{cname}/{pname}/image_grid_thw"]
            with Image.open(path) as f:
                size = list(f.size)
            records.append({
                "config": cname, "photo": pname, "size": size, "grid": grid.tolist(),
                "grid_equal_torchvision": bool(np.array_equal(grid, their_grid)),
                "bit_exact_pil": bool(np.array_equal(pv, ref["pixel_values"])),
                "values": int(pv.size),
                **(compare(pv, theirs, cfg) if pv.shape == theirs.shape else {"shape_differs": True}),
            })
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--request", type=Path, required=True,
                    help='JSON {"photos": {name: path}, "configs": {name: preprocessor_config dict}}')
    ap.add_argument("--npz", type=Path, help="write the torchvision processor's outputs here")
    ap.add_argument("--json", type=Path, help="write the measurement records here")
    args = ap.parse_args(argv)
    try:
        torchvision, how = import_torchvision()
    except ModuleNotFoundError as e:
        print(f"skip: {e}", file=sys.stderr)
        return 3
    req = json.loads(args.request.read_text())
    if args.npz:
        np.savez(args.npz, **torchvision_outputs(req["photos"], req["configs"]))
    import torch
    import transformers

    info = {"torchvision": torchvision.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torchvision_import": how}
    if args.json:
        args.json.write_text(json.dumps({**info, "records": measure(req["photos"], req["configs"])}, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
