"""qvl.runtime.image_preprocess against transformers' Qwen2VLImageProcessorPil (the oracle): bit-exact."""

from __future__ import annotations

import copy
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qvl.errors import QvlError
from qvl.runtime import image_preprocess as ip
from qvl.runtime.image_preprocess import ImageProcessorConfig, load_image, preprocess_images, smart_resize
from qvl.toolchain.checkpoints.presets import PRESETS

hf_ip = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

# Deep copies: transformers' Qwen2VLImageProcessorPil.__init__ writes min/max_pixels into the `size` dict it is given.
CONFIGS = {
    "tiny": copy.deepcopy(PRESETS["tiny"].preprocessor),  # what make-checkpoint writes to preprocessor_config.json
    "2b": copy.deepcopy(PRESETS["2b"].preprocessor),  # published Qwen3-VL-2B values: 65536..16777216, patch 16, mean/std 0.5
}


def _hf_processor(cfg: dict):
    return hf_ip.Qwen2VLImageProcessorPil(**copy.deepcopy(cfg))


def _noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 7 % 256], -1).astype(np.uint8)


def _images() -> dict[str, object]:
    rng = np.random.default_rng(1234)
    palette = Image.fromarray(_noise(rng, 50, 80)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette_trns = palette.copy()
    palette_trns.info["transparency"] = 5
    rgb_trns = Image.fromarray(_noise(rng, 40, 40))
    rgb_trns.info["transparency"] = (10, 20, 30)
    rgba = _noise(rng, 77, 91, 4)
    rgba[:10, :, 3] = 0  # fully transparent rows
    rgba[10:20, :, 3] = 255  # opaque rows
    return {
        "tiny_20x13": Image.fromarray(_noise(rng, 13, 20)),
        "one_pixel": Image.fromarray(_noise(rng, 1, 1)),
        "wide_2000x40": Image.fromarray(_gradient(40, 2000)),
        "tall_30x1500": Image.fromarray(_noise(rng, 1500, 30)),
        "ratio_200": Image.fromarray(_noise(rng, 10, 2000)),  # exactly 200:1 is allowed
        "large_3000x2500": Image.fromarray(_gradient(2500, 3000)),
        "square_224": Image.fromarray(_noise(rng, 224, 224)),
        "odd_517x333": Image.fromarray(_noise(rng, 333, 517)),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "gray_L": Image.fromarray(_noise(rng, 100, 60, 1)[..., 0], "L"),
        "palette_P": palette,
        "palette_P_transparency": palette_trns,
        "rgb_transparency": rgb_trns,
        "LA": Image.fromarray(_noise(rng, 64, 48, 2), "LA"),
        "CMYK": Image.fromarray(_noise(rng, 40, 40, 4), "CMYK"),
        "16bit_I;16": Image.fromarray(rng.integers(0, 65536, (30, 50)).astype(np.uint16)),
        "bilevel_1": Image.fromarray(_noise(rng, 30, 33, 1)[..., 0] > 128),
        "float_F": Image.fromarray(rng.random((31, 29)).astype(np.float32) * 300),
        "array_rgb": _noise(rng, 45, 67, 3),
        "array_rgba": _noise(rng, 45, 67, 4),
        "array_gray_hw1": _noise(rng, 45, 67, 1),
    }


IMAGES = _images()


@pytest.fixture(scope="module")
def oracles():
    return {name: _hf_processor(cfg) for name, cfg in CONFIGS.items()}


# Every image under both configs, except the 3000x2500 one under 2B: it fits 2B's max_pixels unresized
# (29k patches, seconds in the oracle); the tiny config resizes it down, and test_smart_resize covers 2B's downscale.
CASES = [(c, n) for c in CONFIGS for n in IMAGES if not (c == "2b" and n == "large_3000x2500")]


@pytest.mark.parametrize("config,name", CASES)
def test_matches_transformers_bit_exact(oracles, config, name):
    image = IMAGES[name]
    ref = oracles[config](images=[image], return_tensors="np")
    cfg = ImageProcessorConfig.from_dict(CONFIGS[config])
    pixel_values, grid_thw = preprocess_images([image], cfg)
    assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
    assert np.array_equal(grid_thw, ref["image_grid_thw"])
    assert pixel_values.shape == ref["pixel_values"].shape
    assert np.array_equal(pixel_values, ref["pixel_values"])  # bit-exact, no tolerance


@pytest.mark.parametrize(
    "extra",
    [{"do_normalize": False}, {"do_rescale": False}, {"do_rescale": False, "do_normalize": False},
     {"image_mean": 0.5, "image_std": 0.25}, {"resample": 2}, {"rescale_factor": 0.01},
     {"temporal_patch_size": 1, "merge_size": 1}, {"patch_size": 14}],
    ids=str,
)
def test_config_variants_match_transformers(extra):
    d = dict(copy.deepcopy(CONFIGS["tiny"]), **extra)
    images = [IMAGES["odd_517x333"], IMAGES["rgba"]]
    ref = _hf_processor(d)(images=images, return_tensors="np")
    pixel_values, grid_thw = preprocess_images(images, ImageProcessorConfig.from_dict(d))
    assert np.array_equal(grid_thw, ref["image_grid_thw"])
    assert np.array_equal(pixel_values, ref["pixel_values"])


def test_large_image_is_resized_down():
    cfg = ImageProcessorConfig.from_dict(CONFIGS["tiny"])
    _, grid = preprocess_images([IMAGES["large_3000x2500"]], cfg)
    t, gh, gw = grid[0].tolist()
    assert t == 1 and gh * gw * cfg.patch_size**2 <= cfg.max_pixels


def test_several_images_concatenate_in_order(oracles):
    images = [IMAGES["tiny_20x13"], IMAGES["rgba"], IMAGES["odd_517x333"]]
    ref = oracles["tiny"](images=images, return_tensors="np")
    pixel_values, grid_thw = preprocess_images(images, ImageProcessorConfig.from_dict(CONFIGS["tiny"]))
    assert np.array_equal(grid_thw, ref["image_grid_thw"])
    assert np.array_equal(pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("config", list(CONFIGS) + ["defaults"])
def test_smart_resize_matches_transformers(config):
    cfg = ImageProcessorConfig.from_dict(CONFIGS.get(config, {}))
    sizes = [(1, 1), (13, 20), (40, 2000), (1500, 30), (2500, 3000), (4000, 5000), (8192, 8192), (8192, 41),
             (333, 517), (223, 225), (28, 28), (56, 5600), (10000, 100), (7, 1399)]
    for h, w in sizes:
        expected = hf_ip.smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        assert smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels) == expected, (h, w)
    # the 2B config resizes big photos down too
    if config == "2b":
        h, w = smart_resize(4000, 5000, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        assert h * w <= cfg.max_pixels and (h, w) != (4000, 5000)


# Per-request resize bounds (the processor's call arguments). The tiny config's own bounds are 128^2..448^2.
PIXEL_SETTINGS = [
    {"min_pixels": 32 * 32, "max_pixels": 96 * 96},  # both: shrinks the 517x333 image to 4x6 patches
    {"max_pixels": 64 * 64 * 4},  # one bound; the checkpoint's min stays
    {"min_pixels": 300 * 300},  # scales the small images up past the checkpoint's min
    {"max_pixels": 96 * 96},  # below the checkpoint's min_pixels: transformers applies max first, so do we
    {"min_pixels": 448 * 448, "max_pixels": 448 * 448},  # one exact area
]


@pytest.mark.parametrize("form", ["call_kwargs", "size_dict"])
@pytest.mark.parametrize("setting", PIXEL_SETTINGS, ids=str)
def test_per_request_min_max_pixels_match_transformers(oracles, setting, form):
    """`preprocess_images(..., min_pixels=, max_pixels=)` == the processor called with the same per-call settings:
    `min_pixels=` / `max_pixels=` keyword arguments, or `size={"shortest_edge", "longest_edge"}`. Bit-exact."""
    import warnings

    images = [IMAGES["odd_517x333"], IMAGES["tiny_20x13"], IMAGES["wide_2000x40"], IMAGES["rgba"]]
    cfg = ImageProcessorConfig.from_dict(CONFIGS["tiny"])
    if form == "call_kwargs":
        kwargs = dict(setting)
    else:
        kwargs = {"size": {"shortest_edge": setting.get("min_pixels", cfg.min_pixels),
                           "longest_edge": setting.get("max_pixels", cfg.max_pixels)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecates the call kwargs in favour of `size`
        ref = oracles["tiny"](images=images, return_tensors="np", **kwargs)
    pixel_values, grid_thw = preprocess_images(images, cfg, **setting)
    assert np.array_equal(grid_thw, ref["image_grid_thw"])
    assert np.array_equal(pixel_values, ref["pixel_values"])  # bit-exact
    _, default_grid = preprocess_images(images, cfg)
    assert not np.array_equal(grid_thw, default_grid)  # the setting did change the sizes
    # the config form gives the same, and it is what a per-image block option applies
    again, _ = preprocess_images(images, cfg.with_pixels(**setting))
    assert np.array_equal(again, pixel_values)


def test_max_image_tokens_refuses_before_resizing_with_the_numbers():
    cfg = ImageProcessorConfig.from_dict(CONFIGS["2b"])
    photo = Image.new("RGB", (1920, 1080))
    assert ip.image_tokens(photo, cfg) == 2040  # 1920x1088 at patch 16, merge 2: 60 x 34 merged patches
    with pytest.raises(QvlError) as exc:
        preprocess_images([IMAGES["square_224"], photo], cfg, max_image_tokens=2000)
    msg = str(exc.value)
    assert "image 2 (1920x1080, resized to 1920x1088) is 2040 image tokens (8160 patches" in msg
    assert "more than the limit of 2000 per image" in msg and "\n" not in msg
    assert "--max-image-tokens" in exc.value.hint and "max_pixels" in exc.value.hint
    pv, grid = preprocess_images([photo], cfg, max_image_tokens=2040)  # at the limit: fine
    assert grid.tolist() == [[1, 68, 120]]
    # the hint's max_pixels brings it under the limit
    suggested = 2000 * cfg.factor ** 2
    assert ip.image_tokens(photo, cfg.with_pixels(max_pixels=suggested)) <= 2000
    assert ip.DEFAULT_MAX_IMAGE_TOKENS >= 2040  # a 1080p photo passes the default
    for bad in (0, -3, 2.5, True, "12"):
        with pytest.raises(QvlError, match="max_image_tokens must be an integer >= 1"):
            preprocess_images([photo], cfg, max_image_tokens=bad)
    with pytest.raises(QvlError, match=r"min_pixels \(5000\) is larger than max_pixels \(4000\)"):
        cfg.with_pixels(min_pixels=5000, max_pixels=4000)


def test_aspect_ratio_over_200_is_a_user_error():
    with pytest.raises(ValueError):
        hf_ip.smart_resize(10, 2010, 32, 65536, 16777216)  # transformers refuses it too
    with pytest.raises(QvlError, match="aspect ratio") as exc:
        smart_resize(10, 2010, 32, 65536, 16777216)
    assert "\n" not in str(exc.value)
    with pytest.raises(QvlError, match="aspect ratio"):
        preprocess_images([Image.new("RGB", (10, 2010))], ImageProcessorConfig.from_dict(CONFIGS["tiny"]))


def test_config_defaults_and_overrides(tmp_path):
    hf = hf_ip.Qwen2VLImageProcessorPil()
    cfg = ImageProcessorConfig.from_dict({})
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (hf.patch_size, hf.temporal_patch_size, hf.merge_size)
    assert cfg.image_mean == tuple(hf.image_mean) and cfg.image_std == tuple(hf.image_std)
    assert cfg.rescale_factor == hf.rescale_factor and cfg.resample == int(hf.resample)
    assert cfg.do_resize and cfg.do_rescale and cfg.do_normalize and cfg.do_convert_rgb

    # top-level min_pixels / max_pixels override `size`, as in transformers' __init__
    d = dict(CONFIGS["tiny"], min_pixels=1000, max_pixels=50000)
    hf = _hf_processor(d)
    cfg = ImageProcessorConfig.from_dict(d)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge) == (1000, 50000)

    import json

    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(dict(CONFIGS["2b"], image_mean=None)))  # null means "class default"
    cfg = ImageProcessorConfig.from_file(tmp_path)
    assert cfg == ImageProcessorConfig.from_file(path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (65536, 16777216, 16)
    assert cfg.image_mean == ip.OPENAI_CLIP_MEAN and cfg.image_std == (0.5, 0.5, 0.5)
    with pytest.raises(QvlError):
        ImageProcessorConfig.from_file(tmp_path / "missing.json")


# --- files -------------------------------------------------------------------------------------------


def test_image_files_match_transformers_path_loading(tmp_path, oracles):
    """A path through our load_image equals transformers' own path loading (load_image: EXIF transpose)."""
    rng = np.random.default_rng(7)
    png = tmp_path / "photo.png"
    Image.fromarray(_noise(rng, 70, 110)).save(png)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(_gradient(48, 96)).save(jpg, exif=exif.tobytes(), quality=90)

    loaded = load_image(jpg)
    assert loaded.size == (48, 96)  # transposed
    cfg = ImageProcessorConfig.from_dict(CONFIGS["tiny"])
    for path in (png, jpg):
        ref = oracles["tiny"](images=[str(path)], return_tensors="np")  # fetch_images -> transformers load_image
        pixel_values, grid_thw = preprocess_images([path], cfg)
        assert np.array_equal(grid_thw, ref["image_grid_thw"])
        assert np.array_equal(pixel_values, ref["pixel_values"])
        # str, file:// and data: URIs are the same image
        assert np.array_equal(preprocess_images([f"file://{path}"], cfg)[0], pixel_values)
    import base64

    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert np.array_equal(preprocess_images([uri], cfg)[0], preprocess_images([png], cfg)[0])


def _assert_one_line_read_error(exc_info, name):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot read image {name}: "), msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(QvlError) as exc:
        load_image(path)
    _assert_one_line_read_error(exc, path)
    assert "no such file" in str(exc.value)
    with pytest.raises(QvlError) as exc:
        load_image(tmp_path)
    _assert_one_line_read_error(exc, tmp_path)


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(QvlError) as exc:
        load_image(garbage)
    _assert_one_line_read_error(exc, garbage)

    buf = io.BytesIO()
    Image.fromarray(_noise(np.random.default_rng(3), 64, 64)).save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(QvlError) as exc:
        load_image(truncated)
    _assert_one_line_read_error(exc, truncated)

    jpeg = io.BytesIO()
    Image.fromarray(_noise(np.random.default_rng(4), 64, 64)).save(jpeg, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.getvalue()[:200])
    with pytest.raises(QvlError) as exc:
        load_image(cut)
    _assert_one_line_read_error(exc, cut)

    with pytest.raises(QvlError):
        load_image("http://example.com/cat.png")  # no network in the runtime


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; no pixel data (nothing is ever decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(9000, 9000), (20000, 20000)])  # over our cap; the second also trips PIL's bomb check
def test_over_the_pixel_cap_is_rejected_before_decoding(tmp_path, size):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(*size))
    with pytest.raises(QvlError) as exc:
        load_image(path)
    _assert_one_line_read_error(exc, path)


def test_pixel_cap_applies_to_all_inputs(monkeypatch, tmp_path):
    monkeypatch.setattr(ip, "MAX_IMAGE_PIXELS", 1000)
    small, big = Image.new("RGB", (30, 30)), Image.new("RGB", (40, 40))
    cfg = ImageProcessorConfig.from_dict(CONFIGS["tiny"])
    preprocess_images([small], cfg)
    with pytest.raises(QvlError, match="limit"):
        preprocess_images([big], cfg)
    with pytest.raises(QvlError, match="limit"):
        preprocess_images([np.zeros((40, 40, 3), np.uint8)], cfg)
    path = tmp_path / "big.png"
    big.save(path)
    with pytest.raises(QvlError, match="limit"):
        load_image(path)


def test_bad_arrays_are_user_errors():
    cfg = ImageProcessorConfig.from_dict(CONFIGS["tiny"])
    with pytest.raises(QvlError):
        preprocess_images([np.zeros((20, 20, 3), np.float32)], cfg)
    with pytest.raises(QvlError):
        preprocess_images([np.zeros((20, 20, 2), np.uint8)], cfg)
