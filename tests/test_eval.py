"""`qvl-compile eval`: the sentinel's artifact answers exactly what eager answers, question by question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

SENTINEL = Path(__file__).resolve().parents[1] / "toolchain" / "data" / "sentinel"


@pytest.fixture(scope="module")
def sentinel_artifact(tmp_path_factory):
    if not (SENTINEL / "model.safetensors").is_file():
        pytest.fail(f"the committed sentinel checkpoint is missing at {SENTINEL}")
    from qvl.toolchain.compile.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("sentinel") / "art"
    compile_artifact(SENTINEL, "cpu", out)
    return out


def test_artifact_answers_equal_eager_question_by_question(sentinel_artifact):
    from qvl.runtime import load
    from qvl.toolchain.eval.evaluate import agreement, eager_answer_fn, evaluate
    from qvl.toolchain.eval.synthetic_vqa import make_samples

    samples = make_samples("test", 24)
    model = load(sentinel_artifact, threads=1)
    art = evaluate(lambda m, im: model.generate(m, images=im, max_new_tokens=8), samples)
    eager = evaluate(eager_answer_fn(SENTINEL, max_new_tokens=8, threads=1), samples)
    assert [r.predicted for r in art.records] == [r.predicted for r in eager.records]
    assert agreement(art, eager) == 1.0
    assert art.accuracy == eager.accuracy


def test_eval_cli_json(sentinel_artifact):
    proc = run_cli("eval", str(sentinel_artifact), "--n", "8", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["total"] == 8 and 0.0 <= out["accuracy"] <= 1.0 and set(out["by_kind"]) <= {"colour", "count", "left", "number"}


def test_eval_cli_bad_jsonl_is_a_user_error(sentinel_artifact, tmp_path):
    from conftest import assert_one_line_error

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert_one_line_error(run_cli("eval", str(sentinel_artifact), "--set", str(bad)), "q.jsonl")
