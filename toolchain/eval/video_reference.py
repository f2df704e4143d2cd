"""transformers' own Qwen3-VL video pipeline for the eager oracle, runnable without torchvision.

transformers' `Qwen3VLVideoProcessor` calls three functions of `torchvision.transforms.v2.functional`:
`resize`, `normalize` and `grayscale_to_rgb`. torchvision does not install beside the CPU torch wheel, so when
it is absent `install_torchvision_functional()` puts a stand-in for exactly those into transformers' modules,
written from torchvision's code for plain CPU tensors (`resize_image`: unchanged size returned as is, uint8
bicubic resized natively by `torch.nn.functional.interpolate(..., align_corners=False, antialias=True)`;
`normalize_image`: float tensors, `sub` then `div_`; `grayscale_to_rgb`: repeat one channel). Everything else --
frame sampling, the video `smart_resize`, the fused rescale/normalize, patchify, the frame timestamps, the
`<|video_pad|>` expansion, tokenization, `mm_token_type_ids` -- is transformers' own code. With torchvision
installed nothing is replaced.

Frames are decoded with transformers' `read_video_pyav` (all frames; the processor samples them from the
metadata exactly as it samples a file it decodes itself).
"""

from __future__ import annotations

import enum
import types
from pathlib import Path
from typing import Any

import numpy as np


def _stand_in_functional():
    import torch
    import torch.nn.functional as F

    class InterpolationMode(enum.Enum):  # torchvision.transforms.InterpolationMode
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        if interpolation not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR) or max_size is not None:
            raise NotImplementedError(f"the torchvision stand-in resizes bilinear/bicubic only, not {interpolation}")
        if image.device.type != "cpu":
            raise NotImplementedError("the torchvision stand-in resizes CPU tensors only")
        shape = image.shape
        channels, old_h, old_w = shape[-3:]
        new_h, new_w = (int(size[0]), int(size[1])) if len(size) == 2 else (int(size[0]),) * 2
        if (new_h, new_w) == (old_h, old_w):
            return image
        dtype = image.dtype
        native_uint8 = interpolation == InterpolationMode.BICUBIC or "AVX2" in torch.backends.cpu.get_cpu_capability()
        need_cast = dtype not in (torch.float32, torch.float64) and not (dtype == torch.uint8 and native_uint8)
        x = image.reshape(-1, channels, old_h, old_w)
        if need_cast:
            x = x.to(torch.float32)
        x = F.interpolate(x, size=[new_h, new_w], mode=interpolation.value, align_corners=False, antialias=antialias)
        if need_cast:
            if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
                x = x.clamp_(min=0, max=255)
            if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
                x = x.round_()
            x = x.to(dtype=dtype)
        return x.reshape(shape[:-3] + (channels, new_h, new_w))

    def normalize(image, mean, std, inplace=False):
        if not image.is_floating_point():
            raise TypeError(f"input tensor should be a float tensor, got {image.dtype}")
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        image = image.sub_(mean) if inplace else image.sub(mean)
        return image.div_(std)

    def grayscale_to_rgb(image):
        if image.shape[-3] >= 3:
            return image
        return image.repeat(*([1] * (image.ndim - 3)), 3, 1, 1)

    return types.SimpleNamespace(InterpolationMode=InterpolationMode, resize=resize, normalize=normalize,
                                 grayscale_to_rgb=grayscale_to_rgb, __name__="torchvision-stand-in")


def install_torchvision_functional() -> bool:
    """Give transformers' video processor the torchvision functions it calls (a stand-in when torchvision is not
    installed). Returns True when the stand-in is in use."""
    import transformers.image_processing_backends as backends
    import transformers.image_utils as image_utils
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return False
    tvf = getattr(backends, "tvF", None)
    if tvf is None or getattr(tvf, "__name__", "") != "torchvision-stand-in":
        tvf = _stand_in_functional()
        backends.tvF = tvf
        video_utils.tvF = tvf
    mode = tvf.InterpolationMode
    # image_utils' PIL -> torchvision mode table (image_processing_backends has None without torchvision)
    mapping = image_utils.pil_torch_interpolation_mapping
    mapping.update({
        PILImageResampling.NEAREST: mode.NEAREST_EXACT, PILImageResampling.BOX: mode.BOX,
        PILImageResampling.BILINEAR: mode.BILINEAR, PILImageResampling.HAMMING: mode.HAMMING,
        PILImageResampling.BICUBIC: mode.BICUBIC, PILImageResampling.LANCZOS: mode.LANCZOS,
    })
    backends.pil_torch_interpolation_mapping = mapping
    return True


def video_processor(checkpoint: Path, **overrides: Any):
    """transformers' `Qwen3VLVideoProcessor` of `checkpoint` (its own config-file order), with `overrides`
    (`max_frames=`, `size=`, ...) applied as `from_pretrained` keyword arguments."""
    install_torchvision_functional()
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor.from_pretrained(str(checkpoint), **overrides)


def read_video(source: str | Path):
    """All frames (uint8 [T, H, W, 3]) and the metadata of a video file, by transformers' `read_video_pyav`."""
    from transformers.video_utils import read_video_pyav

    def every_frame(metadata, **kwargs):
        return np.arange(metadata.total_num_frames, dtype=int)

    return read_video_pyav(str(source), sample_indices_fn=every_frame)


def process_with_videos(processor, checkpoint: Path, text: str, images: list, videos: list[tuple[Any, dict]],
                        return_tensors: str = "pt"):
    """`processor(text=[text], images=..., videos=..., video_metadata=...)` with transformers' video processor
    attached: input_ids, mm_token_type_ids, pixel_values(_videos), *_grid_thw. All videos of one call share one
    set of options (transformers' call keywords apply to every video of the call)."""
    options = [dict(o) for _, o in videos]
    if any(o != options[0] for o in options):
        raise ValueError("the eager reference takes one set of video options per request")
    opts = options[0] if options else {}
    overrides = {}
    if opts.get("max_frames") is not None:
        overrides["max_frames"] = int(opts["max_frames"])  # sample_frames reads self.max_frames
    call = {}
    if opts.get("fps") is not None:
        call["fps"] = float(opts["fps"])
    vp = video_processor(checkpoint, **overrides)
    if opts.get("total_pixels") is not None:
        call["size"] = {"shortest_edge": vp.size["shortest_edge"], "longest_edge": int(opts["total_pixels"])}
    frames, metadata = zip(*(read_video(src) for src, _ in videos))
    saved = getattr(processor, "video_processor", None)
    processor.video_processor = vp
    try:
        return processor(text=[text], images=images or None, videos=list(frames), video_metadata=list(metadata),
                         return_tensors=return_tensors, **call)
    finally:
        if saved is None:
            del processor.video_processor
        else:
            processor.video_processor = saved
