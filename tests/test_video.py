"""Video input (runtime/video.py): decoding, sampling, preprocessing, prompt and MRoPE against transformers 5.24's
own Qwen3-VL video pipeline, model-side parity against eager, the CLI contract.

transformers' `Qwen3VLVideoProcessor` needs torchvision for three functions; without it the oracle runs with the
stand-in of `toolchain/eval/video_reference.py` (torchvision's own code for CPU tensors), and everything else in
the comparison is transformers' code. The test videos are encoded here with PyAV (moving coloured squares).
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError
from qvl.runtime.model import Model
from qvl.runtime.mrope import rope_index
from qvl.runtime.sampling import SamplingConfig
from qvl.runtime.video import (VideoProcessorConfig, frame_timestamps, load_video, probe_video, resize_bicubic_aa,
                               sample_frame_indices)
from qvl.toolchain.eval.parity import LOGIT_TOL, VISION_TOL

# The checkpoint's own video processor config (written beside make-checkpoint's files): a pixel budget and a frame
# cap unlike the class defaults and the image config, so reading the wrong file shows.
VIDEO_CONFIG = {
    "size": {"shortest_edge": 4096, "longest_edge": 8 * 160 * 160},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "fps": 2, "min_frames": 4, "max_frames": 24,
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
GREEDY = SamplingConfig(do_sample=False)


def write_video(path: Path, frames: int, fps: int, width: int, height: int, codec: str = "libx264") -> Path:
    """A clip of two squares moving over a blue ramp, encoded with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        xx = np.arange(width)[None, :].repeat(height, 0)
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 2] = xx * 255 // width
            x0, y0 = (i * 5) % (width - 30), (i * 3) % (height - 30)
            img[y0:y0 + 30, x0:x0 + 30] = (230, 40, 40)
            x1 = (width - 40 - x0) % (width - 30)
            img[height - 40:height - 10, x1:x1 + 30] = (40, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("video")
    m = {
        "clip": write_video(d / "clip.mp4", 48, 12, 160, 112),  # 4 s
        "wide": write_video(d / "wide.mp4", 37, 10, 300, 180),  # 3.7 s, odd frame count
        "nocount": write_video(d / "nocount.mkv", 20, 8, 96, 64, codec="libvpx"),  # Matroska: no frame count
        "one": write_video(d / "one.mp4", 1, 10, 64, 64),
    }
    m["corrupt"] = d / "corrupt.mp4"
    m["corrupt"].write_bytes(m["clip"].read_bytes()[:2000])
    m["text"] = d / "notes.mp4"
    m["text"].write_text("not a video\n")
    m["image"] = d / "still.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(m["image"])
    return m


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video-ckpt") / "tiny"
    proc = run_cli("make-checkpoint", "--preset", "tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG, indent=2))
    return out


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video-art") / "tiny-cpu"
    proc = run_cli("compile", str(checkpoint), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def model(artifact) -> Model:
    return Model(artifact, device="cpu", threads=1)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from qvl.toolchain.eval.reference import EagerReference

    return EagerReference(checkpoint, threads=1)


def _video_msg(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


# --- preprocessing against transformers -----------------------------------------------------------


def test_resize_is_bit_equal_to_torch_uint8_antialiased_bicubic():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    for case in range(24):
        h0, w0 = (int(v) for v in rng.integers(6, 260, 2))
        h1, w1 = (int(v) for v in rng.integers(6, 260, 2))
        if case % 4 == 0:
            h1 = h0  # one pass only
        frames = rng.integers(0, 256, (2, h0, w0, 3), dtype=np.uint8)
        if case % 2:
            yy, xx = np.mgrid[0:h0, 0:w0]
            frames[0] = np.stack([xx * 255 // w0, yy * 255 // h0, (xx * yy) % 256], -1)
        expected = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size=[h1, w1],
                                 mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(resize_bicubic_aa(frames, h1, w1), expected, err_msg=f"{(h0, w0)} -> {(h1, w1)}")
    same = rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    assert resize_bicubic_aa(same, 32, 48) is same  # torchvision returns an unchanged size as is


@pytest.mark.parametrize("name, options", [
    ("clip", {}),
    ("wide", {"fps": 3.0}),  # 11 frames: the last one repeated to a temporal pair
    ("clip", {"fps": 7.5, "max_frames": 9}),
    ("wide", {"total_pixels": 300_000}),
])
def test_video_preprocessing_equals_transformers(media, checkpoint, name, options):
    from qvl.toolchain.eval.video_reference import read_video, video_processor

    ours = load_video(media[name], VideoProcessorConfig.from_dir(checkpoint).with_request(**options))
    overrides = {"max_frames": options["max_frames"]} if "max_frames" in options else {}
    processor = video_processor(checkpoint, **overrides)
    call = {"fps": options["fps"]} if "fps" in options else {}
    if "total_pixels" in options:
        call["size"] = {"shortest_edge": processor.size["shortest_edge"], "longest_edge": options["total_pixels"]}
    frames, metadata = read_video(media[name])
    out = processor(videos=[frames], video_metadata=[metadata], return_tensors="pt", return_metadata=True, **call)
    assert ours.grid_thw == tuple(out["video_grid_thw"][0].tolist())
    np.testing.assert_array_equal(ours.pixel_values, out["pixel_values_videos"].numpy())  # bit-equal
    np.testing.assert_array_equal(ours.frame_indices, np.asarray(out["video_metadata"][0].frames_indices))
    assert ours.fps == out["video_metadata"][0].fps


def test_sampling_and_timestamps_follow_transformers():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    cfg = VideoProcessorConfig(fps=2.0, min_frames=4, max_frames=768)
    # 48 frames at 12 fps, 2 fps asked: int(48 / 12 * 2) = 8 frames spread over the whole clip
    np.testing.assert_array_equal(sample_frame_indices(48, 12.0, cfg), np.linspace(0, 47, 8).round().astype(int))
    assert len(sample_frame_indices(10, 30.0, cfg)) == 4  # min_frames
    assert len(sample_frame_indices(3, 30.0, cfg)) == 3  # never more than the video has
    assert len(sample_frame_indices(10_000, 10.0, VideoProcessorConfig(max_frames=24))) == 24
    for indices, fps in (([0, 7, 13, 20, 27, 34, 40, 47], 12.0), ([0, 3, 7, 10, 14], 10.0), ([5, 9], 29.97)):
        theirs = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        assert frame_timestamps(indices, fps, 2) == theirs


def test_prompt_and_inputs_equal_transformers_processor(media, model, reference):
    cases = [
        _video_msg({"type": "video", "video": str(media["clip"])}, {"type": "text", "text": "What moves?"}),
        _video_msg({"type": "image", "image": str(media["image"])},
                   {"type": "video", "video": str(media["wide"]), "fps": 3.0},
                   {"type": "text", "text": "Compare them."}),
    ]
    for messages in cases:
        theirs = reference.prepare(messages)
        ours = model.prepare(messages)
        np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"][0].numpy())
        np.testing.assert_array_equal(ours.mm_token_type_ids, theirs["mm_token_type_ids"][0].numpy())
        np.testing.assert_array_equal(ours.video_grid_thw, theirs["video_grid_thw"].numpy())
        np.testing.assert_array_equal(ours.pixel_values_videos, theirs["pixel_values_videos"].numpy())
        if "pixel_values" in theirs:
            np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"].numpy())
        # the layout transformers (>= 5.25) writes: the template's wrapper collapsed, one timestamped block per group
        text = model.prompts.decode(ours.input_ids, skip_special_tokens=False)
        t = int(ours.video_grid_thw[0, 0])
        stamps = ours.video_timestamps[0]
        assert len(stamps) == t and text.count(" seconds>") == t
        first = f"<{stamps[0]:.1f} seconds><|vision_start|><|video_pad|>"
        assert first in text and f"<{stamps[-1]:.1f} seconds>" in text
        assert f"<|vision_start|>{first}" not in text and text.count("<|vision_start|>") == text.count("<|vision_end|>")


def test_video_config_is_the_checkpoints_and_travels_with_the_artifact(artifact, model):
    from qvl.artifacts.manifest import read_manifest

    assert "video_preprocessor_config.json" in read_manifest(artifact).side_files
    cfg = model.prompts.video_config
    assert (cfg.max_frames, cfg.max_pixels) == (VIDEO_CONFIG["max_frames"], VIDEO_CONFIG["size"]["longest_edge"])


# --- model side against eager ---------------------------------------------------------------------


def test_mrope_positions_equal_get_rope_index(media, model, reference):
    import torch

    messages = _video_msg({"type": "video", "video": str(media["clip"]), "fps": 4.0},
                          {"type": "image", "image": str(media["image"])},
                          {"type": "text", "text": "Which comes first?"})
    p = model.prepare(messages)
    pos, delta = rope_index(p.input_ids, p.mm_token_type_ids, p.image_grid_thw, 2, video_grid_thw=p.video_grid_thw)
    theirs, their_delta = reference.model.model.get_rope_index(
        torch.from_numpy(p.input_ids)[None], torch.from_numpy(p.mm_token_type_ids)[None],
        image_grid_thw=torch.from_numpy(p.image_grid_thw), video_grid_thw=torch.from_numpy(p.video_grid_thw))
    np.testing.assert_array_equal(pos, theirs.numpy())
    assert delta == int(their_delta[0, 0])
    # every frame group starts later in time than the one before (timestamps separate them)
    video = np.flatnonzero(p.input_ids == model.prompts.video_token_id)
    assert np.all(np.diff(pos[0, 0, video]) >= 0) and pos[0, 0, video[-1]] > pos[0, 0, video[0]]


def test_vision_features_of_a_video_equal_eager(media, model, reference):
    import torch

    p = model.prepare(_video_msg({"type": "video", "video": str(media["wide"]), "fps": 3.0}, "hi"))
    embeds, deepstack = model.engine.encode_images(p.pixel_values_videos, p.video_grid_thw)
    with torch.inference_mode():
        out = reference.model.model.get_video_features(torch.from_numpy(p.pixel_values_videos),
                                                        torch.from_numpy(p.video_grid_thw), return_dict=True)
    expected = torch.cat(out.pooler_output).numpy()
    assert embeds.shape == expected.shape == (int(np.prod(p.video_grid_thw[0])) // 4, expected.shape[1])
    assert float(np.abs(embeds - expected).max()) < VISION_TOL
    for ours, theirs in zip(deepstack, out.deepstack_features, strict=True):
        assert float(np.abs(ours - torch.cat(theirs).numpy()).max()) < VISION_TOL


@pytest.mark.parametrize("case", ["video", "image+video"])
def test_generation_matches_eager(media, model, reference, case):
    parts = [{"type": "video", "video": str(media["clip"])}]
    if case == "image+video":
        parts = [{"type": "image", "image": str(media["image"])},
                 {"type": "video", "video": str(media["wide"]), "fps": 3.0}]
    messages = _video_msg(*parts, {"type": "text", "text": "Describe what happens."})
    expected = reference.answer(messages, max_new_tokens=16)
    prompt = model.prepare(messages)
    np.testing.assert_array_equal(prompt.input_ids, expected.prompt_ids)
    steps = list(model.generate_ids(prompt, max_new_tokens=16, sampling=GREEDY, keep_logits=True))
    assert [t for t, _ in steps] == expected.token_ids
    diff = max(float(np.abs(logits - ref).max()) for (_, logits), ref in zip(steps, expected.step_logits, strict=True))
    print(f"{case}: {len(prompt)} prompt tokens, grid {prompt.video_grid_thw.tolist()}, max |logit diff| {diff:.2e}")
    assert diff < LOGIT_TOL


def test_session_reuses_a_videos_prefix_and_features(media, model):
    video = {"type": "video", "video": str(media["clip"])}
    first = _video_msg(video, {"type": "text", "text": "What moves?"})
    session = model.session()
    answer = [t for t, _ in session.generate_ids(model.prepare(first), max_new_tokens=4, sampling=GREEDY)]
    follow = first + [{"role": "assistant", "content": model.prompts.decode(answer)},
                      {"role": "user", "content": [video, {"type": "text", "text": "And now?"}]}]
    from qvl.runtime.model import GenerationStats

    stats = GenerationStats()
    prompt = model.prepare(follow)
    again = [t for t, _ in session.generate_ids(prompt, max_new_tokens=4, sampling=GREEDY, stats=stats)]
    fresh = [t for t, _ in model.generate_ids(prompt, max_new_tokens=4, sampling=GREEDY)]
    assert again == fresh
    assert stats.reused_tokens > 0 and stats.image_cache_hits == 1 and stats.images_encoded == 0
    session.reset()


# --- inputs, limits, errors -----------------------------------------------------------------------


def test_sources_and_containers(media, checkpoint):
    cfg = VideoProcessorConfig.from_dir(checkpoint)
    base = load_video(media["clip"], cfg)
    raw = media["clip"].read_bytes()
    for source in (raw, "data:video/mp4;base64," + base64.b64encode(raw).decode(), f"file://{media['clip']}",
                   {"path": str(media["clip"])}):
        np.testing.assert_array_equal(load_video(source, cfg).pixel_values, base.pixel_values)
    info = probe_video(media["nocount"])  # no frame count in a Matroska header: counted by demuxing
    assert (info.total_num_frames, info.fps, info.width, info.height) == (20, 8.0, 96, 64)
    mkv = load_video(media["nocount"], cfg)
    assert len(mkv.frame_indices) == int(20 / 8 * cfg.fps) and mkv.grid_thw[0] == math.ceil(5 / 2)


def test_block_options_and_video_url(media, model):
    plain = model.prepare(_video_msg({"type": "video", "video": str(media["clip"]), "fps": 4.0}, "x"))
    url = model.prepare(_video_msg({"type": "video_url", "video_url": {"url": str(media["clip"]), "fps": 4.0}}, "x"))
    np.testing.assert_array_equal(plain.input_ids, url.input_ids)
    request = model.prompts.build(_video_msg({"type": "video", "video": str(media["clip"])}, "x"), fps=4.0)
    np.testing.assert_array_equal(request.pixel_values_videos, plain.pixel_values_videos)
    assert plain.video_grid_thw[0, 0] == 8  # 16 frames of 4 s at 4 fps
    capped = model.prompts.build(_video_msg({"type": "video", "video": str(media["clip"]), "max_frames": 6}, "x"),
                                 fps=4.0)
    assert capped.video_grid_thw[0, 0] == 3  # the block's cap wins over the request's rate


def test_limits_and_unreadable_videos_are_qvl_errors(media, model):
    prompts = model.prompts

    def build(block, **kw):
        return prompts.build(_video_msg(block, "x"), **kw)

    clip = {"type": "video", "video": str(media["clip"])}
    tokens = int(np.prod(build(clip).video_grid_thw[0])) // 4
    with pytest.raises(QvlError, match=rf"is {tokens} video tokens .* more than the limit of {tokens - 1} per video") as e:
        build(clip, max_video_tokens=tokens - 1)
    assert "--max-video-tokens" in e.value.hint and "--video-total-pixels" in e.value.hint
    with pytest.raises(QvlError, match="tokens per frame group .* per-call limit of 4"):
        build(clip, max_image_tokens=4)
    with pytest.raises(QvlError, match="needs at least 2"):
        build({"type": "video", "video": str(media["one"])})
    for bad in ("corrupt", "text"):
        with pytest.raises(QvlError, match=f"cannot read video {media[bad]}"):
            build({"type": "video", "video": str(media[bad])})
    with pytest.raises(QvlError, match="no such file"):
        build({"type": "video", "video": str(media["clip"]) + ".missing"})
    with pytest.raises(QvlError, match="fps must be a number > 0"):
        build({**clip, "fps": -1})
    with pytest.raises(QvlError, match="remote URLs"):
        build({"type": "video", "video": "https://example.com/a.mp4"})


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_run_video_answers_without_torch(media, artifact, model):
    # the real entry point, with torch and transformers made unimportable: the video path is torch-free
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'torchvision'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from qvl.cli import main\n"
            "main()\n")
    args = ["run", str(artifact), "--video", str(media["clip"]), "--fps", "3", "--prompt", "What moves?",
            "--max-new-tokens", "4", "--greedy", "--json", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = model.prepare(_video_msg({"type": "video", "video": str(media["clip"]), "fps": 3},
                                        {"type": "text", "text": "What moves?"}))
    assert out["prompt_tokens"] == len(expected) and out["generated_tokens"] == 4


def test_cli_bad_video_input_is_one_error_line(media, artifact):
    proc = run_cli("run", str(artifact), "--video", str(media["corrupt"]), "--prompt", "x", "--device", "cpu")
    assert_one_line_error(proc, f"cannot read video {media['corrupt']}")
    proc = run_cli("run", str(artifact), "--video", str(media["clip"]), "--prompt", "x", "--fps", "0")
    assert_one_line_error(proc, "--fps must be a number > 0")  # refused before the model loads
