"""qvl.runtime.sampling against transformers' logits processors and generate's processor order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration

from qvl.runtime import sampling as S
from qvl.toolchain.checkpoints.presets import GENERATION_CONFIG, PRESETS

V = 4096


def random_logits(seed: int, scale: float = 4.0, vocab: int = V) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(vocab).astype(np.float32) * np.float32(scale)
    x[rng.integers(0, vocab, size=8)] += np.float32(6.0)  # a few confident tokens, like a real LM head
    return x


def torch_apply(processor, logits: np.ndarray, ids=None) -> np.ndarray:
    ids_t = torch.tensor([ids if ids is not None else [0]], dtype=torch.long)
    return processor(ids_t, torch.from_numpy(logits.copy())[None])[0].numpy()


def assert_same_distribution(ours: np.ndarray, ref: np.ndarray, atol: float = 1e-6):
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))  # identical filtered sets
    p_ours = S.softmax(ours)
    p_ref = torch.softmax(torch.from_numpy(ref), -1).numpy()
    np.testing.assert_allclose(p_ours, p_ref, rtol=0, atol=atol)


SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty(seed, penalty):
    logits = random_logits(seed)
    rng = np.random.default_rng(100 + seed)
    ids = rng.integers(0, V, size=300).tolist() + [V + 5, V + 900]  # duplicates, and ids past the vocab
    ref = torch_apply(RepetitionPenaltyLogitsProcessor(penalty), logits, ids)
    ours = S.apply_repetition_penalty(logits, ids, penalty)
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))  # bit-identical


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.7, 0.3, 1.7])
def test_temperature(seed, temperature):
    logits = random_logits(seed)
    ref = torch_apply(TemperatureLogitsWarper(temperature), logits)
    ours = S.apply_temperature(logits, temperature)
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 20, 50, V + 10])
def test_top_k(seed, k):
    logits = random_logits(seed)
    ref = torch_apply(TopKLogitsWarper(k), logits)
    ours = S.apply_top_k(logits, k)
    np.testing.assert_array_equal(ours, ref)


def test_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0], dtype=np.float32)
    ref = torch_apply(TopKLogitsWarper(3), logits)
    np.testing.assert_array_equal(S.apply_top_k(logits, 3), ref)
    assert np.isfinite(S.apply_top_k(logits, 3)).sum() == 5


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.8, 0.95, 0.5, 0.05, 1.0, 0.0])
def test_top_p(seed, p):
    logits = random_logits(seed, scale=2.0)
    ref = torch_apply(TopPLogitsWarper(p), logits)
    ours = S.apply_top_p(logits, p)
    assert_same_distribution(ours, ref)
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.9, 1.0])
def test_min_p(seed, min_p):
    logits = random_logits(seed, scale=2.0)
    ref = torch_apply(MinPLogitsWarper(min_p), logits)
    assert_same_distribution(S.apply_min_p(logits, min_p), ref)


def test_softmax_matches_torch():
    for seed in SEEDS:
        x = random_logits(seed, scale=8.0)
        x[::7] = -np.inf
        np.testing.assert_allclose(S.softmax(x), torch.softmax(torch.from_numpy(x), -1).numpy(), rtol=0, atol=3e-7)


@pytest.fixture(scope="module")
def meta_lm():
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(**PRESETS["tiny"].config))


CONFIGS = [
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0),  # Qwen3-VL defaults
    dict(do_sample=True, temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.1),
    dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.9, min_p=0.02, repetition_penalty=0.9),
    dict(do_sample=True, top_k=0, min_p=0.1),
    dict(do_sample=True, temperature=0.2, top_k=5),
    dict(do_sample=True, top_p=0.9),  # top_k unset: generate's global default 50 applies
    dict(do_sample=True),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(do_sample=False, temperature=0.7, top_k=20, top_p=0.8),  # warpers ignored when greedy
    dict(),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_pipeline_matches_generate_processor_list(meta_lm, cfg):
    """The processor list `generate` itself builds (same defaults, same order) vs `process_logits`."""
    gen, _ = meta_lm._prepare_generation_config(None, **cfg)
    processors = meta_lm._get_logits_processor(generation_config=gen, input_ids_seq_length=40, device="cpu")
    ours_cfg = S.SamplingConfig.from_generation_config(cfg)
    assert ours_cfg == S.SamplingConfig(**cfg)  # constructor defaults == generate's defaults
    for seed in SEEDS:
        logits = random_logits(seed, scale=3.0)
        ids = np.random.default_rng(seed).integers(0, V, size=40).tolist()
        ref = torch_apply(processors, logits, ids)
        ours = S.process_logits(logits, ours_cfg, ids)
        assert_same_distribution(ours, ref)
        if not ours_cfg.do_sample:
            assert S.Sampler(0).next_token(logits, ours_cfg, ids) == int(np.argmax(ref))


def test_processor_order_matters_and_is_transformers_order():
    # top_k then top_p (renormalised over the top-k) keeps 2 tokens; top_p first would keep 3.
    logits = np.zeros(100, dtype=np.float32)
    logits[[10, 20, 30]] = [2.0, 2.01, 2.02]
    cfg = S.SamplingConfig(do_sample=True, temperature=0.9, top_k=3, top_p=0.5)
    ours = S.process_logits(logits, cfg, None)
    manual = S.apply_top_p(S.apply_top_k(S.apply_temperature(logits, 0.9), 3), 0.5)
    np.testing.assert_array_equal(ours, manual)
    assert np.flatnonzero(np.isfinite(ours)).tolist() == [20, 30]
    swapped = S.apply_top_k(S.apply_top_p(S.apply_temperature(logits, 0.9), 0.5), 3)
    assert np.flatnonzero(np.isfinite(swapped)).tolist() == [10, 20, 30]


def test_greedy_ties_lowest_index():
    for logits in ([1.0, 5.0, 5.0, 2.0], [7.0, 7.0], [-np.inf, 0.0, 0.0], [3.0, -1.0, 3.0, 3.0]):
        x = np.asarray(logits, dtype=np.float32)
        assert S.greedy(x) == int(torch.argmax(torch.from_numpy(x)))
    assert S.Sampler().next_token(np.array([0.0, 2.0, 2.0], dtype=np.float32)) == 1


def test_greedy_repetition_penalty_changes_choice():
    logits = np.array([0.0, 2.0, 1.9, -1.0], dtype=np.float32)
    cfg = S.SamplingConfig(do_sample=False, repetition_penalty=1.2)
    assert S.Sampler().next_token(logits, cfg, [1]) == 2
    assert S.Sampler().next_token(logits, S.SamplingConfig(), [1]) == 1


def test_sampler_reproducible_and_respects_filter():
    cfg = S.SamplingConfig.from_generation_config(GENERATION_CONFIG)
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p) == (True, 0.7, 20, 0.8)
    logits = [random_logits(s, scale=1.0) for s in range(50)]
    a = [S.Sampler(123).next_token(x, cfg) for x in logits]
    s1, s2 = S.Sampler(123), S.Sampler(123)
    seq1 = [s1.next_token(x, cfg) for x in logits]
    seq2 = [s2.next_token(x, cfg) for x in logits]
    assert seq1 == seq2
    assert a[0] == seq1[0]
    for x, t in zip(logits, seq1):
        assert np.isfinite(S.process_logits(x, cfg)[t])  # only kept tokens are drawn
    assert [S.Sampler(7).next_token(x, cfg) for x in logits] != seq1


def test_sampler_frequencies_follow_probabilities():
    scores = np.array([np.log(0.5), np.log(0.3), -np.inf, np.log(0.2)], dtype=np.float32)
    sampler = S.Sampler(0)
    draws = np.bincount([sampler.sample(scores) for _ in range(20000)], minlength=4) / 20000
    assert draws[2] == 0
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.0, 0.2], atol=0.015)


def test_config_validation():
    with pytest.raises(ValueError):
        S.SamplingConfig(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError):
        S.SamplingConfig(top_p=1.5)
    with pytest.raises(TypeError):
        S.SamplingConfig.from_generation_config({}, typo_k=3)
    c = S.SamplingConfig.from_generation_config(GENERATION_CONFIG, temperature=1.2, top_k=None)
    assert c.temperature == 1.2 and c.top_k == 20
    c = S.SamplingConfig.from_generation_config({"do_sample": True, "top_k": None, "foo": 1})
    assert c.top_k == 50 and c.top_p == 1.0


def test_runtime_sampling_imports_no_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(S))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "transformers"}
