"""The runner protocol (`runtime/backends/`) and device selection: real ORT sessions on the tiny artifacts."""

from __future__ import annotations

import inspect
import json

import pytest

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_cpu_only = pytest.mark.skipif(_cuda_provider(), reason="this onnxruntime has the CUDA provider")

MSGS = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]


def _params(fn):
    # Names, kinds and defaults; annotations name each backend's own cache type (KVCache / TrtKVCache).
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_both_backends_implement_the_protocol_with_the_same_signatures():
    from qvl.runtime.backends.base import PROTOCOL_METHODS, Runner
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.tensorrt import TrtEngine

    declared = {n for n, v in vars(Runner).items() if callable(v) and not n.startswith("_")}
    assert declared == set(PROTOCOL_METHODS)
    for name in PROTOCOL_METHODS:
        want = _params(getattr(Runner, name))
        for cls in (Engine, TrtEngine):
            assert _params(getattr(cls, name)) == want, (cls.__name__, name)


def test_ort_runner_has_every_protocol_attribute(tiny_artifact):
    from qvl.runtime.backends.base import PROTOCOL_ATTRIBUTES, Runner
    from qvl.runtime.backends.ort import Engine

    eng = Engine(tiny_artifact, threads=1)
    assert isinstance(eng, Runner)
    for attr in PROTOCOL_ATTRIBUTES:
        assert hasattr(eng, attr), attr
    assert eng.device == "cpu" and eng.context_length == eng.model_info.context_length


@needs_cpu_only
def test_load_auto_falls_back_to_cpu_and_says_why(tiny_artifact, tiny_cpu_artifact):
    from qvl.runtime import load
    from qvl.runtime.backends.select import resolve

    model = load(tiny_artifact, threads=1)  # device="auto" is the default
    assert model.device == "cpu" and model.engine.device == "cpu"
    assert model.device_note == "running on CPU: onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    assert load(tiny_artifact, device="cpu", threads=1).device_note is None
    sel = resolve(tiny_cpu_artifact, "auto")
    assert sel.device == "cpu" and "no CUDA provider" in sel.note


def test_shared_cache_artifact_stays_on_cpu_under_auto(tiny_artifact, tiny_cpu_artifact):
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.backends.select import cuda_blocker

    assert "GroupQueryAttention" in cuda_blocker(read_manifest(tiny_cpu_artifact, verify_graphs=False))
    assert cuda_blocker(read_manifest(tiny_artifact, verify_graphs=False)) is None


@needs_cpu_only
def test_python_api_device_errors(tiny_artifact):
    from qvl.runtime import load
    from qvl.runtime.backends.ort import Engine

    with pytest.raises(QvlError, match="no CUDA provider") as e:
        load(tiny_artifact, device="cuda")
    assert "pip install onnxruntime-gpu" in e.value.hint
    with pytest.raises(QvlError, match="no CUDA provider"):
        Engine(tiny_artifact, device="cuda")
    with pytest.raises(QvlError, match="unknown device 'gpu'") as e:
        load(tiny_artifact, device="gpu")
    assert e.value.hint == "use one of: auto, cpu, cuda, trt"
    with pytest.raises(QvlError, match="needs a TensorRT engine kit"):
        load(tiny_artifact, device="trt")


@needs_cpu_only
def test_run_device_auto_notes_cpu_once_and_answers_like_cpu(tiny_cpu_artifact):
    args = ("run", str(tiny_cpu_artifact), "--prompt", "Hello there", "--max-new-tokens", "6", "--threads", "1", "--json",
            "--greedy")
    auto = run_cli(*args, "--device", "auto")
    cpu = run_cli(*args, "--device", "cpu")
    default = run_cli(*args)
    for p in (auto, cpu, default):
        assert p.returncode == 0, p.stderr
    note = "note: running on CPU: onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    assert auto.stderr.count("note:") == 1 and note in auto.stderr, auto.stderr
    assert default.stderr.count("note:") == 1
    assert "note:" not in cpu.stderr, cpu.stderr
    a, c = json.loads(auto.stdout), json.loads(cpu.stdout)
    assert a["text"] == c["text"] and a["generated_tokens"] == c["generated_tokens"] == 6


