"""The vision encoder per attention segment (image / video frame), unmasked, bounded.

* The claim the design rests on, checked in eager PyTorch: running the tower once per segment and concatenating
  equals transformers' packed forward (merger, every DeepStack merger, video frames of temporal patch 2).
* The exported graph (no `segment_ids`, no mask) run per segment by the runtime == the previous packed graph run
  once with its block-diagonal mask == eager transformers, for one image, two images of different sizes in one
  prompt, and a video grid; and the previous graphs (old artifacts) still load and run, per segment.
* The cpu target's fused vision graph: exactly one MultiHeadAttention per block, none with attention_bias, no
  [N, N] tensor anywhere; ONNX Runtime's CPU MultiHeadAttention without a bias runs its flash kernel (memory).
* The per-image limit (`--max-image-tokens`, `max_image_tokens=`) and per-request `--min-pixels` / `--max-pixels`
  through the real console script and the Python API.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError
from qvl.runtime import vision_tables as vt

# Vision outputs are O(1); eager vs ONNX Runtime differ by float32 summation order only (measured <= 3.1e-6).
TOL_EAGER = 2e-5
# The packed graph and the per-segment graph are the same computation in a different order (measured <= 3e-6).
TOL_FORMS = 2e-5
GRIDS = {
    "one_image": [[1, 10, 10]],
    "two_images_of_different_sizes": [[1, 8, 12], [1, 6, 4]],
    "video_and_image": [[2, 4, 6], [1, 2, 2]],  # 2 frames of temporal patch 2: two attention segments
}


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(
        str(tiny_checkpoint), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def packed_artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported in the previous vision form (all images in one call, `segment_ids` mask)."""
    from qvl.toolchain.export.exporter import export_artifact

    out = tmp_path_factory.mktemp("packed") / "tiny-packed"
    export_artifact(tiny_checkpoint, out, packed_vision=True)
    return out


@pytest.fixture(scope="module")
def packed_cpu_artifact(packed_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("packed-cpu") / "tiny-packed-cpu"
    compile_artifact(packed_artifact, "cpu", out)
    return out


def _eager_vision(eager, pixels: np.ndarray, grid) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = eager.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(np.asarray(grid)))
    return [out.pooler_output.numpy(), *(d.numpy() for d in out.deepstack_features)]


def _pixels(grid, seed=0) -> np.ndarray:
    n = int(np.asarray(grid).prod(1).sum())
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 16 * 16), dtype=np.float32)


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def _packed_single_call(engine, pixels, grid) -> list[np.ndarray]:
    """What the runtime did before: the packed graph once over all patches with per-patch segment ids."""
    t = vt.vision_tables(grid, engine.vision_config)
    return engine.vision.run(None, {
        "pixel_values": pixels, "pos_interp_indices": t["interp_indices"], "pos_interp_weights": t["interp_weights"],
        "rotary_cos": t["cos"], "rotary_sin": t["sin"], "segment_ids": t["segment_ids"]})


# -- the claim, in eager PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_segments_are_independent_in_transformers_vision_tower(eager, name):
    """transformers' packed forward == the unmasked export adapter once per segment (its own tables), concatenated:
    patch embed, position taps, rotary, blocks, the 2x2 merger and every DeepStack merger never mix segments."""
    import torch

    from qvl.toolchain.export.adapters import VisionEncoderAdapter

    grid = GRIDS[name]
    pixels = _pixels(grid, seed=len(name))
    ref = _eager_vision(eager, pixels, grid)
    assert len(ref) == 1 + len(eager.config.vision_config.deepstack_visual_indexes) == 4
    adapter = VisionEncoderAdapter(eager.model.visual).eval()
    names = ["pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin"]

    def run(feeds):
        with torch.inference_mode():
            return [o.numpy() for o in adapter(*(torch.from_numpy(feeds[k]) for k in names))]

    emb, ds = vt.encode_per_segment(run, pixels, grid, eager.config.vision_config.to_dict(), names)
    assert _max_diff([emb, *ds], ref) <= 1e-5
    segments = vt.vision_segments(grid)
    assert len(segments) == int(np.asarray(grid)[:, 0].sum())  # one per image, one per video frame
    assert [s[1] - s[0] for s in segments] == np.diff(vt.vision_cu_seqlens(grid)).tolist()


