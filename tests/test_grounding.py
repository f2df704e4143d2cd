"""Grounding answers (runtime/grounding.py): parsing Qwen3-VL's bbox_2d / point_2d, mapping 0..1000 relative
coordinates to the original image's pixels through smart-resize, drawing, and the `run` CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from qvl.errors import QvlError
from qvl.runtime.grounding import (Box, Point, answer_grounding, check_draw_target, draw_grounding, grounding_json,
                                   parse_grounding)
from qvl.runtime.image_preprocess import ImageProcessorConfig, smart_resize

from conftest import assert_one_line_error, run_cli

# --------------------------------------------------------------------------------------------- parsing

FENCED = """Here they are:
```json
[
  {"bbox_2d": [12, 40, 530, 988], "label": "cat"},
  {"bbox_2d": [600, 100, 990, 420], "label": "dog"}
]
```
Two animals."""


def test_fenced_list_with_text_around_it():
    g = parse_grounding(FENCED)
    assert g.boxes == (Box((12.0, 40.0, 530.0, 988.0), "cat"), Box((600.0, 100.0, 990.0, 420.0), "dog"))
    assert g.points == () and g.unparsed == ()


def test_points_and_a_box_and_point_in_one_object():
    g = parse_grounding('[{"point_2d": [250, 750], "label": "eye"}, {"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]')
    assert g.points == (Point((250.0, 750.0), "eye"), Point((2.0, 3.0), None))
    assert g.boxes == (Box((1.0, 2.0, 3.0, 4.0), None),)


def test_truncated_last_object_is_reported_not_raised():
    text = '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 6'
    g = parse_grounding(text)
    assert g.boxes == (Box((10.0, 20.0, 30.0, 40.0), "a"),)
    assert len(g.unparsed) == 1 and g.unparsed[0].startswith(f"truncated object at character {text.rindex('{')}:")
    assert '{"bbox_2d": [50, 6' in g.unparsed[0]


def test_label_cut_off_after_complete_numbers_is_still_truncated():
    # The numbers are there but the object never closed: reported, not guessed.
    g = parse_grounding('{"bbox_2d": [1, 2, 3, 4], "label": "ca')
    assert g.boxes == () and len(g.unparsed) == 1 and "truncated" in g.unparsed[0]


def test_closed_but_not_json_objects_are_read_loosely():
    text = "{'bbox_2d': [5, 6, 7, 8], 'label': 'cup'} and {\"point_2d\": [9, 10], \"label\": \"tip\",} {bbox_2d: [1,2,3,4]}"
    g = parse_grounding(text)
    assert g.boxes == (Box((5.0, 6.0, 7.0, 8.0), "cup"), Box((1.0, 2.0, 3.0, 4.0), None))
    assert g.points == (Point((9.0, 10.0), "tip"),)
    assert g.unparsed == ()


def test_wrong_values_are_reported_with_the_reason():
    g = parse_grounding('[{"bbox_2d": [1, 2, 3], "label": "x"}, {"point_2d": [true, 2]}, {"bbox_2d": "0,0,5,5"},'
                        ' {"point_2d": [NaN, 1]}, {"bbox_2d": [0, 0, 10, 10]}]')
    assert g.boxes == (Box((0.0, 0.0, 10.0, 10.0), None),)
    assert g.unparsed == ("bbox_2d must be 4 numbers, got '[1, 2, 3]'", "point_2d must be 2 numbers, got '[true, 2]'",
                          "bbox_2d must be 4 numbers, got '\"0,0,5,5\"'", "point_2d must be 2 numbers, got '[NaN, 1]'")


def test_nested_objects_and_unrelated_json():
    text = '{"objects": [{"bbox_2d": [1, 1, 2, 2], "label": "a"}], "note": {"text": "x"}} {"answer": 3} {not json}'
    g = parse_grounding(text)
    assert g.boxes == (Box((1.0, 1.0, 2.0, 2.0), "a"),) and g.unparsed == ()


def test_no_grounding():
    for text in ("", "A red circle.", "{}", "[1, 2, 3]", "set {a, b}", "{"):
        g = parse_grounding(text)
        assert not g and g.boxes == () and g.points == () and g.unparsed == ()
        assert grounding_json(g) == {}


def test_unreadable_closed_object_mentioning_a_key():
    g = parse_grounding('{"bbox_2d" = (1, 2, 3, 4)}')
    assert g.boxes == () and len(g.unparsed) == 1 and g.unparsed[0].startswith("unreadable object at character 0")


# --------------------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("size, rel, px", [
    ((1920, 1080), (100, 200, 500, 800), (192, 216, 960, 864)),
    ((1920, 1080), (333, 0, 1000, 1000), (639.36, 0, 1920, 1080)),
    ((300, 1200), (0, 0, 1000, 1000), (0, 0, 300, 1200)),
    ((300, 1200), (125, 333, 875, 667), (37.5, 399.6, 262.5, 800.4)),
    ((20, 20), (250, 250, 750, 750), (5, 5, 15, 15)),
    ((20, 20), (1, 999, 3, 1000), (0.02, 19.98, 0.06, 20)),
])
def test_box_to_original_pixels(size, rel, px):
    assert Box(tuple(map(float, rel))).to_pixels(*size) == pytest.approx(px, abs=1e-9)


def test_clamped_to_the_image_and_corners_ordered():
    assert Box((-10.0, 0.0, 1200.0, 500.0)).to_pixels(1920, 1080) == (0.0, 0.0, 1920.0, 540.0)
    assert Box((800.0, 600.0, 200.0, 100.0)).to_pixels(1000, 500) == (200.0, 50.0, 800.0, 300.0)
    assert Point((1001.0, -3.0)).to_pixels(300, 1200) == (300.0, 0.0)
    assert Point((500.0, 500.0)).to_pixels(20, 20) == (10.0, 10.0)


def _published_2b_pre() -> ImageProcessorConfig:
    from qvl.toolchain.checkpoints.presets import preprocessor_config

    return ImageProcessorConfig.from_dict(preprocessor_config(min_pixels=65536, max_pixels=16777216))


def _sentinel_pre() -> ImageProcessorConfig:
    from qvl.toolchain.eval.sentinel import SENTINEL_DIR

    return ImageProcessorConfig.from_file(SENTINEL_DIR)


@pytest.mark.parametrize("cfg_name", ["2b", "sentinel"])
@pytest.mark.parametrize("width, height", [(1920, 1080), (300, 1200), (20, 20), (1000, 333)])
def test_mapping_goes_exactly_through_the_smart_resized_geometry(cfg_name, width, height):
    """Through the resized image the model saw (its own aspect ratio) and back, axis by axis, is x / 1000 * W."""
    cfg = _published_2b_pre() if cfg_name == "2b" else _sentinel_pre()
    h_bar, w_bar = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    for rel in ((0, 0, 1000, 1000), (123, 456, 789, 987), (1, 499, 999, 501)):
        via_resized = []
        for i, r in enumerate(rel):
            resized, orig = (w_bar, width) if i % 2 == 0 else (h_bar, height)
            u = r / 1000 * resized  # the model's pixel on its input image
            via_resized.append(u * orig / resized)  # PIL's resize stretched this axis by resized / orig
        assert Box(tuple(map(float, rel))).to_pixels(width, height) == pytest.approx(via_resized, abs=0.005)


def test_the_resize_really_changes_the_aspect_ratio_so_one_common_scale_would_be_wrong():
    cfg = _sentinel_pre()
    h_bar, w_bar = smart_resize(1200, 300, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    assert (w_bar, h_bar) == smart_resize(1200, 300, 32, 16384, 32768)[::-1]
    assert abs(w_bar / h_bar - 300 / 1200) > 0.05  # 64x352: 0.18 instead of 0.25
    y = Box((0.0, 0.0, 1000.0, 1000.0)).to_pixels(300, 1200)[3]
    common_scale_y = 1000 / 1000 * h_bar * (300 / w_bar)  # the x scale applied to y: the mistake avoided
    assert y == 1200 and abs(common_scale_y - y) > 100


def test_answer_grounding_keys(tmp_path):
    cfg = _published_2b_pre()
    image = Image.new("RGB", (1920, 1080))
    text = '[{"bbox_2d": [100, 200, 500, 800], "label": "cat"}, {"point_2d": [500, 500], "label": "c"}, {"bbox_2d": [1'
    g, keys = answer_grounding(text, [image], cfg)
    assert keys == {
        "boxes": [{"label": "cat", "bbox_2d": [100, 200, 500, 800], "bbox_px": [192, 216, 960, 864]}],
        "points": [{"label": "c", "point_2d": [500, 500], "point_px": [960, 540]}],
        "grounding_image": {"width": 1920, "height": 1080, "resized_width": 1920, "resized_height": 1088},
        "grounding_unparsed": [g.unparsed[0]],
    }
    # Several images: the answer does not say which one a box is on, so relative coordinates only.
    _, keys = answer_grounding(text, [image, image], cfg)
    assert keys["boxes"] == [{"label": "cat", "bbox_2d": [100, 200, 500, 800]}] and "grounding_image" not in keys
    assert json.loads(json.dumps(keys)) == keys


# --------------------------------------------------------------------------------------------- drawing


def test_draw_writes_the_original_size_with_boxes_points_and_labels(tmp_path):
    original = Image.new("RGB", (300, 1200), (255, 255, 255))
    g = parse_grounding('[{"bbox_2d": [100, 100, 900, 500], "label": "thing"}, {"point_2d": [500, 800], "label": "p"}]')
    out = draw_grounding(original, g, tmp_path / "boxes.png")
    with Image.open(out) as drawn:
        assert drawn.format == "PNG" and drawn.size == (300, 1200)
        rgb = drawn.convert("RGB")
        x1, y1, x2, y2 = g.boxes[0].to_pixels(300, 1200)
        assert rgb.getpixel((int(x2) - 1, int((y1 + y2) / 2))) != (255, 255, 255)  # the right edge
        assert rgb.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2))) == (255, 255, 255)  # inside stays
        px, py = g.points[0].to_pixels(300, 1200)
        assert rgb.getpixel((int(px), int(py))) != (255, 255, 255)
        assert rgb.getpixel((int(x1) + 4, int(y1) + 6)) != (255, 255, 255)  # the label's background
    assert original.getpixel((int(x2) - 1, int((y1 + y2) / 2))) == (255, 255, 255)  # caller's image untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.png"]  # no temporary file left behind


def test_draw_replaces_an_existing_file_and_tiny_images_work(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"old")
    draw_grounding(Image.new("RGB", (20, 20)), parse_grounding('{"bbox_2d": [0, 0, 1000, 1000], "label": "all"}'), target)
    with Image.open(target) as drawn:
        assert drawn.size == (20, 20)


def test_draw_targets_that_are_refused(tmp_path):
    with pytest.raises(QvlError, match="is a directory"):
        check_draw_target(tmp_path)
    with pytest.raises(QvlError, match="does not exist"):
        check_draw_target(tmp_path / "missing" / "o.png")
    with pytest.raises(QvlError, match="extension"):
        check_draw_target(tmp_path / "o.notanimage")
    assert check_draw_target(tmp_path / "o.PNG") == "PNG" and check_draw_target(tmp_path / "o.jpg") == "JPEG"


def test_grounding_never_imports_torch():
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from PIL import Image
from qvl.runtime.grounding import answer_grounding
from qvl.runtime.image_preprocess import ImageProcessorConfig
print(answer_grounding('{"bbox_2d": [0, 0, 500, 500]}', [Image.new('RGB', (8, 8))], ImageProcessorConfig())[1])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'bbox_px': [0, 0, 4, 4]" in proc.stdout


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 300x120 picture stored with EXIF orientation 6: the model (and the drawing) see it as 120x300."""
    from qvl.toolchain.eval.parity import gradient_picture

    path = tmp_path_factory.mktemp("grounding") / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient_picture(300, 120).save(path, exif=exif, quality=95)
    return path


