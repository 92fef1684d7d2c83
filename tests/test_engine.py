"""The engine the front ends share: prompts from messages, text or ids; a prefix cache that
changes nothing but the work done; streams that end cleanly when closed."""

from __future__ import annotations

import pytest

from phimoe_cli.engine import LocalEngine, Request
from phimoe_cli.params import SamplingParams
from phimoe_cli.runtime import load

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(str(model_dir), progress=False)


def run(engine, request):
    stream = engine.generate(request)
    text = "".join(stream)
    return text, stream.completion


def test_prompts_from_messages_text_and_ids(loaded):
    engine, tok = LocalEngine(loaded), loaded.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert engine.prompt_ids(Request(messages=messages)) == tok.apply_chat(messages, add_generation_prompt=True)
    assert engine.prompt_ids(Request(text="Hi there")) == tok.encode("Hi there")
    assert engine.prompt_ids(Request(token_ids=[5, 6, 7])) == [5, 6, 7]


def test_a_shared_prefix_is_reused_and_changes_nothing(loaded):
    """The second request resends the first conversation plus a reply and a new question, as a
    chat or an API client does: only the new tokens are computed, and the reply is the one a
    fresh engine gives."""
    first = [{"role": "user", "content": "Tell me about rivers"}]
    engine = LocalEngine(loaded)
    reply, done = run(engine, Request(messages=first, params=GREEDY, max_new_tokens=6, ignore_eos=True))
    assert done.cached_tokens == 0 and done.completion_tokens == 6 and done.text == reply
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And lakes?"}]
    again, done2 = run(engine, Request(messages=second, params=GREEDY, max_new_tokens=6, ignore_eos=True))
    fresh, done_fresh = run(LocalEngine(loaded), Request(messages=second, params=GREEDY, max_new_tokens=6,
                                                         ignore_eos=True))
    shared = 0
    for a, b in zip(done.prompt_token_ids, done2.prompt_token_ids, strict=False):
        if a != b:
            break
        shared += 1
    assert done2.cached_tokens >= shared > 0  # at least the first prompt came from the cache
    assert done2.cached_tokens + done2.prefill_tokens == done2.prompt_tokens
    assert done_fresh.cached_tokens == 0
    assert again == fresh and done2.token_ids == done_fresh.token_ids  # the cache changed only the work


def test_an_unrelated_prompt_starts_over(loaded):
    engine = LocalEngine(loaded)
    run(engine, Request(text="alpha beta gamma", params=GREEDY, max_new_tokens=3, ignore_eos=True))
    _, done = run(engine, Request(text="zeta eta", params=GREEDY, max_new_tokens=3, ignore_eos=True))
    assert done.cached_tokens == 0


def test_closing_a_stream_keeps_what_came(loaded):
    engine = LocalEngine(loaded)
    stream = engine.generate(Request(text="Once upon", params=GREEDY, max_new_tokens=40, ignore_eos=True))
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            break
    stream.close()
    done = stream.completion
    assert done.finish_reason == "interrupted" and done.text == "".join(pieces)
    assert 3 <= done.completion_tokens < 40
    # the time of the tokens that came is kept (it was lost when the stream was closed mid-reply)
    assert done.decode_s > 0 and done.decode_tokens_per_s > 0


def test_the_longrope_recompute_is_announced_before_it_runs(loaded):
    """The one long pause of a generation: the step that takes the sequence past the boundary
    computes every cached token again; the caller hears of it once, before, with the token count."""
    boundary = loaded.model.config.original_max_position_embeddings
    engine = LocalEngine(loaded)
    heard = []

    def on_recompute(n):
        heard.append((n, engine.cache.length, engine.cache.long_rope))

    prompt = engine.prompt_ids(Request(text="Once upon a time"))
    _, done = run(engine, Request(token_ids=prompt, params=GREEDY, max_new_tokens=boundary, ignore_eos=True,
                                  on_recompute=on_recompute))
    # heard while the cache still held the first `boundary` tokens, rotated with the short factors
    assert heard == [(boundary + 1, boundary, False)] and done.recomputed
    # the same reply without being told: the same tokens (being told changes nothing)
    _, again = run(LocalEngine(loaded), Request(token_ids=prompt, params=GREEDY, max_new_tokens=boundary,
                                                ignore_eos=True))
    assert again.token_ids == done.token_ids
    heard.clear()  # a fresh prompt past the boundary is computed once, with the long factors: no pause
    run(LocalEngine(loaded), Request(token_ids=[5] * (boundary + 8), params=GREEDY, max_new_tokens=4,
                                     ignore_eos=True, on_recompute=on_recompute))
    assert heard == []


