"""Decoding defaults from the checkpoint's generation_config.json: `run` / `chat` sample as the published
Qwen3-VL-Instruct file says, `--greedy` gives the argmax answer, flags override single values, and a bad file is
a one-line error at export. The Python API and parity / eval / bench stay greedy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError
from qvl.runtime.generation_defaults import GenerationDefaults, resolve_decoding
from qvl.runtime.sampling import SamplingConfig
from qvl.toolchain.checkpoints.presets import generation_config

PROMPT = "describe the weather"
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]  # what `run --prompt` sends
PUBLISHED = GenerationDefaults.from_dict(generation_config())  # what make-checkpoint writes


@pytest.fixture(scope="module")
def model(tiny_artifact):
    from qvl.runtime import load

    return load(tiny_artifact, device="cpu", threads=1)


@pytest.fixture(scope="module")
def answers(model):
    """The Python API's answers: greedy (its default) and sampled with the published values, seed 0."""
    return {"greedy": model.generate(MESSAGES, max_new_tokens=8),
            "sampled": model.generate(MESSAGES, max_new_tokens=8, temperature=0.7, top_p=0.8, top_k=20, seed=0)}


def _run(art, *flags):
    return run_cli("run", str(art), "--prompt", PROMPT, "--max-new-tokens", "8", "--threads", "1", "--device",
                   "cpu", *flags)


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _rerecord(art) -> None:
    from qvl.artifacts.manifest import write_manifest

    fields = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {k: v for k, v in fields.items() if k not in ("format", "format_version", "created")})


# -- the file -------------------------------------------------------------------------------------------------


def test_make_checkpoint_writes_the_published_sampling_defaults(tiny_checkpoint, tiny_artifact, model):
    ckpt = GenerationDefaults.from_dir(tiny_checkpoint)
    assert ckpt == PUBLISHED and ckpt.do_sample is True and ckpt.file == "generation_config.json"
    assert (ckpt.temperature, ckpt.top_p, ckpt.top_k, ckpt.repetition_penalty) == (
        generation_config()["temperature"], generation_config()["top_p"], generation_config()["top_k"],
        generation_config()["repetition_penalty"])
    assert GenerationDefaults.from_dir(tiny_artifact) == ckpt == model.generation_defaults  # carried as a side file
    assert "generation_config.json" in json.loads((tiny_artifact / "manifest.json").read_text())["side_files"]
    assert set(model.stop_ids) >= set(ckpt.eos_token_id)


@pytest.mark.parametrize("field,value,needle", [
    ("do_sample", "yes", "do_sample must be true or false"),
    ("temperature", "hot", "temperature must be a finite number >= 0"),
    ("temperature", -0.5, "temperature must be a finite number >= 0"),
    ("temperature", 0, "temperature must be > 0 when do_sample is true"),
    ("top_p", 0, "top_p must be a number in (0, 1]"),
    ("top_p", 1.5, "top_p must be a number in (0, 1]"),
    ("top_k", 2.5, "top_k must be an integer >= 0"),
    ("top_k", True, "top_k must be an integer >= 0"),
    ("repetition_penalty", 0, "repetition_penalty must be a finite number > 0"),
    ("min_p", 2, "min_p must be a number in [0, 1]"),
    ("eos_token_id", "<|im_end|>", "eos_token_id must be a token id or a list of token ids"),
])
def test_bad_values_are_one_line_errors_naming_the_field(field, value, needle):
    with pytest.raises(QvlError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        GenerationDefaults.from_dict({**generation_config(), field: value})
    assert "generation_config.json" in str(e.value) and "generation_config.json" in e.value.hint


def test_export_refuses_a_bad_generation_config_before_writing(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({**generation_config(), "top_p": 1.5}))
    out = tmp_path / "art"
    assert_one_line_error(run_cli("export", str(ckpt), "--out", str(out)), "generation_config.json",
                          "top_p must be a number in (0, 1], got 1.5")
    assert not out.exists()


# -- the rule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [
    ({}, SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0)),
    ({"greedy": True}, SamplingConfig(do_sample=False, repetition_penalty=None)),
    ({"temperature": 0}, SamplingConfig(do_sample=False, repetition_penalty=None)),
    ({"temperature": 1.2}, SamplingConfig(do_sample=True, temperature=1.2, top_k=20, top_p=0.8, repetition_penalty=1.0)),
    ({"top_k": 5}, SamplingConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.0)),
    ({"top_p": 0.5, "top_k": 0}, SamplingConfig(do_sample=True, temperature=0.7, top_k=0, top_p=0.5, repetition_penalty=1.0)),
    ({"speculative": True}, SamplingConfig(do_sample=False, repetition_penalty=None)),
], ids=str)
def test_the_resolved_decoding_is_what_model_stream_decodes_with(model, flags, expected):
    """`Decoding.stream_kwargs()` handed to `Model.stream` gives exactly the SamplingConfig it describes."""
    from qvl.runtime.model import _sampling_config

    d = resolve_decoding(model.generation_defaults, **flags)
    kw = d.stream_kwargs()
    got = _sampling_config(model.generation_config, kw["temperature"], kw["top_p"], kw["top_k"],
                           kw["repetition_penalty"])
    assert got == expected and d.sample == expected.do_sample
    if d.sample:
        assert (d.temperature, d.top_p, d.top_k) == (got.temperature, got.top_p, got.top_k)


