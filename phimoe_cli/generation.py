"""Token generation: sampling, stopping, streaming and timing.

``Generator.stream`` turns prompt ids into text pieces as the model produces them and leaves a
``GenerationResult`` (ids, text, finish reason, usage, timings) on ``generator.result``. It works
with any cache it is given, so a chat can keep one cache across turns and prefill only new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from phimoe_cli.params import GenerationError, SamplingParams


class Sampler:
    """Chooses the next token from one row of logits. Padding ids (rows of the embedding with no
    token) are never chosen: ``allowed`` masks them out."""

    def __init__(self, params: SamplingParams, allowed: torch.Tensor | None = None):
        self.params = params.validate()
        self.allowed = allowed
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def probabilities(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor | None:
        """The distribution to sample from (None means greedy: take the argmax of ``logits``).

        The order is transformers': repetition penalty, temperature, top-k, top-p, min-p.
        """
        if self.params.temperature == 0:
            return None
        return self._distribution(self._masked(logits, history))

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor:
        ids, probs = self._candidates(logits)
        return probs if ids is None else torch.zeros_like(logits).scatter_(0, ids, probs)

    # top-p looks at this many of the best tokens first: they nearly always hold the nucleus, and
    # finding them is several times cheaper than sorting a 32K vocabulary at every token
    TOP_P_CANDIDATES = 512

    def _candidates(self, logits: torch.Tensor):
        """(ids, probs): the tokens that may be drawn and their probabilities; ids None means
        every token, in order. Exactly the distribution of the processors, whatever the shortcut."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(int(p.top_k), len(logits))).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        ids = None
        if p.top_p < 1.0:
            k = min(self.TOP_P_CANDIDATES, len(probs))
            sorted_probs, ids = torch.topk(probs, k)  # best first
            if k < len(probs) and float(sorted_probs.sum()) < p.top_p:
                # the nucleus reaches beyond the candidates (a flat distribution): sort them all.
                # Otherwise every other token has more than top_p of better mass: it is cut anyway.
                sorted_probs, ids = torch.sort(probs, descending=True)
            better = torch.cumsum(sorted_probs, 0) - sorted_probs  # the mass of the better tokens
            sorted_probs[better >= p.top_p] = 0  # the best token always stays
            probs = sorted_probs
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0
        return ids, probs / probs.sum()

    def _real(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 CPU copy of ``logits`` with the padding rows of the embedding (never tokens) at -inf."""
        logits = logits.detach().float().cpu().clone()
        if self.allowed is not None:
            n = min(len(self.allowed), len(logits))
            logits[:n].masked_fill_(~self.allowed[:n], float("-inf"))
            logits[n:] = float("-inf")
        return logits

    def _masked(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        logits = self._real(logits)
        penalty = self.params.repetition_penalty
        if penalty != 1.0 and history is not None and len(history):
            seen = torch.unique(history.cpu())
            seen = seen[seen < len(logits)]
            scores = logits[seen]
            logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        return logits

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own log-probabilities over the real tokens: before penalties, temperature
        and truncation (what an OpenAI-style API reports as logprobs)."""
        return torch.log_softmax(self._real(logits), dim=-1)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        logits = self._masked(logits, history)
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        ids, probs = self._candidates(logits)
        # inverse CDF: the first token whose cumulative probability exceeds a uniform draw (never a
        # token of probability 0); one pass, where torch.multinomial costs ~0.7 ms on 32K tokens
        cdf = torch.cumsum(probs, 0)
        u = torch.rand(1, generator=self.generator, dtype=cdf.dtype) * cdf[-1]
        pick = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
        return pick if ids is None else int(ids[pick])


@dataclass
class TokenLogprob:
    """One generated token's log-probability, and the ``top`` most likely tokens at its place."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids, without the stop id
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length" | "interrupted"
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually computed for the prompt (fewer when a cache is reused)
    prefill_s: float = 0.0
    decode_steps: int = 0  # forward passes after the prefill
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry, when asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class StopStrings:
    """Holds back text that may be the start of a stop string; reports where one is found."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generator:
    """Runs a causal LM with a KV cache. ``tokenizer`` needs ``stream_decoder()``, ``stop_ids``
    and ``valid_token_mask(vocab_size)`` (phimoe_cli.tokenizer.Tokenizer has them)."""

    def __init__(self, model, tokenizer, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or model.config.max_position_embeddings
        self.allowed = tokenizer.valid_token_mask(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.result = GenerationResult()

    def new_cache(self, capacity: int = 256):
        return self.model.new_cache(capacity=min(capacity, self.context_length))

    def check(self, prompt_ids: list[int], params: SamplingParams | None, max_new_tokens: int) -> None:
        """GenerationError unless a reply to ``prompt_ids`` can be generated with these settings."""
        (params or SamplingParams()).validate()
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt_ids:
            raise GenerationError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens; it does not fit the context of "
                f"{self.context_length} tokens with room for a reply"
            )

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        max_new_tokens: int = 512,
        stop: Iterable[str] = (),
        ignore_eos: bool = False,
        cache=None,
        logprobs: int | None = None,
        cancelled=None,
        on_recompute=None,
    ) -> Iterator[str]:
        """Yield text pieces; ``self.result`` describes the generation (as it goes, and after).

        With ``cache``, the tokens it already holds must be a prefix of ``prompt_ids``; only the
        rest is computed, and the cache ends holding the prompt and the reply. Ctrl-C stops the
        generation cleanly: the finish reason becomes "interrupted". ``logprobs`` (a number of
        alternatives, 0 for none): record each generated token's log-probability in
        ``result.logprobs`` as it comes. ``cancelled`` (a callable, e.g. ``threading.Event.is_set``):
        asked before each token; True ends the generation as "interrupted" (another thread's stop).
        ``on_recompute(n)``: called before a step that computes the whole sequence again (n tokens),
        because it crosses LongRoPE's boundary: the one long pause of a generation.
        Bad input raises GenerationError here, before any work.
        """
        params = params or SamplingParams()
        self.check(prompt_ids, params, max_new_tokens)  # validates params too
        self.result = GenerationResult(prompt_tokens=len(prompt_ids))
        return self._run(prompt_ids, params, max_new_tokens, stop, ignore_eos, cache, logprobs, cancelled,
                         on_recompute)

    def _run(self, prompt_ids, params, max_new_tokens, stop, ignore_eos, cache, logprobs, cancelled,
             on_recompute) -> Iterator[str]:
        res = self.result
        budget = min(max_new_tokens, self.context_length - len(prompt_ids))
        if cache is None:
            cache = self.new_cache(len(prompt_ids) + budget)
        else:
            cache.truncate(cache.shared_prefix(prompt_ids))
        sampler = Sampler(params, self.allowed)
        stop_ids = set() if ignore_eos else set(self.tokenizer.stop_ids)
        decoder = self.tokenizer.stream_decoder()
        stops = StopStrings(stop)
        history = torch.tensor(prompt_ids, dtype=torch.long)
        text: list[str] = []
        new = prompt_ids[cache.length :]
        res.prefill_tokens = len(new)
        cache.reserve(len(prompt_ids) + budget)
        t0 = time.perf_counter()
        t_first = None
        hit = False
        try:
            x = torch.tensor([new], dtype=torch.long, device=self.device)
            for step in range(budget):
                if cancelled is not None and cancelled():
                    res.finish_reason = "interrupted"
                    break
                if on_recompute is not None and (again := self.model.recomputes(cache, x.shape[1])):
                    on_recompute(again + x.shape[1])
                with torch.inference_mode():
                    logits = self.model(x, cache=cache, logits_to_keep=1)[0, -1]
                token = sampler(logits, history)
                if t_first is None:
                    t_first = time.perf_counter()
                    res.prefill_s = res.time_to_first_token_s = t_first - t0
                res.decode_steps = step
                if token in stop_ids:
                    res.finish_reason = "stop"
                    break
                res.token_ids.append(token)
                if logprobs is not None:
                    res.logprobs.append(self._logprob(sampler, logits, token, logprobs))
                history = torch.cat([history, torch.tensor([token])])
                piece, hit = stops.push(decoder.push(token))
                if piece:
                    text.append(piece)
                    yield piece
                if hit:
                    res.finish_reason = "stop"
                    break
                x = torch.tensor([[token]], dtype=torch.long, device=self.device)
            else:
                res.finish_reason = "length"
        except KeyboardInterrupt:
            res.finish_reason = "interrupted"
        finally:  # (also when the stream is closed: GeneratorExit at the yield)
            if t_first is not None:
                res.decode_s = time.perf_counter() - t_first
        if not hit:  # text held back for a stop string that never came, or a partial character
            tail, hit = stops.push(decoder.flush())
            tail += "" if hit else stops.flush()
            if tail:
                text.append(tail)
                yield tail
        res.text = "".join(text)

    @staticmethod
    def _logprob(sampler: Sampler, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        lp = sampler.log_probs(logits)
        best = torch.topk(lp, top) if top else None
        pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
        return TokenLogprob(token, float(lp[token]), pairs)
