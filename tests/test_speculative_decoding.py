"""Exact speculative decoding (issue #16 item 6): the decoder's `logit_positions` input, `Runner.verify_step`, and
`Model.generate_ids(..., speculative=DraftConfig())` -- greedy output identical to plain greedy decoding, token for
token, with drafts actually accepted.

Real ORT sessions on the tiny artifacts, one per KV layout the CPU runs: `concat` (the plain export), `shared`
(GroupQueryAttention, the cpu target), `scatter` (TensorScatter + Attention, the cuda-sm61 target), `shared-fp16`
(the cuda target: fp16 activations and cache, `next_tokens` from the on-device argmax) and `kit` (the fp32 sm61
engine kit's opset-17 graphs, which TensorRT parses, run by ORT). The CUDA-only paths (device buffers, CUDA graphs)
and the TensorRT runner are not run here.

The tiny model is random: its greedy answers fall into a run of one token within a few tokens, whatever the
prompt, so prompt lookup drafts (and gets accepted) on every prompt -- "copy-heavy" vs "free-form" differ only in
how early. The assertions that matter are exactness and that drafts were accepted at all.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto as T, helper

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError
from qvl.runtime.speculative import DraftConfig, PromptLookup, propose

LAYOUTS = ("concat", "shared", "scatter", "shared-fp16", "kit")
COPY_PROMPT = ("Repeat this text exactly: the quick brown fox jumps over the lazy dog; "
               "the quick brown fox jumps over the lazy dog.")
FREE_PROMPT = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from qvl.toolchain.eval.parity import suite_images

    return suite_images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def artifacts(request, tiny_artifact, tiny_cpu_artifact, tmp_path_factory):
    from qvl.toolchain.compile.pipeline import compile_artifact

    made = {"concat": tiny_artifact, "shared": tiny_cpu_artifact}

    def get(layout):
        if layout not in made:
            if layout == "kit":
                made[layout] = request.getfixturevalue("sm61_kit_dir")
            else:
                out = tmp_path_factory.mktemp(f"spec-{layout}") / "art"
                compile_artifact(tiny_artifact, {"scatter": "cuda-sm61", "shared-fp16": "cuda"}[layout], out)
                made[layout] = out
        return made[layout]

    return get


@pytest.fixture(scope="module")
def old_artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported in the previous decoder form: no `logit_positions`, last-position logits."""
    from qvl.toolchain.export.exporter import export_artifact

    out = tmp_path_factory.mktemp("old-decoder") / "art"
    export_artifact(tiny_checkpoint, out, logit_positions=False)
    return out


def _model(artifact):
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model

    return Model(Engine(artifact, device="cpu", threads=1))


def _user(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def _run(model, prompt, max_new_tokens, speculative=None, cache=None):
    from qvl.runtime import GenerationStats

    stats = GenerationStats()
    ids = [t for t, _ in model.generate_ids(prompt, max_new_tokens, stats=stats, speculative=speculative, cache=cache)]
    return ids, stats


# -- drafting --------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=0, max_size=60), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2),
       st.integers(2, 30))
def test_the_incremental_index_drafts_what_propose_drafts(seq, k, min_n, extra_n, window):
    cfg = DraftConfig(max_draft=k, min_ngram=min_n, max_ngram=min_n + extra_n, window=window)
    lookup = PromptLookup(cfg)
    assert lookup.propose() == propose([], cfg)
    for i, tok in enumerate(seq):
        lookup.extend([tok])
        assert lookup.propose() == propose(seq[:i + 1], cfg), (seq[:i + 1], cfg)
    assert PromptLookup(cfg, seq).propose(max_draft=1) == propose(seq, cfg)[:1]


def test_a_repeating_tail_drafts_its_period_up_to_k():
    cfg = DraftConfig(max_draft=5, min_ngram=2, max_ngram=2)
    assert propose([9, 4, 4, 4], cfg) == [4, 4, 4, 4, 4]  # (4, 4) at 1..2, followed only by the tail's 4
    assert propose([1, 2, 3, 1, 2, 3, 1, 2], cfg) == [3, 1, 2, 3, 1]  # period 3
    assert propose([5, 6, 7, 8, 5, 6], cfg) == [7, 8, 5, 6, 7]  # the follower runs into the tail: period 4
    assert PromptLookup(cfg, [1, 2, 3, 1, 2, 3, 1, 2]).propose(max_draft=2) == [3, 1]


# -- the decoder graph -----------------------------------------------------------------------------------------


