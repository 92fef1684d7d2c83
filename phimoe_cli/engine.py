"""The engine the front ends share: a loaded model and tokenizer, and a prefix cache.

A front end (``phimoe generate``, the chat REPL, later a server) builds a ``Request`` (chat
messages, raw text or token ids, with sampling settings and stops), calls ``engine.generate`` and
iterates the ``Stream`` for text pieces; afterwards ``stream.completion`` says what happened:
text, ids, finish reason, usage (prompt, cached and generated tokens) and timings.

The engine keeps KV caches of the sequences it computed (``PrefixCache``: one, or as many as a byte
budget holds). Each request reuses the one sharing the longest prefix with its prompt and prefills
only the rest: a chat that resends its conversation every turn, or a server client that does, pays
only for the new tokens. Ctrl+C (KeyboardInterrupt) while
generating, or ``stream.close()``, ends the reply cleanly with finish reason "interrupted".

Everything a front end needs goes through this interface, so that another engine (one that talks
to a remote OpenAI-compatible server) can stand in for it; token ids are then optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch comes with the model only: a remote front end (remote.py) starts without it
    from phimoe_cli.generation import TokenLogprob
from phimoe_cli.params import MAX_NEW_TOKENS, SamplingParams


@dataclass
class Request:
    """One reply to generate. Exactly one of ``messages`` (formatted with the chat template),
    ``text`` (encoded as it is) or ``token_ids`` (used as they are) is the prompt."""

    messages: list[dict] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = MAX_NEW_TOKENS["generate"]
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # record each token's log-probability and this many alternatives
    cancelled: Callable[[], bool] | None = None  # asked before each token (another thread's stop)
    on_recompute: Callable[[int], None] | None = None  # before the LongRoPE recompute (its tokens)


@dataclass
class Completion:
    """How a reply ended, and what it cost."""

    text: str
    token_ids: list[int] | None  # generated, without the stop id (None: the engine cannot tell)
    prompt_token_ids: list[int] | None
    finish_reason: str  # "stop" | "length" | "interrupted"
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from the cache rather than computed
    completion_tokens: int
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    recomputed: bool = False  # the whole context was computed again once (the LongRoPE boundary)
    recomputed_in_prompt: bool = False  # ... because the prompt itself crossed it (nothing reused)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the request asked

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class Stream:
    """The text pieces of one reply as they come; ``completion`` once they are all out (or the
    stream was closed)."""

    def __init__(self, pieces: Iterator[str], finish, logprobs: list[TokenLogprob] | None = None):
        self._pieces, self._finish = pieces, finish
        self.text: list[str] = []  # the pieces so far
        self.logprobs = logprobs  # grows as tokens come (None: not asked for)
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text.append(piece)
            yield piece
        self._done()

    def close(self) -> None:
        """Stop generating (the reply so far is the completion, finish reason "interrupted")."""
        self._pieces.close()
        self._done(interrupted=True)

    def _done(self, interrupted: bool = False) -> None:
        if self.completion is None:
            self.completion = self._finish(interrupted)


class PrefixCache:
    """The KV caches of recent sequences, least recently used first. Without a byte ``budget`` there
    is one, rewound and reused by every request (a chat). With one, a request that goes on from a
    cached prompt (the same conversation, resent with more turns) takes that cache over; one that
    shares only part of it (another conversation with the same system prompt) gets a new cache
    with a copy of the shared prefix, so that the other sequence stays for its own client. The
    least recently used caches go when the budget is spent (the one in use always stays)."""

    def __init__(self, new_cache, budget: int | None = None):
        self._new_cache, self.budget = new_cache, budget
        self.entries: list = []  # the caches
        self._prompts: dict[int, int] = {}  # id(cache) -> length of the prompt last computed in it

    def take(self, ids: list[int]):
        """The cache to compute ``ids`` in, most recently used from now on."""
        best, shared = None, -1
        for cache in self.entries:
            n = cache.shared_prefix(ids)
            if n > shared:
                best, shared = cache, n
        if best is not None and (self.budget is None or shared >= self._prompts.get(id(best), 0) - 1):
            chosen = best  # one cache only, or the prompt goes on from this one's: rewind/extend it
            self.entries.remove(best)
        else:
            chosen = self._new_cache()
            if shared > 0:
                chosen.copy_prefix(best, shared)
        self.entries.append(chosen)
        self._prompts[id(chosen)] = len(ids)
        self.trim()
        return chosen

    def trim(self) -> None:
        """Drop the least recently used caches beyond the budget."""
        while len(self.entries) > 1 and (self.budget is None or self.nbytes() > self.budget):
            self._prompts.pop(id(self.entries.pop(0)), None)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.entries)


class LocalEngine:
    """The model of this process. ``context_length``: at most this many tokens of prompt and
    reply (default: the model's); ``cache_budget``: bytes of KV cache kept for prefix reuse across
    requests (None: one sequence, the last)."""

    def __init__(self, loaded, context_length: int | None = None, cache_budget: int | None = None):
        from phimoe_cli.generation import Generator

        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.generator = Generator(loaded.model, self.tokenizer, context_length=context_length)
        self.caches = PrefixCache(self.generator.new_cache, cache_budget)
        self.cache = self.caches.take([])  # the cache of the latest request

    @property
    def name(self) -> str:
        return self.loaded.model_id

    def offload_stats(self) -> dict | None:
        """The expert cache's hits and misses with --offload (None without)."""
        from phimoe_cli.model.offload import offload_stats

        return offload_stats(self.loaded.model)

    @property
    def load_s(self) -> float:
        return self.loaded.load_s

    def describe(self) -> dict:
        """What a transcript records of the model (and /show prints)."""
        ld = self.loaded
        quantize = ld.quantize if ld.quantize not in (None, "none") else None
        return {"id": ld.model_id, "revision": ld.revision, "path": str(ld.path), "dtype": ld.dtype,
                "device": ld.device, "quantization": quantize}

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def cache_bytes(self) -> int:
        return self.caches.nbytes()

    def log_probs(self, ids: list[int], chunk: int = 1024):
        """Teacher-forced [positions, vocab] float32 log-probabilities of every next token of
        ``ids``, in passes of at most ``chunk`` positions (each pass on its own, no cache)."""
        import torch

        model = self.loaded.model
        chunk = min(chunk, model.config.max_position_embeddings - 1)
        out = []
        for start in range(0, len(ids) - 1, chunk):
            x = torch.tensor([ids[start : start + chunk + 1]], device=model.model.embed_tokens.weight.device)
            with torch.inference_mode():
                logits = model(x[:, :-1])[0].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
        return torch.cat(out)

    def prompt_ids(self, request: Request) -> list[int]:
        if request.messages is not None:
            return self.tokenizer.apply_chat(request.messages, add_generation_prompt=True)
        if request.text is not None:
            return self.tokenizer.encode(request.text)
        return list(request.token_ids or [])

    def generate(self, request: Request) -> Stream:
        """Start a reply (the prompt is checked first: GenerationError for one that does not fit)."""
        ids = self.prompt_ids(request)
        gen = self.generator
        gen.check(ids, request.params, request.max_new_tokens)
        cache = self.cache = self.caches.take(ids)  # (after the checks: a bad request keeps every cache)
        long_before = cache.long_rope and cache.length > 0
        pieces = gen.stream(ids, request.params, request.max_new_tokens, stop=request.stop,
                            ignore_eos=request.ignore_eos, cache=cache, logprobs=request.logprobs,
                            cancelled=request.cancelled, on_recompute=request.on_recompute)

        def finish(interrupted: bool) -> Completion:
            res = gen.result
            self.caches.trim()  # the cache grew with the reply
            recomputed = bool(not long_before and cache.long_rope
                              and (res.prompt_tokens > res.prefill_tokens or res.decode_steps))
            # a prompt that itself crosses LongRoPE's boundary is computed whole: nothing was reused
            in_prompt = recomputed and len(ids) > self.loaded.model.config.original_max_position_embeddings
            return Completion(
                text=res.text if not interrupted else "".join(stream.text), token_ids=list(res.token_ids),
                prompt_token_ids=ids,
                finish_reason="interrupted" if interrupted else res.finish_reason,
                prompt_tokens=len(ids), cached_tokens=0 if in_prompt else len(ids) - res.prefill_tokens,
                completion_tokens=len(res.token_ids), time_to_first_token_s=res.time_to_first_token_s,
                prefill_tokens_per_s=res.prefill_tokens_per_s, decode_tokens_per_s=res.decode_tokens_per_s,
                prefill_s=res.prefill_s, decode_s=res.decode_s,
                recomputed=recomputed, recomputed_in_prompt=in_prompt,
                logprobs=list(res.logprobs) if request.logprobs is not None else None,
            )

        stream = Stream(pieces, finish, gen.result.logprobs if request.logprobs is not None else None)
        return stream