def test_segment_tables_are_a_lone_images_tables(tiny_checkpoint):
    """Frame f of a t-frame video and any image of the same h x w get the tables of a [1, h, w] image."""
    vision = json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"]
    grid = [[3, 4, 6], [1, 6, 2], [1, 4, 6]]
    packed = vt.vision_tables(grid, vision)
    names = ["pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin", "segment_ids"]
    pixels = _pixels(grid)
    for start, stop, h, w in vt.vision_segments(grid):
        feeds = vt.segment_feeds(pixels, start, stop, h, w, vision, names)
        np.testing.assert_array_equal(feeds["pixel_values"], pixels[start:stop])
        np.testing.assert_array_equal(feeds["pos_interp_indices"], packed["interp_indices"][start:stop])
        np.testing.assert_array_equal(feeds["pos_interp_weights"], packed["interp_weights"][start:stop])
        np.testing.assert_array_equal(feeds["rotary_cos"], packed["cos"][start:stop])
        np.testing.assert_array_equal(feeds["rotary_sin"], packed["sin"][start:stop])
        assert feeds["segment_ids"].tolist() == [0] * (stop - start)  # an old graph's mask: all zeros = none
    assert vt.max_segment_patches(grid) == 24
    with pytest.raises(QvlError, match="input 'extra'"):
        vt.segment_feeds(pixels, 0, 24, 4, 6, vision, ["pixel_values", "extra"])
    with pytest.raises(QvlError, match="pixel-value rows"):
        vt.encode_per_segment(lambda f: [], pixels[:-1], grid, vision, names)


# -- the artifacts: per segment == previous packed graph == eager --------------------------------------------------


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_per_segment_vision_equals_packed_graph_and_eager(tiny_artifact, tiny_cpu_artifact, packed_artifact,
                                                          packed_cpu_artifact, eager, name):
    from qvl.runtime.backends.ort import Engine

    grid = GRIDS[name]
    pixels = _pixels(grid, seed=7)
    ref = _eager_vision(eager, pixels, grid)
    new = Engine(tiny_artifact, threads=1)
    assert new.vision_inputs == ["pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin"]
    got = new.encode_images(pixels, np.asarray(grid))
    got = [got[0], *got[1]]
    assert _max_diff(got, ref) <= TOL_EAGER
    fused = Engine(tiny_cpu_artifact, threads=1).encode_images(pixels, np.asarray(grid))
    assert _max_diff([fused[0], *fused[1]], ref) <= TOL_EAGER
    for art in (packed_artifact, packed_cpu_artifact):
        old = Engine(art, threads=1)
        assert old.vision_inputs[-1] == "segment_ids"  # an old artifact: still loads
        single = _packed_single_call(old, pixels, grid)
        assert _max_diff(single, ref) <= TOL_EAGER
        assert _max_diff(got, single) <= TOL_FORMS  # new export per segment == old export in one masked call
        per_segment = old.encode_images(pixels, np.asarray(grid))  # what the runtime does with it now
        assert _max_diff([per_segment[0], *per_segment[1]], single) <= TOL_FORMS


def test_two_images_of_different_sizes_in_one_prompt(tiny_cpu_artifact, packed_cpu_artifact, eager, tmp_path):
    """Through prompt building: the parity suite's 224x224 and 480x120 images in one prompt; vision features vs eager and vs the
    previous packed artifact, and the same greedy answer from both artifacts."""
    from qvl.runtime.model import Model
    from qvl.toolchain.eval.parity import suite_images

    images = suite_images(tmp_path / "images")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(images["square"])},
                                             {"type": "image", "image": str(images["wide"])},
                                             {"type": "text", "text": "Compare the two images."}]}]
    new, old = Model(tiny_cpu_artifact, threads=1), Model(packed_cpu_artifact, threads=1)
    prompt = new.prepare(messages)
    grid = prompt.image_grid_thw
    assert len(grid) == 2 and grid[0].tolist() != grid[1].tolist()
    ref = _eager_vision(eager, prompt.pixel_values, grid)
    emb, ds = new.engine.encode_images(prompt.pixel_values, grid)
    assert _max_diff([emb, *ds], ref) <= TOL_EAGER
    single = _packed_single_call(old.engine, prompt.pixel_values, grid)
    assert _max_diff([emb, *ds], single) <= TOL_FORMS
    tokens = [[t for t, _ in m.generate_ids(m.prepare(messages), 12)] for m in (new, old)]
    assert tokens[0] == tokens[1]


# -- the fused graph ---------------------------------------------------------------------------------------------


FUSED_VISION_OPS = {  # the tiny export (depth 6, 3 DeepStack mergers) after the cpu target's fusion stage
    "Slice": 42, "Reshape": 39, "Gemm": 32, "Mul": 25, "Squeeze": 18, "SkipLayerNormalization": 13, "Neg": 12,
    "Concat": 12, "Add": 12, "Constant": 12, "Gelu": 10, "Transpose": 6, "MultiHeadAttention": 6, "Unsqueeze": 3,
    "LayerNormalization": 3, "Conv": 1, "Gather": 1, "ReduceSum": 1,
}