def test_the_exported_decoder_takes_logit_positions(tiny_artifact, old_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    ins = m["graphs"]["decoder"]["inputs"]
    assert ins[-1] == {"name": "logit_positions", "dtype": "int64", "shape": ["positions"]}  # the last input
    logits = m["graphs"]["decoder"]["outputs"][0]
    assert logits["name"] == "logits" and logits["shape"][1] == "positions"
    old = json.loads((old_artifact / "manifest.json").read_text())["graphs"]["decoder"]
    assert "logit_positions" not in [i["name"] for i in old["inputs"]] and old["outputs"][0]["shape"][1] == 1
    assert [i["name"] for i in old["inputs"]] == [i["name"] for i in ins[:-1]]


def _positions_graph() -> ir.Model:
    """hidden [B, S, 7] -> logits = Gather(hidden, logit_positions, axis=1): the decoder's tail in miniature."""
    node = helper.make_node("Gather", ["x", "logit_positions"], ["logits"], axis=1)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, ["B", "S", 7]),
         helper.make_tensor_value_info("logit_positions", T.INT64, ["P"])],
        [helper.make_tensor_value_info("logits", T.FLOAT, ["B", "P", 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def test_device_argmax_adds_next_tokens_for_every_requested_position():
    import onnxruntime as ort

    from qvl.passes.device_argmax import DeviceArgmaxPass
    from qvl.toolchain.compile.targets import get_target

    model = _positions_graph()
    result = DeviceArgmaxPass(target=get_target("cuda"), graph="decoder")(model)
    assert result.report.counts == {"next_token_outputs": 1, "next_tokens_outputs": 1}
    assert [o.name for o in model.graph.outputs] == ["logits", "next_token", "next_tokens"]
    again = DeviceArgmaxPass(target=get_target("cuda"), graph="decoder")(model)
    assert not again.modified and again.report.counts["next_tokens_outputs"] == 0
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 6, 7)).astype(np.float32)
    x[0, 4, 1] = x[0, 4, 3] = 9.0  # a tie: first index wins
    rows = np.array([1, 4, 5], np.int64)
    logits, token, tokens = sess.run(None, {"x": x, "logit_positions": rows})
    np.testing.assert_array_equal(logits, x[:, rows])
    np.testing.assert_array_equal(tokens, np.argmax(x[:, rows], axis=-1))
    np.testing.assert_array_equal(token, np.argmax(x[:, 5], axis=-1))  # next_token: still the LAST row's argmax
    assert tokens.shape == (2, 3) and tokens[0, 1] == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_step_is_the_one_token_steps_greedy_choice(artifacts, layout):
    """12 random embeddings: one-token steps vs a 4-position prefill + one 8-position verify step, then the cache
    truncated back to 7 positions and continued one token at a time."""
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.mrope import decode_position_ids

    eng = Engine(artifacts(layout), device="cpu", threads=1)
    assert eng.max_verify_positions == eng.context_length
    ids = np.random.default_rng(1).integers(0, 5000, 12)
    emb, pos = eng.embed(ids)[None], decode_position_ids(0, 12, 0)
    cache = eng.new_cache(32)
    ref = [int(eng.greedy_step(cache, emb[:, i:i + 1], pos[:, :, i:i + 1])[0]) for i in range(12)]
    eng.free(cache)
    cache = eng.new_cache(32)
    first = int(eng.greedy_step(cache, emb[:, :4], pos[:, :, :4])[0])
    verified = eng.verify_step(cache, emb[:, 4:], pos[:, :, 4:])
    assert verified.shape == (1, 8) and verified.dtype == np.int64 and cache.length == 12
    assert [first, *verified[0].tolist()] == ref[3:]
    cache = eng.truncate(cache, 7, 32)
    assert [int(eng.greedy_step(cache, emb[:, i:i + 1], pos[:, :, i:i + 1])[0]) for i in range(7, 12)] == ref[7:]
    eng.free(cache)


# -- generation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_speculative_output_is_plain_greedy_output(artifacts, layout):
    model = _model(artifacts(layout))
    for text, copy_heavy in ((COPY_PROMPT, True), (FREE_PROMPT, False)):
        prompt = model.prepare(_user(text))
        plain, ps = _run(model, prompt, 40)
        spec, ss = _run(model, prompt, 40, DraftConfig())
        assert spec == plain, (layout, text)
        assert ss.generated_tokens == ps.generated_tokens and ss.stop_reason == ps.stop_reason
        sp = ss.speculation
        assert sp.steps == len(sp.per_step) and sum(sp.per_step) == ss.generated_tokens - 1  # token 1: the prefill
        assert sp.steps + sp.accepted == ss.generated_tokens - 1 and sp.accepted <= sp.drafted
        print(f"{layout} {'copy' if copy_heavy else 'free'}: {ss.generated_tokens} tokens in {sp.steps} steps, "
              f"{sp.accepted}/{sp.drafted} drafts accepted")
        if copy_heavy:
            assert sp.accepted > 0 and sp.steps < ss.generated_tokens - 1  # fewer decoder steps than tokens
        assert ps.speculation is None and ss.speculation_note is None


@pytest.mark.parametrize("layout", ["concat", "shared", "scatter", "shared-fp16"])
def test_speculative_output_with_an_image_is_plain_greedy_output(artifacts, images, layout):
    """Decode positions after an image are offset by the prompt's rope delta: verify steps must use them too."""
    from qvl.runtime.mrope import rope_index

    model = _model(artifacts(layout))
    prompt = model.prepare(_user({"type": "image", "image": str(images["wide"])}, "Read the text in this image."))
    _, delta = rope_index(prompt.input_ids, prompt.mm_token_type_ids, prompt.image_grid_thw,
                          model.engine.model_info.spatial_merge_size)
    assert int(np.asarray(delta).reshape(-1)[0]) != 0
    plain, _ = _run(model, prompt, 30)
    spec, ss = _run(model, prompt, 30, DraftConfig(max_draft=5))
    assert spec == plain and ss.speculation.accepted > 0


def test_max_new_tokens_is_exact(artifacts):
    model = _model(artifacts("shared"))
    prompt = model.prepare(_user(COPY_PROMPT))
    plain, _ = _run(model, prompt, 24)
    for m in (1, 2, 3, 5, 8, 13, 24):
        spec, ss = _run(model, prompt, m, DraftConfig(max_draft=6))
        assert spec == plain[:m] and ss.generated_tokens == m and ss.stop_reason == "max_new_tokens"
        assert sum(ss.speculation.per_step) == m - 1


def _drafted_first_occurrences(ids: list[int], per_step: list[int]) -> list[int]:
    """Tokens whose first occurrence in the answer is an accepted draft (not the last token of its step)."""
    out, pos = [], 1  # the first token comes from the prefill
    for n in per_step:
        step = ids[pos:pos + n]
        out += [tok for j, tok in enumerate(step[:-1]) if ids.index(tok) == pos + j]
        pos += n
    return out


def _stop_inside_a_step(model):
    """(prompt, stop id, config): a prompt whose answer's first occurrence of some token is an accepted draft.

    The tiny model's answers are runs of one token, so a token first appears as a draft only when the prompt holds
    the answer's own opening: the search feeds the answer back into the prompt until one does (deterministic)."""
    cfg = DraftConfig(min_ngram=1)  # one-token n-grams: the answer's first tokens can match the prompt
    for base in ("Repeat this text exactly:", "Copy:", "Say it again:"):
        text = base
        for _ in range(5):
            prompt = model.prepare(_user(text))
            ids, stats = _run(model, prompt, 30, cfg)
            found = _drafted_first_occurrences(ids, stats.speculation.per_step)
            if found:
                return prompt, found[0], cfg
            text = f"{base} {model.prompts.decode(ids[:6])}"
    pytest.fail("no prompt found whose answer takes a new token from an accepted draft")


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_a_stop_id_inside_accepted_drafts_ends_the_answer_there(artifacts, layout):
    """A stop id that arrives as an accepted draft (not the step's last token): nothing after it is yielded, and a
    session keeps exactly what plain decoding would have kept (prompt + every yielded token but the stop)."""
    model = _model(artifacts(layout))
    prompt, stop, cfg = _stop_inside_a_step(model)
    full, _ = _run(model, prompt, 30)
    model.stop_ids = [stop]
    plain, ps = _run(model, prompt, 30)
    assert plain == full[:full.index(stop) + 1] and ps.stop_reason == "stop_token"
    chat = model.session()
    spec, ss = _run(model, prompt, 30, cfg, cache=chat.cache)
    assert spec == plain and ss.stop_reason == "stop_token"
    assert chat.cache.held_tokens == len(prompt) + len(plain) - 1  # the verify step's later drafts dropped
    assert sum(ss.speculation.per_step) == len(plain) - 1  # only the emitted tokens counted
    chat.reset()


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_sessions_speculate_and_answer_as_from_scratch(artifacts, images, layout):
    from qvl.runtime import GenerationStats

    model = _model(artifacts(layout))
    chat = model.session()
    t1 = _user({"type": "image", "image": str(images["square"])}, "Copy the caption of this picture.")
    a1 = chat.generate(t1, max_new_tokens=16, speculative=DraftConfig())
    assert a1 == model.generate(t1, max_new_tokens=16)
    t2 = t1 + [{"role": "assistant", "content": a1}] + _user(f"Now repeat your answer: {a1}")
    stats = GenerationStats()
    a2 = chat.generate(t2, max_new_tokens=24, speculative=DraftConfig(), stats=stats)
    assert a2 == model.generate(t2, max_new_tokens=24)
    assert stats.reused_tokens > 0 and stats.speculation.accepted > 0
    chat.reset()


def test_speculation_is_greedy_only(tiny_artifact):
    model = _model(tiny_artifact)
    with pytest.raises(QvlError, match="greedy only.*sampling"):
        list(model.stream(_user("Hi"), max_new_tokens=4, temperature=0.7, speculative=DraftConfig()))
    with pytest.raises(QvlError, match="repetition penalty"):
        list(model.stream(_user("Hi"), max_new_tokens=4, repetition_penalty=1.2, speculative=DraftConfig()))
    with pytest.raises(QvlError, match="keep_logits"):
        list(model.generate_ids(model.prepare(_user("Hi")), 4, keep_logits=True, speculative=DraftConfig()))


# -- artifacts exported before logit_positions ----------------------------------------------------------------


def test_an_old_decoder_decodes_plainly_and_says_why(old_artifact, tiny_artifact):
    old, new = _model(old_artifact), _model(tiny_artifact)
    assert old.engine.max_verify_positions == 0
    prompt = old.prepare(_user(COPY_PROMPT))
    plain, _ = _run(old, prompt, 20)
    assert plain == _run(new, prompt, 20)[0]  # the same weights: the same answer as the new form
    spec, ss = _run(old, prompt, 20, DraftConfig())
    assert spec == plain and ss.speculation is None
    assert "last position's logits only" in ss.speculation_note and "re-compile" in ss.speculation_note.lower()
    cache = old.engine.new_cache(8)
    emb = old.engine.embed([1, 2])[None]
    from qvl.runtime.mrope import decode_position_ids

    with pytest.raises(QvlError, match="last position's logits only"):
        old.engine.verify_step(cache, emb, decode_position_ids(0, 2, 0))
    assert cache.length == 0  # refused before running anything
    old.engine.free(cache)


# -- the command line ------------------------------------------------------------------------------------------


def test_run_speculative_prints_the_same_answer_and_the_acceptance(tiny_cpu_artifact):
    common = ("run", str(tiny_cpu_artifact), "--prompt", COPY_PROMPT, "--max-new-tokens", "24", "--threads", "1",
              "--device", "cpu", "--greedy")
    plain = run_cli(*common)
    spec = run_cli(*common, "--speculative", "--draft-tokens", "4")
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr, spec.stderr)
    assert spec.stdout == plain.stdout and spec.stdout.strip()
    line = [l for l in spec.stderr.splitlines() if "generated;" in l][-1]
    assert "speculative:" in line and "drafted tokens accepted" in line and "tokens/step" in line
    assert "speculative" not in plain.stderr
    js = run_cli(*common, "--speculative", "--json")
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert out["text"] == plain.stdout.rstrip("\n") and out["speculation"]["accepted"] > 0
    assert set(out["speculation"]) == {"steps", "drafted", "accepted", "acceptance", "tokens_per_step"}


def test_run_speculative_option_errors(tiny_cpu_artifact):
    common = ("run", str(tiny_cpu_artifact), "--prompt", "Hi", "--device", "cpu")
    assert_one_line_error(run_cli(*common, "--speculative", "--temperature", "0.7"), "greedy only", "--temperature")
    assert_one_line_error(run_cli(*common, "--draft-tokens", "0"), "--draft-tokens", "[1, 64]")


def test_run_speculative_on_an_old_artifact_notes_plain_decoding(old_artifact):
    common = ("run", str(old_artifact), "--prompt", COPY_PROMPT, "--max-new-tokens", "12", "--threads", "1",
              "--device", "cpu", "--greedy")
    plain, spec = run_cli(*common), run_cli(*common, "--speculative")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    notes = [l for l in spec.stderr.splitlines() if l.startswith("note: speculative decoding off")]
    assert len(notes) == 1 and "re-compile" in notes[0].lower()
    assert "speculative:" not in spec.stderr.splitlines()[-1]
