"""Prefix cache (`runtime/prefix_cache.py`, `Model.session()`): follow-up turns reuse the KV cache of the previous
turn and the vision features of earlier images, and answer exactly what a from-scratch run answers.

Real ORT sessions on the tiny artifacts, one per KV layout the CPU can run: `concat` (the plain export), `shared`
(GroupQueryAttention, the cpu target), `scatter` (TensorScatter + Attention, the cuda-sm61 target) and `shared-fp16`
(the cuda target's fp16 GQA cache); the CUDA-only paths (device OrtValues, CUDA graphs) and TensorRT are not run here
(the TensorRT truncation copy is checked on the host)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli
from qvl.errors import QvlError

LAYOUTS = ("concat", "shared", "scatter", "shared-fp16")
SAMPLED = dict(temperature=4.0, top_k=0, top_p=1.0, seed=3)  # the tiny model's greedy answers repeat one token


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from qvl.toolchain.eval.parity import suite_images

    return suite_images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def scatter_artifact(tiny_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("pc-sm61") / "art"
    compile_artifact(tiny_artifact, "cuda-sm61", out)
    return out


@pytest.fixture(scope="module")
def fp16_artifact(tiny_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("pc-cuda") / "art"
    compile_artifact(tiny_artifact, "cuda", out)
    return out


@pytest.fixture(scope="module")
def artifacts(request, tiny_artifact, tiny_cpu_artifact):
    lazy = {"scatter": "scatter_artifact", "shared-fp16": "fp16_artifact"}

    def get(layout):
        if layout == "concat":
            return tiny_artifact
        if layout == "shared":
            return tiny_cpu_artifact
        return request.getfixturevalue(lazy[layout])

    return get


class Counting:
    """Mixin over the real ORT engine: counts vision calls, cache allocations, truncations and frees."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.encoded, self.made, self.freed, self.truncated = [], [], [], []
        self.events = []  # ("new" | "free", id(cache)) in call order

    def encode_images(self, pixel_values, image_grid_thw):
        self.encoded.append(np.asarray(image_grid_thw).tolist())
        return super().encode_images(pixel_values, image_grid_thw)

    def new_cache(self, capacity, batch=1):
        cache = super().new_cache(capacity, batch)
        self.made.append(cache)
        self.events.append(("new", id(cache)))
        return cache

    def truncate(self, cache, length, capacity):
        self.truncated.append((cache.length, length))
        return super().truncate(cache, length, capacity)

    def free(self, cache):
        self.freed.append(cache)
        self.events.append(("free", id(cache)))
        super().free(cache)


def _model(artifact, counting=False):
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model

    cls = type("CountingEngine", (Counting, Engine), {}) if counting else Engine
    return Model(cls(artifact, device="cpu", threads=1))


def _user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def _image(path):
    return {"type": "image", "image": str(path)}


def model_sampling(model):
    from qvl.runtime.model import _sampling_config

    return _sampling_config(model.generation_config, SAMPLED["temperature"], SAMPLED["top_p"], SAMPLED["top_k"], None)


def _stats():
    from qvl.runtime import GenerationStats

    return GenerationStats()


# -- pure logic ----------------------------------------------------------------------------------------------


def test_common_prefix_stops_at_ids_positions_and_other_images():
    from qvl.runtime.prefix_cache import ImageSpan, common_prefix

    ids = np.array([1, 2, 9, 9, 9, 3, 4], dtype=np.int64)
    pos = np.stack([np.arange(7)] * 3).astype(np.int64)
    img = [ImageSpan(2, 5, "a")]
    assert common_prefix(ids, pos, img, ids, pos, img) == 7
    assert common_prefix(ids, pos, img, ids[:4], pos[:, :4], img) == 4  # the new prompt is shorter
    other = ids.copy()
    other[5] = 7
    assert common_prefix(ids, pos, img, other, pos, img) == 5  # ids part
    moved = pos.copy()
    moved[1, 3] = 10
    assert common_prefix(ids, pos, img, ids, moved, img) == 3  # one MRoPE axis differs
    assert common_prefix(ids, pos, img, ids, pos, [ImageSpan(2, 5, "b")]) == 2  # same placeholders, another image
    assert common_prefix(ids, pos, [], ids, pos, img) == 2  # held had no image there
    assert common_prefix(ids[:0], pos[:, :0], [], ids, pos, img) == 0


