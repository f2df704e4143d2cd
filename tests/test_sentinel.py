"""The synthetic VQA generator, the evaluation helpers and the committed sentinel checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.errors import QvlError
from qvl.toolchain.eval import synthetic_vqa as sv
from qvl.toolchain.eval.evaluate import EvalRecord, EvalReport, agreement, evaluate, normalize_answer

QWEN_2B_FIRST_SPECIAL_ID = 151643


# ------------------------------------------------------------------------------------------ generator


def _image_bytes(sample) -> list[bytes]:
    return [im.tobytes() for im in sample["images"]]


def test_generator_is_deterministic():
    for seed in [0, 1, 2, 3, 17, 1_000_000_123]:
        a, b = sv.make_sample(seed), sv.make_sample(seed)
        assert _image_bytes(a) == _image_bytes(b)
        assert (a["question"], a["answer"], a["kind"], a["qa"], a["cells"]) == (
            b["question"],
            b["answer"],
            b["kind"],
            b["qa"],
            b["cells"],
        )
    a, b = sv.make_samples("test", 8), sv.make_samples("test", 8)
    assert [_image_bytes(x) for x in a] == [_image_bytes(x) for x in b]
    assert len({x["images"][0].tobytes() for x in a}) == 8  # different seeds, different scenes


def test_samples_are_well_formed():
    answers = {
        "colour": set(sv.COLOURS),
        "count": {str(n) for n in range(1, sv.MAX_COUNT + 1)},
        "left": {"yes", "no"},
        "number": {str(n) for n in range(100)},
    }
    seen = set()
    for s in sv.make_samples("train", 80):
        seen.add(s["kind"])
        assert s["answer"] in answers[s["kind"]]
        (img,) = s["images"]
        assert img.mode == "RGB" and img.size == (sv.IMAGE_SIZE, sv.IMAGE_SIZE)
        assert s["messages"] == [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}
        ]
        assert s["qa"][0] == (s["kind"], s["question"], s["answer"])
        assert len({q for _, q, _ in s["qa"]}) == len(s["qa"])
        assert len(s["cells"]) == sv.GRID * sv.GRID
    assert seen == set(sv.KINDS)


def test_answers_match_the_scene():
    for s in sv.make_samples("test", 40):
        items = s["objects"]
        if s["kind"] == "number":
            assert "".join(str(o["digit"]) for o in items) == s["answer"]
            continue
        shapes = [o["shape"] for o in items]
        for kind, q, a in s["qa"]:
            if kind == "count":
                shape = q.split()[2][:-1]
                assert a == str(shapes.count(shape))
            elif kind == "colour":
                shape = q.split()[-1][:-1]
                assert shapes.count(shape) == 1 and a == items[shapes.index(shape)]["colour"]
            elif kind == "left":
                shape = q.split()[2]
                assert shapes.count(shape) == 1
                assert a == ("yes" if items[shapes.index(shape)]["col"] < sv.GRID // 2 else "no")


def test_splits_are_disjoint():
    (tr_lo, tr_hi), (te_lo, te_hi) = sv.SPLITS["train"], sv.SPLITS["test"]
    assert tr_hi <= te_lo or te_hi <= tr_lo
    train = set(sv.split_seeds("train", 1000))
    test = set(sv.split_seeds("test", 1000))
    assert not train & test
    assert all(tr_lo <= s < tr_hi for s in train) and all(te_lo <= s < te_hi for s in test)
    assert all(te_lo <= s["seed"] < te_hi for s in sv.make_samples("test", 4))
    with pytest.raises(ValueError):
        sv.split_seeds("test", 10, start=te_hi - te_lo - 5)
    with pytest.raises(ValueError):
        sv.split_seeds("validation", 1)


def test_difficulty_zero_is_easy():
    for seed in range(40):
        s = sv.make_sample(seed, difficulty=0.0)
        if s["kind"] == "number":
            assert len(s["answer"]) == 1
        elif s["kind"] == "colour":
            assert len(s["objects"]) == 1


# ------------------------------------------------------------------------------------------ JSONL


def _write_png(path: Path) -> None:
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(path)


def test_jsonl_loader_reads_user_questions(tmp_path):
    _write_png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _write_png(tmp_path / "sub" / "b.png")
    lines = [
        json.dumps({"images": ["a.png"], "question": "What colour?", "answer": "grey"}),
        "",
        "# a comment",
        json.dumps({"images": ["a.png", str(tmp_path / "sub" / "b.png")], "question": "How many?", "answer": 2}),
    ]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(lines) + "\n")
    samples = sv.load_jsonl(f)
    assert [s["question"] for s in samples] == ["What colour?", "How many?"]
    assert samples[1]["answer"] == "2"
    assert [len(s["images"]) for s in samples] == [1, 2]
    assert samples[1]["images"][1].size == (60, 40) and samples[1]["images"][1].mode == "RGB"
    assert samples[1]["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "How many?"},
    ]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"images": ["a.png"], "question": "q"}), "missing key(s) answer"),
        (json.dumps({"images": [1], "question": "q", "answer": "a"}), '"images" must be a list'),
        (json.dumps({"images": ["a.png"], "question": "", "answer": "a"}), '"question" must be'),
        (json.dumps({"images": ["a.png"], "question": "q", "answer": None}), '"answer" must be'),
        (json.dumps({"images": ["missing.png"], "question": "q", "answer": "a"}), "image not found"),
        (json.dumps({"images": ["bad.png"], "question": "q", "answer": "a"}), "cannot read image"),
    ],
)
def test_jsonl_loader_errors_name_the_line(tmp_path, line, fragment):
    _write_png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    good = json.dumps({"images": ["a.png"], "question": "q", "answer": "a"})
    f = tmp_path / "q.jsonl"
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(QvlError) as exc:
        sv.load_jsonl(f)
    msg = str(exc.value)
    assert fragment in msg and f"{f}:2" in msg and "\n" not in msg


def test_jsonl_loader_file_errors(tmp_path):
    with pytest.raises(QvlError, match="not found"):
        sv.load_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# nothing\n")
    with pytest.raises(QvlError, match="no questions"):
        sv.load_jsonl(empty)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_and_agreement_with_plain_functions():
    samples = sv.make_samples("test", 12)
    truth = {s["question"] + str(s["seed"]): s["answer"] for s in samples}
    seen_messages = []

    def perfect(messages, images):
        seen_messages.append(messages)
        assert len(images) == 1
        # A user turn with one image placeholder and the question text.
        q = messages[0]["content"][1]["text"]
        return next(s["answer"] for s in samples if s["question"] == q and s["images"][0] is images[0]) + ". "

    rep = evaluate(perfect, samples)
    assert rep.accuracy == 1.0 and rep.total == 12 and len(seen_messages) == 12
    assert set(rep.by_kind) <= set(sv.KINDS)

    wrong = evaluate(lambda m, i: "purple elephant", samples)
    assert wrong.accuracy == 0.0
    assert agreement(rep, rep) == 1.0
    assert agreement(rep, wrong) == 0.0
    with pytest.raises(ValueError):
        agreement(rep, evaluate(perfect, samples[:3]))
    assert truth  # silence unused


def test_normalize_answer():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("YES..") == "yes"
    assert normalize_answer("47") == "47"
    rec = EvalRecord("q", "a", "A.", True)
    assert agreement(EvalReport(1.0, 1, 1, 0.0, [rec]), EvalReport(1.0, 1, 1, 0.0, [EvalRecord("q", "a", "a", True)])) == 1.0


# ------------------------------------------------------------------------------------------ sentinel


def _sentinel_dir() -> Path:
    from qvl.toolchain.eval.sentinel import SENTINEL_DIR

    if not (SENTINEL_DIR / "model.safetensors").exists():
        pytest.fail(f"committed sentinel checkpoint missing at {SENTINEL_DIR}; see qvl.toolchain.eval.sentinel")
    return SENTINEL_DIR


def test_sentinel_config_is_the_real_architecture():
    from qvl.toolchain.eval.sentinel import SentinelArch, sentinel_config, special_ids

    cfg = sentinel_config(SentinelArch())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["tie_word_embeddings"] and text["tie_word_embeddings"]
    rope = text["rope_scaling"]
    assert rope["mrope_interleaved"] is True and sum(rope["mrope_section"]) * 2 == text["head_dim"]
    ds = vision["deepstack_visual_indexes"]
    assert 0 < len(ds) <= text["num_hidden_layers"] and all(0 <= i < vision["depth"] for i in ds)
    assert vision["out_hidden_size"] == text["hidden_size"]
    ids = special_ids(SentinelArch().learned_vocab)
    assert cfg["image_token_id"] == ids["<|image_pad|>"] < text["vocab_size"]


def test_committed_sentinel_loads_with_transformers():
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    d = _sentinel_dir()
    files = {p.name for p in d.iterdir()}
    for name in [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "model.safetensors",
    ]:
        assert name in files
    assert sum(p.stat().st_size for p in d.iterdir()) <= 20 * 1024 * 1024

    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        str(d), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(str(d))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]}
    cfg = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    assert cfg["image_token_id"] == ids["<|image_pad|>"]
    assert cfg["video_token_id"] == ids["<|video_pad|>"]
    assert cfg["vision_start_token_id"] == ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == ids["<|vision_end|>"]
    assert cfg["text_config"]["bos_token_id"] == ids["<|endoftext|>"]
    assert cfg["text_config"]["eos_token_id"] == ids["<|im_end|>"]
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]
    # Its own small vocabulary: none of the 2B's special ids.
    assert all(i < QWEN_2B_FIRST_SPECIAL_ID for i in ids.values())
    assert max(ids.values()) < cfg["text_config"]["vocab_size"] < 4096


def test_copy_sentinel(tmp_path):
    from qvl.toolchain.eval.sentinel import SENTINEL_FILES, copy_sentinel

    src = _sentinel_dir()
    out = copy_sentinel(tmp_path / "s")
    # The copy is the committed files plus the marker that lets a later `--overwrite` replace it.
    assert sorted(p.name for p in out.iterdir()) == sorted([*SENTINEL_FILES, ".qvl-output.json"])
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    with pytest.raises(QvlError, match="already exists"):
        copy_sentinel(tmp_path / "s")


def _eager_accuracy(n: int, threads: int = 2):
    from qvl.toolchain.eval.evaluate import eager_answer_fn

    answer = eager_answer_fn(_sentinel_dir(), threads=threads)
    return evaluate(answer, sv.make_samples("test", n))


# The bar: >= 95 % exact match on held-out questions. The committed sentinel (seed 0, 1500 steps,
# toolchain/data/sentinel/sentinel_training.json) scores 99.8 % on the first 500 test-split questions.


def test_sentinel_eager_accuracy_on_held_out_subset():
    t0 = time.perf_counter()
    report = _eager_accuracy(60)
    assert report.total == 60
    assert report.accuracy >= 0.95, report.summary()
    assert time.perf_counter() - t0 < 60, f"too slow for the fast suite: {report.summary()}"


@pytest.mark.slow
def test_sentinel_eager_accuracy_on_500_held_out_questions():
    report = _eager_accuracy(500)
    assert report.accuracy >= 0.95, report.summary()
    assert min(report.by_kind.values()) >= 0.85, report.summary()