def conversation(topic: str) -> list[dict]:
    return [{"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": f"Tell me of {topic}"}]


def test_a_cache_budget_keeps_interleaved_conversations(loaded):
    """Two clients take turns, each resending its own growing conversation (as API clients do).
    With one cache the second client's request rewinds the first one's to the shared system prompt;
    with a budget each conversation keeps its cache, and every reply is what a fresh engine gives."""
    one, pool = LocalEngine(loaded), LocalEngine(loaded, cache_budget=64 * 2**20)
    turn = {"params": GREEDY, "max_new_tokens": 5, "ignore_eos": True}
    for engine in (one, pool):
        a_reply, a1 = run(engine, Request(messages=conversation("rivers"), **turn))
        _, b1 = run(engine, Request(messages=conversation("mountains"), **turn))
        a_next = [*conversation("rivers"), {"role": "assistant", "content": a_reply},
                  {"role": "user", "content": "More"}]
        text, a2 = run(engine, Request(messages=a_next, **turn))
        fresh, fresh_done = run(LocalEngine(loaded), Request(messages=a_next, **turn))
        assert text == fresh and a2.token_ids == fresh_done.token_ids
        shared_system = len(loaded.tokenizer.apply_chat(conversation("rivers")[:1], add_generation_prompt=False)) - 1
        assert b1.cached_tokens >= shared_system - 1  # the system prompt is reused by both
        if engine is one:
            assert a2.cached_tokens < a1.prompt_tokens  # rewound by the other conversation
        else:
            assert a2.cached_tokens >= a1.prompt_tokens  # its whole first turn came from the cache
            assert len(engine.caches.entries) == 2
    assert len(one.caches.entries) == 1


def test_the_budget_bounds_the_caches(loaded):
    engine = LocalEngine(loaded, cache_budget=1)  # room for nothing but the cache in use
    for topic in ("rivers", "lakes", "seas"):
        run(engine, Request(messages=conversation(topic), params=GREEDY, max_new_tokens=3, ignore_eos=True))
        assert len(engine.caches.entries) == 1


def test_logprobs_are_the_models_own(loaded):
    """Each generated token's log-probability and the top alternatives equal a teacher-forced pass
    over prompt + reply (one forward, no cache), whatever the sampling settings."""
    engine = LocalEngine(loaded)
    params = SamplingParams(temperature=1.5, top_k=5, seed=3)
    stream = engine.generate(Request(text="The sea is", params=params, max_new_tokens=8, ignore_eos=True, logprobs=3))
    "".join(stream)
    done = stream.completion
    ids = done.prompt_token_ids + done.token_ids
    ref = engine.log_probs(ids)[len(done.prompt_token_ids) - 1 :]
    real = loaded.tokenizer.valid_token_mask(ref.shape[1])
    ref = ref.masked_fill(~real, float("-inf"))
    ref = ref - ref.logsumexp(-1, keepdim=True)  # over the real tokens only
    assert len(done.logprobs) == len(done.token_ids) == 8 and stream.logprobs == done.logprobs
    for k, (entry, token) in enumerate(zip(done.logprobs, done.token_ids, strict=True)):
        assert entry.token_id == token
        assert abs(entry.logprob - float(ref[k, token])) < 1e-4
        top = ref[k].topk(3)
        assert [i for i, _ in entry.top] == top.indices.tolist()
        assert all(abs(a - b) < 1e-4 for (_, a), b in zip(entry.top, top.values.tolist(), strict=True))