def test_image_cache_is_lru_by_bytes():
    from qvl.runtime.prefix_cache import ImageCache, ImageFeatures, image_digest

    def feats(n):  # n rows of 4 floats + one DeepStack layer: 32 * n bytes
        return ImageFeatures(np.zeros((n, 4), np.float32), (np.zeros((n, 4), np.float32),))

    c = ImageCache(max_bytes=100)
    c.put("a", feats(1))
    c.put("b", feats(1))
    assert c.get("a") is not None  # a is now the most recently used
    c.put("c", feats(1))  # 96 bytes: all fit
    c.put("d", feats(1))  # 128 > 100: the least recently used (b) goes
    assert "b" not in c and all(k in c for k in "acd") and c.nbytes == 96
    c.put("big", feats(4))  # larger than the whole cache: not kept, nothing evicted for it
    assert "big" not in c and len(c) == 3
    assert (c.hits, c.misses) == (1, 0) and c.get("b") is None and c.misses == 1
    c.clear()
    assert len(c) == 0 and c.nbytes == 0
    pv = np.arange(12, dtype=np.float32).reshape(3, 4)
    grid = np.array([1, 1, 3])
    assert image_digest("x", pv, grid) == image_digest("x", pv.copy(), grid.copy())
    assert image_digest("x", pv, grid) != image_digest("y", pv, grid)  # another runner
    assert image_digest("x", pv, grid) != image_digest("x", pv, np.array([1, 3, 1]))  # another grid
    changed = pv.copy()
    changed[2, 3] += 1
    assert image_digest("x", pv, grid) != image_digest("x", changed, grid)


def test_tensorrt_truncation_copy_compacts_the_ping_pong_layout():
    from qvl.runtime.backends.tensorrt import truncation_copy

    heads, dim, held, keep = 3, 4, 7, 5
    src = np.random.default_rng(0).standard_normal((1, heads, held, dim)).astype(np.float32)
    copy = truncation_copy(heads, dim, 4, held, keep)
    # what cudaMemcpy2D does with these parameters, on host bytes
    s, d = src.tobytes(), bytearray(heads * keep * dim * 4)
    for row in range(copy.height):
        d[row * copy.dst_pitch:row * copy.dst_pitch + copy.width] = s[row * copy.src_pitch:row * copy.src_pitch + copy.width]
    got = np.frombuffer(bytes(d), np.float32).reshape(1, heads, keep, dim)
    assert np.array_equal(got, src[:, :, :keep])
    assert truncation_copy(heads, dim, 4, held, held) is None and truncation_copy(heads, dim, 4, held, 0) is None
    with pytest.raises(QvlError, match="cannot truncate"):
        truncation_copy(heads, dim, 4, held, held + 1)


# -- backend truncation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncate_then_prefill_matches_a_fresh_cache(artifacts, layout):
    """Every ORT layout: hold 12 positions, truncate to 5 (within the capacity, and with a larger capacity: the
    grown copy), run positions 5..11 again: the logits match a cache that never held the rest."""
    model = _model(artifacts(layout))
    eng = model.engine
    prompt = model.prepare([_user("Tell me a story about the sea, please.")])
    n = len(prompt)
    embeds, pos, _, _ = model._prompt_tensors(prompt, _stats())
    keep = 5
    ref_cache = eng.new_cache(n + 4)
    ref = eng.step(ref_cache, embeds, pos)
    for capacity in (n + 4, 4 * n + 64):
        cache = eng.new_cache(n + 4)
        eng.step(cache, embeds[:, :3], pos[:, :, :3])
        eng.step(cache, embeds[:, 3:], pos[:, :, 3:])  # something past `keep` to throw away
        assert cache.length == n
        cache = eng.truncate(cache, keep, capacity)
        assert cache.length == keep
        if eng.kv_mode != "concat":
            assert cache.capacity >= capacity
        got = eng.step(cache, embeds[:, keep:], pos[:, :, keep:])
        tol = 2e-2 if layout == "shared-fp16" else 1e-4
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
        assert int(np.argmax(got)) == int(np.argmax(ref))
        with pytest.raises(QvlError, match="cannot truncate"):
            eng.truncate(cache, cache.length + 1, capacity)
        eng.free(cache)
    eng.free(ref_cache)


