"""Sampling against transformers' logits processors; stop strings; the generator's cache reuse."""

from __future__ import annotations

import pytest
import torch

from phimoe_cli.generation import GenerationError, Generator, Sampler, SamplingParams, StopStrings
from phimoe_cli.model import load_model
from phimoe_cli.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402


def reference_probs(logits, history, p: SamplingParams):
    """transformers' processors in generate()'s order, then softmax."""
    scores = logits[None].clone()
    ids = history[None]
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    chain.append(lp.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(lp.TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(lp.TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        chain.append(lp.MinPLogitsWarper(p.min_p))
    for proc in chain:
        scores = proc(ids, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=20, top_p=1.0),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.95, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=2.0, top_p=1.0, repetition_penalty=0.8),
    ],
)
def test_distribution_matches_transformers(params):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(500, generator=g) * 3
        history = torch.randint(0, 500, (40,), generator=g)
        ours = Sampler(params).probabilities(logits, history)
        ref = reference_probs(logits, history, params)
        assert torch.equal(ours > 0, ref > 0)  # the same tokens survive
        assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("scale", [0.05, 3.0, 8.0])  # flat: the nucleus outgrows the candidates; peaked: it does not
def test_top_p_over_a_full_vocabulary_matches_transformers(scale):
    g = torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=0.7, top_p=0.95, min_p=0.0)
    for _ in range(3):
        logits = torch.randn(32064, generator=g) * scale
        history = torch.randint(0, 32064, (10,), generator=g)
        ours = Sampler(params).probabilities(logits, history)
        ref = reference_probs(logits, history, params)
        assert torch.equal(ours > 0, ref > 0)
        assert torch.allclose(ours, ref, atol=1e-6)


def test_draws_follow_the_distribution():
    """What __call__ samples (from the candidates only) has the frequencies of probabilities()."""
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(8)) * 2.5
    sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=1))
    probs = sampler.probabilities(logits)
    draws = torch.tensor([sampler(logits) for _ in range(6000)])
    freq = torch.bincount(draws, minlength=len(probs)).float() / len(draws)
    assert freq[probs == 0].sum() == 0  # nothing outside the nucleus
    assert (freq - probs).abs().max() < 0.02


def test_padding_ids_are_never_sampled():
    allowed = torch.ones(100, dtype=torch.bool)
    allowed[90:] = False
    logits = torch.zeros(100)
    logits[95] = 50.0  # a padding row the model "prefers"
    greedy = Sampler(SamplingParams(temperature=0), allowed)
    assert greedy(logits) != 95
    hot = Sampler(SamplingParams(temperature=5.0, top_p=1.0, seed=0), allowed)
    draws = {hot(logits) for _ in range(300)}
    assert draws and max(draws) < 90


def test_seeded_sampler_is_reproducible():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = Sampler(SamplingParams(temperature=1.0, seed=3))
    b = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


@pytest.mark.parametrize("name, value", [("temperature", -0.1), ("temperature", 1e-45), ("top_p", 0.0),
                                         ("top_p", 1.5), ("min_p", 1.0), ("top_k", -1), ("repetition_penalty", 0.0),
                                         ("seed", 2**70), ("seed", -1)])
def test_bad_sampling_values(name, value):
    with pytest.raises(GenerationError, match=name):
        SamplingParams(**{name: value}).validate()


def test_stop_strings_hold_back_only_possible_prefixes():
    s = StopStrings(["</end>", "STOP"])
    assert s.push("hello <") == ("hello ", False)
    assert s.push("/e") == ("", False)
    assert s.push("x and S") == ("</ex and ", False)
    assert s.push("TOP here") == ("", True)
    s = StopStrings(["ab"])
    assert s.push("xa") == ("x", False)
    assert s.flush() == "a"


@pytest.fixture(scope="module")
def gen(model_dir):
    return Generator(load_model(model_dir), Tokenizer.from_dir(model_dir))


def test_cache_reuse_prefills_only_new_tokens(gen):
    tok = gen.tokenizer
    params = SamplingParams(temperature=0)
    turn1 = tok.apply_chat([{"role": "user", "content": "Hello there"}])
    cache = gen.new_cache()
    reply1 = list(gen.stream(turn1, params, 8, ignore_eos=True, cache=cache))
    assert gen.result.prefill_tokens == len(turn1)
    messages = [{"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "".join(reply1)},
                {"role": "user", "content": "And then?"}]
    turn2 = tok.apply_chat(messages)
    held = turn1 + gen.result.token_ids[:-1]  # the cache holds all but the last reply token
    common = next((i for i, (a, b) in enumerate(zip(held, turn2, strict=False)) if a != b), min(len(held), len(turn2)))
    assert common >= len(turn1)
    reused = list(gen.stream(turn2, params, 8, ignore_eos=True, cache=cache))
    assert gen.result.prefill_tokens == len(turn2) - common  # only what follows the shared prefix
    fresh = list(gen.stream(turn2, params, 8, ignore_eos=True))
    assert reused == fresh  # and the reply is the same as without the cache


def test_prompt_that_does_not_fit(gen):
    with pytest.raises(GenerationError, match="does not fit"):
        list(gen.stream(list(range(100, 100 + gen.context_length)), SamplingParams(), 4))