def _patch_square_values(model: onnx.ModelProto) -> list[str]:
    """Names of values whose shape ends in [patches, patches] (what a mask or dense scores would be)."""
    patches = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert patches, "pixel_values' patch axis must be symbolic"
    out = []
    for vi in [*model.graph.value_info, *model.graph.output]:
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 2 and dims[-1] == dims[-2] == patches:
            out.append(vi.name)
    return out


def test_fused_vision_graph_has_one_unbiased_multi_head_attention_per_block(tiny_cpu_artifact, packed_cpu_artifact):
    manifest = json.loads((tiny_cpu_artifact / "manifest.json").read_text())
    depth = manifest["source"]["config"]["vision_config"]["depth"]
    assert [i["name"] for i in manifest["graphs"]["vision"]["inputs"]] == [
        "pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin"]
    for file in ("vision.onnx", "vision.ort.onnx"):  # the plain graph and ORT's saved optimized one
        model = onnx.load(str(tiny_cpu_artifact / file), load_external_data=False)
        ops = collections.Counter(n.op_type for n in model.graph.node)
        mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == depth and all(n.domain == "com.microsoft" for n in mha), file
        assert all(len(n.input) == 3 for n in mha), file  # q, k, v: no key_padding_mask, no attention_bias
        assert not {"Softmax", "Equal", "Not", "Where", "Expand"} & set(ops), file
        if file == "vision.onnx":
            assert dict(ops) == FUSED_VISION_OPS
            assert model.graph.value_info, "the exporter's shapes are kept, so the [N, N] check below is real"
        assert _patch_square_values(model) == [], file
    # the previous packed export, compiled: the mask is there, as [N, N] and as every block's attention_bias
    old = onnx.load(str(packed_cpu_artifact / "vision.onnx"), load_external_data=False)
    old_mha = [n for n in old.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(old_mha) == depth and all(len(n.input) == 6 and n.input[5] for n in old_mha)
    assert _patch_square_values(old)


_MHA_MEMORY = textwrap.dedent("""
    import sys
    import numpy as np, onnx, onnxruntime as ort
    from onnx import helper, TensorProto as T
    S, H, Dh = 2048, 16, 64
    bias = sys.argv[1] == "bias"
    ins = [helper.make_tensor_value_info(n, T.FLOAT, [1, S, H * Dh]) for n in "qkv"]
    node_in = ["q", "k", "v"]
    if bias:
        ins.append(helper.make_tensor_value_info("b", T.FLOAT, [1, 1, S, S]))
        node_in += ["", "", "b"]
    node = helper.make_node("MultiHeadAttention", node_in, ["o"], domain="com.microsoft", num_heads=H)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("o", T.FLOAT, [1, S, H * Dh])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {c: rng.standard_normal((1, S, H * Dh), dtype=np.float32) for c in "qkv"}
    if bias:
        feeds["b"] = np.zeros((1, 1, S, S), np.float32)
    def peak_kib():  # this process's high-water RSS (ru_maxrss would start at the forking parent's)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    base = peak_kib()
    sess.run(None, feeds)
    print((peak_kib() - base) / 1024)
""")


def test_onnxruntime_cpu_multi_head_attention_without_bias_runs_flash_attention():
    """The kernel claim, measured: ORT's CPU MultiHeadAttention without attention_bias takes `MlasFlashAttention`
    (its `disable_flash_` switch is the ORT_DISABLE_FLASH_ATTENTION variable): run growth ~ Q/K/V-sized, while
    the same node with a bias, or with flash disabled, materialises [1, H, S, S] scores (16 x 2048^2 x 4 B = 256 MiB)."""
    def growth(arg, **env):
        import os

        proc = subprocess.run([sys.executable, "-c", _MHA_MEMORY, arg], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.strip().splitlines()[-1])

    flash = growth("none")
    unfused = growth("none", ORT_DISABLE_FLASH_ATTENTION="1")
    biased = growth("bias")
    scores_mib = 16 * 2048 * 2048 * 4 / 2**20
    print(f"\nMHA S=2048 H=16 run growth: no bias {flash:.0f} MiB, flash disabled {unfused:.0f} MiB, "
          f"with attention_bias {biased:.0f} MiB")
    assert flash < scores_mib / 4 < scores_mib <= min(unfused, biased)


# -- the limit and the resize bounds ------------------------------------------------------------------------------


def _photo(path, size=(800, 600)):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_image_token_limit_through_the_console_script(tiny_cpu_artifact, tmp_path):
    photo = _photo(tmp_path / "photo.png")  # the tiny preprocessor resizes 800x600 to 512x384: 192 tokens
    base = ("run", str(tiny_cpu_artifact), "--image", str(photo), "--prompt", "hi", "--device", "cpu",
            "--max-new-tokens", "2", "--threads", "1", "--greedy")
    proc = run_cli(*base, "--max-image-tokens", "50")
    assert_one_line_error(proc, "image 1 (800x600, resized to 512x384) is 192 image tokens (768 patches",
                          "more than the limit of 50 per image", "hint:", "--max-image-tokens", "--max-pixels")
    assert proc.stdout == ""
    # the hint's remedy works: shrink with --max-pixels (or raise the limit)
    ok = run_cli(*base, "--max-image-tokens", "50", "--max-pixels", "51200", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["generated_tokens"] == 2
    assert run_cli(*base, "--max-image-tokens", "192", "--json").returncode == 0
    for flags, needle in ((("--max-image-tokens", "0"), "--max-image-tokens must be an integer >= 1, got 0"),
                          (("--min-pixels", "-5"), "--min-pixels must be an integer >= 1, got -5"),
                          (("--min-pixels", "5000", "--max-pixels", "4000"),
                           "--min-pixels (5000) is larger than --max-pixels (4000)")):
        assert_one_line_error(run_cli(*base, *flags), needle)


def test_chat_reports_the_limit_and_keeps_the_session(tiny_cpu_artifact, tmp_path):
    import os

    photo = _photo(tmp_path / "photo.png")
    stdin = f"/image {photo}\ndescribe\nhello\n"
    proc = subprocess.run([sys.executable, "-c", "from qvl.cli import main; main()", "chat", str(tiny_cpu_artifact),
                           "--device", "cpu", "--max-new-tokens", "2", "--threads", "1", "--max-image-tokens", "50"],
                          input=stdin, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "more than the limit of 50 per image" in errors[0]
    assert "Traceback" not in proc.stderr and proc.stderr.count(" generated; ") == 1  # the next turn ran


def test_cli_help_states_the_runtime_default():
    from qvl import cli
    from qvl.runtime.image_preprocess import DEFAULT_MAX_IMAGE_TOKENS

    assert f"default {DEFAULT_MAX_IMAGE_TOKENS}," in cli.MAX_IMAGE_TOKENS_HELP


def test_python_api_limits_and_per_request_pixels(tiny_cpu_artifact, tmp_path):
    from qvl.runtime import load
    from qvl.runtime.image_preprocess import DEFAULT_MAX_IMAGE_TOKENS, preprocess_images

    photo = _photo(tmp_path / "photo.png")
    model = load(tiny_cpu_artifact, device="cpu", threads=1)
    prompts = model.prompts
    assert prompts.max_image_tokens == DEFAULT_MAX_IMAGE_TOKENS

    def message(**block):
        return [{"role": "user", "content": [{"type": "image", "image": str(photo), **block},
                                             {"type": "text", "text": "hi"}]}]

    assert prompts.build(message()).image_grid_thw.tolist() == [[1, 24, 32]]  # 192 tokens
    with pytest.raises(QvlError, match="192 image tokens .* more than the limit of 100 per image"):
        prompts.build(message(), max_image_tokens=100)  # per request
    # per request resize bounds, as the processor's call arguments; a block's own keys win for that image
    small = prompts.build(message(), max_pixels=96 * 96, max_image_tokens=100)
    cfg = prompts.image_config
    ref_pv, ref_grid = preprocess_images([Image.open(photo)], cfg, max_pixels=96 * 96)
    assert np.array_equal(small.pixel_values, ref_pv) and np.array_equal(small.image_grid_thw, ref_grid)
    per_block = prompts.build(message(max_pixels=96 * 96), max_image_tokens=100)
    assert np.array_equal(per_block.pixel_values, ref_pv)
    with pytest.raises(QvlError, match="max_pixels must be an integer >= 1"):
        prompts.build(message(max_pixels=0))
    # the defaults for every later request: generate() goes through them
    prompts.set_image_limits(max_image_tokens=100)
    with pytest.raises(QvlError, match="more than the limit of 100"):
        model.generate(message(), max_new_tokens=2)
    prompts.set_image_limits(max_pixels=96 * 96)
    assert prompts.image_config.max_pixels == 96 * 96 and prompts.max_image_tokens == 100
    assert model.generate(message(), max_new_tokens=2) is not None
    with pytest.raises(QvlError, match="max_image_tokens must be an integer >= 1"):
        prompts.set_image_limits(max_image_tokens=-1)