def test_without_the_file_or_with_do_sample_false_it_is_greedy_keeping_the_penalty():
    none = resolve_decoding(GenerationDefaults())
    assert not none.sample and none.source == "no generation_config.json" and none.describe().startswith("greedy")
    off = resolve_decoding(GenerationDefaults.from_dict({"do_sample": False, "temperature": 0.7,
                                                         "repetition_penalty": 1.3}))
    assert not off.sample and off.repetition_penalty == 1.3 and "repetition penalty 1.3" in off.describe()
    assert resolve_decoding(GenerationDefaults.from_dict({"do_sample": True})).temperature == 1.0  # generate's default
    assert resolve_decoding(GenerationDefaults.from_dict({"do_sample": True})).top_k == 50


def test_greedy_with_sampling_flags_is_refused():
    with pytest.raises(QvlError, match="--greedy cannot be combined with --temperature, --top-k"):
        resolve_decoding(PUBLISHED, greedy=True, temperature=0.5, top_k=3)
    assert not resolve_decoding(PUBLISHED, greedy=True, temperature=0).sample  # 0 = greedy: no conflict


# -- the commands ---------------------------------------------------------------------------------------------


def test_run_samples_with_the_artifacts_defaults_and_greedy_gives_the_api_answer(tiny_artifact, answers):
    default = _json(_run(tiny_artifact, "--json"))
    assert default["decoding"] == {"mode": "sample", "source": "generation_config.json", "temperature": 0.7,
                                   "top_p": 0.8, "top_k": 20, "seed": 0, "repetition_penalty": 1.0}
    assert default["text"] == answers["sampled"]  # the same draw as the API with the same values and seed
    assert answers["sampled"] != answers["greedy"]  # (on this model they differ: the default really samples)
    greedy = _json(_run(tiny_artifact, "--json", "--greedy"))
    assert greedy["decoding"] == {"mode": "greedy", "source": "--greedy"} and greedy["text"] == answers["greedy"]
    # top-k 1 keeps only the argmax: sampling with it is greedy decoding, whatever the other values say
    top1 = _run(tiny_artifact, "--top-k", "1")
    assert top1.returncode == 0, top1.stderr
    assert top1.stdout.strip("\n") == answers["greedy"]
    assert "sampled: temperature 0.7, top-p 0.8, top-k 1 (generation_config.json, --greedy" in top1.stderr


def test_run_on_an_artifact_without_generation_config_is_greedy(tiny_artifact, answers, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    (art / "generation_config.json").unlink()
    _rerecord(art)
    out = _json(_run(art, "--json"))
    assert out["decoding"] == {"mode": "greedy", "source": "no generation_config.json"}
    assert out["text"] == answers["greedy"]


def _chat(art, stdin: str, *flags):
    proc = subprocess.run(
        [sys.executable, "-c", "from qvl.cli import main; main()", "chat", str(art), "--max-new-tokens", "8",
         "--threads", "1", "--device", "cpu", *flags],
        input=stdin, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    return [a.strip("\n") for a in proc.stdout.split("> ") if a.strip("\n")], proc.stderr


def test_chat_states_its_decoding_and_answers_like_the_api(tiny_artifact, answers):
    sampled, err = _chat(tiny_artifact, PROMPT + "\n")
    assert "chat: decoding sampled: temperature 0.7, top-p 0.8, top-k 20 (generation_config.json" in err
    assert sampled == [answers["sampled"]]
    greedy, err = _chat(tiny_artifact, PROMPT + "\n", "--greedy", "--no-prefix-cache")
    assert "chat: decoding greedy\n" in err and greedy == [answers["greedy"]]


@pytest.mark.parametrize("cmd,flags,needle", [
    ("run", ("--greedy", "--temperature", "0.5"), "--greedy cannot be combined with --temperature"),
    ("chat", ("--greedy", "--top-k", "3"), "--greedy cannot be combined with --top-k"),
    ("chat", ("--top-p", "0"), "--top-p must be a number in (0, 1]"),
])
def test_conflicting_or_bad_decoding_flags_are_usage_errors(cmd, flags, needle):
    args = ("run", "ART", "--prompt", "hi") if cmd == "run" else ("chat", "ART")
    assert_one_line_error(run_cli(*args, *flags), needle)