# -- sessions: follow-up turns are the from-scratch answers ------------------------------------------------


def _conversation(images):
    """Three turns: an image and a question; a text follow-up; a new image."""
    t1 = [_user(_image(images["square"]), "What is this?")]
    t2 = lambda a1: t1 + [{"role": "assistant", "content": a1}, _user("And the colours?")]  # noqa: E731
    t3 = lambda a1, a2: t2(a1) + [{"role": "assistant", "content": a2}, _user(_image(images["wide"]), "And this one?")]  # noqa: E731
    return t1, t2, t3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_follow_up_turns_equal_from_scratch_runs(artifacts, images, layout):
    model = _model(artifacts(layout), counting=True)
    eng = model.engine
    chat = model.session()
    t1, t2, t3 = _conversation(images)
    answers, stats = [], []
    for turn in range(3):
        msgs = t1 if turn == 0 else t2(answers[0]) if turn == 1 else t3(answers[0], answers[1])
        st = _stats()
        encoded_before = len(eng.encoded)
        got = chat.generate(msgs, max_new_tokens=10, stats=st, **SAMPLED)
        encoded_in_session = len(eng.encoded) - encoded_before
        ref = model.generate(msgs, max_new_tokens=10, **SAMPLED)  # no cache: from scratch
        assert got == ref, (layout, turn)
        answers.append(got)
        stats.append((st, encoded_in_session))
    (s1, e1), (s2, e2), (s3, e3) = stats
    assert s1.reused_tokens == 0 and e1 == 1 and s1.images_encoded == 1
    # turn 2: the first turn's whole prompt comes from the cache (its image with it: not encoded, not looked up)
    p1 = len(model.prepare(t1))
    assert s2.reused_tokens >= p1 and e2 == 0 and s2.images_encoded == s2.image_cache_hits == 0
    assert s2.prefill_tokens == s2.prompt_tokens - s2.reused_tokens
    # turn 3: everything up to the second answer reused; only the new image is encoded
    p2 = len(model.prepare(t2(answers[0])))
    assert s3.reused_tokens >= p2 and e3 == 1 and s3.images_encoded == 1 and s3.image_cache_hits == 0
    assert chat.cache.held_tokens > 0
    chat.reset()
    assert chat.cache.held_tokens == 0 and len(chat.cache.images) == 0
    assert len(eng.made) == len(eng.freed)  # every cache released (the session's last one by reset)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_follow_up_tokens_and_logits_match_from_scratch(artifacts, images, layout):
    """Greedy with the logits kept: the same tokens; the logits' largest difference is what prefilling the
    suffix after a cached prefix (vs the whole prompt at once) changes in fp32 rounding."""
    model = _model(artifacts(layout))
    t1, t2, t3 = _conversation(images)
    chat = model.session()
    first = [t for t, _ in chat.generate_ids(model.prepare(t1), 10)]
    a1 = model.prompts.decode(first)
    answers = []
    for msgs, before in ((t2(a1), t1), (t3(a1, "A reply."), None)):  # a text follow-up; then a new image
        prompt = model.prepare(msgs)
        st = _stats()
        got = list(chat.generate_ids(prompt, 8, keep_logits=True, stats=st))
        ref = list(model.generate_ids(prompt, 8, keep_logits=True))
        assert [t for t, _ in got] == [t for t, _ in ref]
        diff = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(got, ref))
        print(f"{layout}: reused {st.reused_tokens}/{st.prompt_tokens}, max |logit diff| {diff:.3g}")
        assert diff < (5e-2 if layout == "shared-fp16" else 1e-3)
        assert st.reused_tokens >= len(model.prepare(before)) if before else st.reused_tokens > 0
        answers.append(got)
    chat.reset()