@needs_cpu_only
def test_run_device_cuda_without_provider_is_one_line_error(tiny_artifact):
    proc = run_cli("run", str(tiny_artifact), "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(proc, "no CUDA provider", "pip install onnxruntime-gpu")


def test_run_device_trt_on_an_ort_artifact_is_one_line_error(tiny_artifact):
    proc = run_cli("run", str(tiny_artifact), "--prompt", "hi", "--device", "trt")
    assert_one_line_error(proc, "needs a TensorRT engine kit", "compile --target sm61")


def test_unknown_device_lists_the_accepted_values(tiny_artifact):
    proc = run_cli("run", str(tiny_artifact), "--prompt", "hi", "--device", "bogus")
    assert_one_line_error(proc, "unknown device 'bogus'", "auto, cpu, cuda, trt")
    proc = run_cli("eval", str(tiny_artifact), "--n", "1", "--device", "bogus")
    assert_one_line_error(proc, "unknown device 'bogus'", "auto, cpu, cuda, trt")


@needs_cpu_only
def test_bench_resolves_the_device_before_running(tiny_artifact, tiny_checkpoint):
    proc = run_cli("bench", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint), "--device", "cuda")
    assert_one_line_error(proc, "no CUDA provider")


def test_model_frees_every_cache(tiny_cpu_artifact):
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model

    class Counting(Engine):  # the real ORT runner, counting its frees
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.made, self.freed = [], []

        def new_cache(self, capacity, batch=1):
            cache = super().new_cache(capacity, batch)
            self.made.append(cache)
            return cache

        def free(self, cache):
            self.freed.append(cache)
            super().free(cache)

    runner = Counting(tiny_cpu_artifact, threads=1)
    model = Model(runner)
    assert model.device == "cpu" and model.device_note is None
    full = model.generate(MSGS, max_new_tokens=6)  # runs to max_new_tokens
    assert len(runner.freed) == 1 and runner.freed[0] is runner.made[0]
    assert runner.made[0].tensors == [] and runner.made[0].buffers == []
    model.generate(MSGS, max_new_tokens=6, stop=[full[:1]] if full else None)  # a stop string ends it early
    assert len(runner.freed) == 2
    ids = model.generate_ids(model.prepare(MSGS), 6)
    next(ids)
    ids.close()  # a consumer that stops reading
    assert len(runner.freed) == 3
    assert [id(c) for c in runner.made] == [id(c) for c in runner.freed]


def test_model_over_a_runner_matches_load(tiny_cpu_artifact):
    from qvl.runtime import load
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.model import Model

    prompt_of = lambda m: m.prepare(MSGS)  # noqa: E731
    a = Model(Engine(tiny_cpu_artifact, threads=1))
    b = load(tiny_cpu_artifact, device="cpu", threads=1)
    ids_a = [t for t, _ in a.generate_ids(prompt_of(a), 8)]
    ids_b = [t for t, _ in b.generate_ids(prompt_of(b), 8)]
    assert ids_a == ids_b and len(ids_a) >= 1


def test_capability_rules_for_gpu_targets():
    from qvl.runtime.backends.select import capability_blocker

    assert capability_blocker("cuda", (9, 0)) is None and capability_blocker("cuda", (7, 5)) is None
    why = capability_blocker("cuda", (6, 1))  # an fp16 artifact on a Pascal card: the wrong build
    assert "SM 7.5+" in why and "SM 6.1" in why and "--target cuda-sm61" in why
    assert capability_blocker("cuda-sm61", (6, 1)) is None and capability_blocker("cuda-sm61", (5, 2)) is not None
    assert capability_blocker("cuda", None) is None  # unknown capability: the provider's own start decides
    assert capability_blocker("cpu-avx2", (6, 1)) is None
