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