def test_another_image_in_the_same_place_is_not_taken_from_the_cache(tiny_artifact, images, tmp_path):
    """Same size, other pixels: the same placeholder ids and positions, another digest. Reuse stops at the image."""
    from PIL import Image

    other = tmp_path / "other.png"
    im = Image.open(images["square"]).convert("RGB")
    im.putpixel((0, 0), tuple(255 - c for c in im.getpixel((0, 0))))
    im.save(other)
    model = _model(tiny_artifact, counting=True)
    chat = model.session()
    first = [_user("Here is a picture, have a careful look:", _image(images["square"]), "What is this?")]
    chat.generate(first, max_new_tokens=6, **SAMPLED)
    edited = [_user("Here is a picture, have a careful look:", _image(other), "What is this?")]
    p_first, p_edited = model.prepare(first), model.prepare(edited)
    assert p_first.input_ids.tolist() == p_edited.input_ids.tolist()  # indistinguishable by ids
    st = _stats()
    got = chat.generate(edited, max_new_tokens=6, stats=st, **SAMPLED)
    start = int(np.flatnonzero(p_edited.input_ids == model.prompts.image_token_id)[0])
    assert start >= chat.cache.min_reuse and st.reused_tokens == start
    assert st.images_encoded == 1 and st.image_cache_hits == 0
    assert got == model.generate(edited, max_new_tokens=6, **SAMPLED)
    chat.reset()


def test_follow_ups_match_eager_transformers(tiny_checkpoint, tiny_artifact, images):
    """The oracle: the second and third turns of a session are eager `generate`'s answers to the whole conversation."""
    from qvl.toolchain.eval.reference import EagerReference

    eager = EagerReference(tiny_checkpoint, threads=1)
    model = _model(tiny_artifact)
    t1, t2, t3 = _conversation(images)
    with model.session() as chat:
        a1 = chat.generate(t1, max_new_tokens=8)
        assert a1 == eager.answer(t1, max_new_tokens=8, keep_logits=False).text
        prompt2 = model.prepare(t2(a1))
        st = _stats()
        ids2 = [t for t, _ in chat.generate_ids(prompt2, 8, stats=st)]
        assert ids2 == eager.answer(t2(a1), max_new_tokens=8, keep_logits=False).token_ids and st.reused_tokens > 0
        a2 = model.prompts.decode(ids2)
        ids3 = [t for t, _ in chat.generate_ids(model.prepare(t3(a1, a2)), 8)]
        assert ids3 == eager.answer(t3(a1, a2), max_new_tokens=8, keep_logits=False).token_ids


def test_an_answer_that_round_trips_leaves_only_the_new_turn_to_prefill(tiny_artifact):
    model = _model(tiny_artifact, counting=True)
    chat = model.session()
    t1 = [_user("Tell me a story.")]
    p1 = model.prepare(t1)
    ids = [t for t, _ in chat.generate_ids(p1, 10)]
    answer = model.prompts.decode(ids)
    assert model.prompts.encode(answer).tolist() == ids  # this answer tokenizes back into the generated ids
    held = chat.cache.held_tokens
    assert held == len(p1) + len(ids) - 1  # the last generated token was never fed back
    p2 = model.prepare(t1 + [{"role": "assistant", "content": answer}, _user("More.")])
    assert p2.input_ids[:held].tolist() == p1.input_ids.tolist() + ids[:-1]
    st = _stats()
    got = [t for t, _ in chat.generate_ids(p2, 6, stats=st)]
    assert st.reused_tokens == held and st.prefill_tokens == len(p2) - held
    assert model.engine.truncated[-1] == (held, held)  # nothing to cut: the cache only grows
    assert got == [t for t, _ in model.generate_ids(p2, 6)]
    # the same prompt again (a regenerate): all but its last token reused, within the cache's capacity
    st = _stats()
    again = [t for t, _ in chat.generate_ids(p2, 6, stats=st)]
    assert again == got and st.reused_tokens == len(p2) - 1 and st.prefill_tokens == 1