def test_run_json_and_draw_boxes_through_the_cli(tiny_artifact, photo, tmp_path):
    out = tmp_path / "drawn.png"
    proc = run_cli("run", str(tiny_artifact), "--image", str(photo), "--prompt", "Locate the red disc.",
                   "--max-new-tokens", "6", "--json", "--greedy", "--draw-boxes", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    g = parse_grounding(result["text"])
    # The random tiny model does not answer with boxes; the keys are there exactly when its answer has any.
    assert ("boxes" in result) == bool(g.boxes) and ("points" in result) == bool(g.points)
    assert result["generated_tokens"] == 6
    assert f"drew {len(g.boxes)} boxes and {len(g.points)} points on {out}" in proc.stderr
    with Image.open(out) as drawn, Image.open(photo) as src:
        assert drawn.format == "PNG" and drawn.size == (120, 300) == src.size[::-1]  # EXIF orientation applied


def test_run_streaming_draw_boxes_writes_a_jpeg(tiny_artifact, photo, tmp_path):
    out = tmp_path / "drawn.jpg"
    proc = run_cli("run", str(tiny_artifact), "--image", str(photo), "--prompt", "Point at the square.",
                   "--max-new-tokens", "4", "--draw-boxes", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"points on {out}" in proc.stderr
    with Image.open(out) as drawn:
        assert drawn.format == "JPEG" and drawn.size == (120, 300)


@pytest.mark.parametrize("how, needle", [
    ("dir", "is a directory"),
    ("two-images", "--draw-boxes needs exactly one --image, got 2"),
    ("no-image", "--draw-boxes needs exactly one --image, got 0"),
    ("extension", "cannot write images with extension '.txt'"),
])
def test_run_draw_boxes_bad_targets_are_one_line_errors(tiny_artifact, photo, tmp_path, how, needle):
    args = ["run", str(tiny_artifact), "--prompt", "x", "--draw-boxes"]
    if how == "dir":
        args += [str(tmp_path), "--image", str(photo)]
    elif how == "two-images":
        args += [str(tmp_path / "o.png"), "--image", str(photo), "--image", str(photo)]
    elif how == "no-image":
        args += [str(tmp_path / "o.png")]
    else:
        args += [str(tmp_path / "o.txt"), "--image", str(photo)]
    proc = run_cli(*args)
    assert_one_line_error(proc, needle)
    assert list(tmp_path.iterdir()) == []  # nothing written