def test_a_forced_answer_is_held_as_a_generated_one(tiny_artifact):
    """`forced_tokens` (the follow-up benchmark's stand-in for a trained model's answer): the forced ids come out,
    are fed back like picked ones, and the re-rendered follow-up reuses them; its answer equals from scratch."""
    model = _model(tiny_artifact, counting=True)
    chat = model.session()
    t1 = [_user("Tell me a story.")]
    p1 = model.prepare(t1)
    text = "A fox ran over the hill and sat down."
    forced = model.prompts.encode(text).tolist() + [model.prompts.tokenizer.token_to_id("<|im_end|>")]
    assert forced[-1] in model.stop_ids
    st1 = _stats()
    ids = [t for t, _ in chat.generate_ids(p1, len(forced) + 4, stats=st1, forced_tokens=forced)]
    assert ids == forced and st1.stop_reason == "stop_token"  # the forced <|im_end|> stops it, as a model's would
    held = chat.cache.held_tokens
    assert held == len(p1) + len(forced) - 1
    t2 = t1 + [{"role": "assistant", "content": text}, _user("More.")]
    p2 = model.prepare(t2)
    assert p2.input_ids[:held].tolist() == p1.input_ids.tolist() + forced[:-1]
    st2 = _stats()
    got = [t for t, _ in chat.generate_ids(p2, 6, stats=st2)]
    assert st2.reused_tokens == held and st2.prefill_tokens == len(p2) - held
    assert got == [t for t, _ in model.generate_ids(p2, 6)]
    # past the forced ids the model picks again: the tokens a prompt ending in them gets
    import dataclasses

    k = len(forced) - 1
    more = [t for t, _ in model.generate_ids(p1, k + 3, forced_tokens=forced[:-1], ignore_stop=True)]
    longer = dataclasses.replace(p1, input_ids=np.concatenate([p1.input_ids, np.asarray(forced[:-1], np.int64)]),
                                 mm_token_type_ids=np.zeros(len(p1) + k, np.int64))
    assert more[:k] == forced[:-1]
    assert more[k:] == [t for t, _ in model.generate_ids(longer, 3, ignore_stop=True)]
    with pytest.raises(ValueError, match="exclude each other"):
        from qvl.runtime.speculative import DraftConfig

        list(model.generate_ids(p1, 4, forced_tokens=forced, speculative=DraftConfig()))


def test_images_are_encoded_once_per_session(tiny_artifact, images):
    model = _model(tiny_artifact, counting=True)
    eng = model.engine
    chat = model.session()
    square = _image(images["square"])
    two = [_user(square, "Compare", square)]  # the same image twice in one prompt: encoded once
    st = _stats()
    chat.generate(two, max_new_tokens=4, stats=st)
    assert len(eng.encoded) == 1 and st.images_encoded == 1 and st.image_cache_hits == 1
    # another conversation that differs before the image: the KV prefix is cut before it, the features are cached
    other = [{"role": "system", "content": "Be brief."}, _user(square, "What is this?")]
    st = _stats()
    got = chat.generate(other, max_new_tokens=6, stats=st, **SAMPLED)
    assert len(eng.encoded) == 1 and st.image_cache_hits == 1 and st.images_encoded == 0
    assert got == model.generate(other, max_new_tokens=6, **SAMPLED)  # (no cache: encodes it again)
    before = len(eng.encoded)
    chat.reset()  # forgets the images too
    chat.generate(other, max_new_tokens=2)
    assert len(eng.encoded) == before + 1
    chat.reset()


def test_a_new_conversation_frees_the_old_cache_first(tiny_cpu_artifact):
    model = _model(tiny_cpu_artifact, counting=True)
    eng = model.engine
    chat = model.session()
    long = [_user("A long first conversation about many things " * 8)]
    chat.generate(long, max_new_tokens=8)
    held = eng.made[-1]
    assert chat.cache.held_tokens > 40 and held not in eng.freed
    st = _stats()
    chat.generate([{"role": "system", "content": "Other."}, _user("Hi")], max_new_tokens=4, stats=st)
    assert st.reused_tokens == 0 and eng.made[-1] is not held
    assert eng.events.index(("free", id(held))) < eng.events.index(("new", id(eng.made[-1])))  # freed first
    chat.reset()
    assert len(eng.made) == len(eng.freed)


def test_a_stopped_stream_keeps_a_consistent_cache(tiny_artifact):
    model = _model(tiny_artifact)
    chat = model.session()
    t1 = [_user("Describe the weather today.")]
    full = model.generate(t1, max_new_tokens=12, **SAMPLED)
    ids = [t for t, _ in model.generate_ids(model.prepare(t1), 12, model_sampling(model), seed=SAMPLED["seed"])]
    stop = model.prompts.decode([ids[6]])  # a stop string in the 7th token
    assert full.index(stop) > 0
    cut = chat.generate(t1, max_new_tokens=12, stop=[stop], **SAMPLED)  # the consumer closes the generator
    assert cut == full[: full.index(stop)] and chat.cache.held_tokens > len(model.prepare(t1)) + 3
    t2 = t1 + [{"role": "assistant", "content": cut}, _user("Go on.")]
    assert chat.generate(t2, max_new_tokens=8, **SAMPLED) == model.generate(t2, max_new_tokens=8, **SAMPLED)
    chat.reset()


def test_a_failed_step_drops_the_cache(tiny_artifact):
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model

    class FailingOnce(Counting, Engine):  # the real engine; its 3rd decoder call raises once
        calls = 0

        def greedy_step(self, *a, **kw):
            FailingOnce.calls += 1
            if FailingOnce.calls == 3:
                raise QvlError("injected failure")
            return super().greedy_step(*a, **kw)

    model = Model(FailingOnce(tiny_artifact, device="cpu", threads=1))
    chat = model.session()
    t1 = [_user("Hello there")]
    chat.generate(t1, max_new_tokens=2)  # calls 1 and 2
    assert chat.cache.held_tokens > 0
    t2 = t1 + [{"role": "assistant", "content": "x"}, _user("Again")]
    with pytest.raises(QvlError, match="injected"):
        chat.generate(t2, max_new_tokens=4)
    assert chat.cache.held_tokens == 0 and len(model.engine.made) == len(model.engine.freed)
    assert chat.generate(t2, max_new_tokens=4) == model.generate(t2, max_new_tokens=4)
    chat.reset()


# -- the chat command --------------------------------------------------------------------------------------


def _chat(artifact, stdin, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", "from qvl.cli import main; main()", "chat", str(artifact), "--max-new-tokens", "6",
         "--threads", "1", "--device", "cpu", "--greedy", *flags],
        input=stdin, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    answers = [a.strip("\n") for a in proc.stdout.split("> ") if a.strip("\n")]
    stats = [line for line in proc.stderr.splitlines() if "generated;" in line]
    return answers, stats


def test_chat_command_reuses_the_prefix_and_answers_as_from_scratch(tiny_cpu_artifact, images):
    stdin = (f"/image {images['square']}\nWhat is this?\nAnd the colours?\n/image {images['wide']}\nAnd this one?\n"
             f"/reset\n/image {images['square']}\nWhat is this?\n")
    cached, cached_stats = _chat(tiny_cpu_artifact, stdin)
    scratch, _ = _chat(tiny_cpu_artifact, stdin, "--no-prefix-cache")
    assert len(cached) == 4 and cached == scratch
    run = run_cli("run", str(tiny_cpu_artifact), "--image", str(images["square"]), "--prompt", "What is this?",
                  "--max-new-tokens", "6", "--threads", "1", "--device", "cpu", "--greedy")
    assert run.returncode == 0, run.stderr
    assert cached[0] == run.stdout.strip("\n") == cached[3]  # turn 1, and the same question after /reset
    assert len(cached_stats) == 4
    assert "; 0 of" in cached_stats[0] and "images: 1 encoded, 0 from the image cache" in cached_stats[0]
    reused2 = int(cached_stats[1].split("; ")[-1].split(" of ")[0])
    assert reused2 > 0 and "images:" not in cached_stats[1]  # the image is inside the reused prefix
    assert "images: 1 encoded" in cached_stats[2] and int(cached_stats[2].split("; ")[-1].split(" of ")[0]) > reused2
    assert "; 0 of" in cached_stats[3] and "images: 1 encoded" in cached_stats[3]  # /reset cleared both caches
