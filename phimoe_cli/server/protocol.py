"""The OpenAI wire format: request bodies checked and turned into engine Requests, completions and
chunks turned into response bodies. No HTTP and no torch here: every function takes and returns
plain data, so the format is tested on its own.

A body is checked field by field, with the field's name in the error (``APIError.param``), as the
OpenAI API does. Unknown fields are ignored, as there; fields that would change the answer and that
this server does not implement (``n`` > 1, ``tools``, nonzero frequency/presence penalties, ``echo``,
``best_of`` > 1, ``logit_bias``, a ``response_format`` other than text) are refused, never ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from phimoe_cli.engine import Completion, Request
from phimoe_cli.params import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_LOGPROBS = 20
MAX_STOPS = 16
# Sampling defaults when a field is absent: OpenAI's (vLLM's too, for a model whose
# generation_config.json sets none, as Phi-3.5-MoE's does not).
DEFAULTS = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """What a body asks for: the engine request (prompt ids still to be found, and ``max_tokens``
    None meaning the rest of the context), and how to answer."""

    kind: str  # "chat" | "completion"
    request: Request
    max_tokens: int | None
    stream: bool
    include_usage: bool
    logprobs: bool


# ------------------------------------------------------------------------------------ reading

def _field(body: dict, name: str, kinds: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                            list: "an array", dict: "an object"}[k] for k in kinds)
        raise APIError(400, f"'{name}' must be {want}, got {type(value).__name__}: {_short(value)}", param=name)
    return value


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = _field(body, name, (int,) if integer else (int, float), default)
    if value is None:
        return None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be in [{lo:g}, {hi:g}], got {value!r}", param=name)
    return value


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model(body: dict, served: str) -> None:
    model = _field(body, "model", (str,))
    if model is not None and model != served:
        raise APIError(404, f"The model '{_short(model, 200)}' does not exist: this server serves '{served}'",
                       param="model", code="model_not_found", type="NotFoundError")


def _refuse_unsupported(body: dict) -> None:
    if _number(body, "n", 1, 1, 128, integer=True) != 1:
        raise APIError(400, "'n' must be 1: this server generates one choice per request", param="n")
    if _number(body, "best_of", 1, 1, 128, integer=True) != 1:
        raise APIError(400, "'best_of' must be 1", param="best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0, -2, 2):
            raise APIError(400, f"'{name}' is not supported (use repetition_penalty)", param=name)
    for name in ("tools", "functions", "logit_bias", "suffix"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported by this server", param="echo")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")


def _sampling(body: dict) -> SamplingParams:
    top_k = _number(body, "top_k", 0, -1, 2**31, integer=True)
    params = SamplingParams(
        temperature=_number(body, "temperature", DEFAULTS.temperature, 0, 2),
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1: off
        top_p=_number(body, "top_p", DEFAULTS.top_p, 0, 1),
        min_p=_number(body, "min_p", DEFAULTS.min_p, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", DEFAULTS.repetition_penalty, 0, 100),
        seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
    )
    if params.top_p == 0:
        raise APIError(400, "'top_p' must be in (0, 1], got 0", param="top_p")
    if params.min_p == 1:
        raise APIError(400, "'min_p' must be in [0, 1), got 1", param="min_p")
    if params.repetition_penalty == 0:
        raise APIError(400, "'repetition_penalty' must be > 0", param="repetition_penalty")
    return params


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' may hold at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


def _common(body: dict, kind: str, context_length: int, logprobs: int | None, request: Request) -> Parsed:
    _refuse_unsupported(body)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit, None, 1, context_length - 1, integer=True)
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), None)
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = bool(_field(options or {}, "include_usage", (bool,), False))
    request.params = _sampling(body)
    request.stop = _stops(body)
    request.ignore_eos = _field(body, "ignore_eos", (bool,), False)
    request.logprobs = logprobs
    return Parsed(kind, request, max_tokens, stream, include_usage, logprobs is not None)


def parse_chat(body: dict, context_length: int) -> Parsed:
    """A /v1/chat/completions body."""
    messages = _field(body, "messages", (list,))
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content}", param="messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be system, user or assistant, got {_short(role)}",
                           param=f"{where}.role")
        clean.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    logprobs = None
    if _field(body, "logprobs", (bool,), False):
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return _common(body, "chat", context_length, logprobs, Request(messages=clean))


def _content(content, where: str) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise APIError(400, f"{where}: only text parts are supported", param=where)
    raise APIError(400, f"{where} must be a string (or an array of text parts)", param=where)


def parse_completion(body: dict, context_length: int, vocab_size: int) -> Parsed:
    """A /v1/completions body: ``prompt`` as text (no chat format) or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request = Request(text=prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab_size})", param="prompt")
        request = Request(token_ids=list(prompt))
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "one prompt per request: send a batch as separate requests", param="prompt")
    else:
        raise APIError(400, "'prompt' must be a string or an array of token ids", param="prompt")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    return _common(body, "completion", context_length, logprobs, request)


def fit(parsed: Parsed, prompt_tokens: int, context_length: int) -> None:
    """Set the request's token budget; 400 when the prompt and ``max_tokens`` exceed the context."""
    room = context_length - prompt_tokens
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens; the prompt has "
                            f"{prompt_tokens} tokens, leaving no room for a reply", param="messages"
                       if parsed.kind == "chat" else "prompt", code="context_length_exceeded")
    if parsed.max_tokens is not None and parsed.max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens; the prompt has "
                            f"{prompt_tokens} and max_tokens asks for {parsed.max_tokens} more",
                       param="max_tokens", code="context_length_exceeded")
    parsed.request.max_new_tokens = parsed.max_tokens or room


# ------------------------------------------------------------------------------------ writing

FINISH = {"stop": "stop", "length": "length", "interrupted": "abort"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf (vLLM's convention)


def _token(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)  # as the OpenAI API shows partial characters


def chat_logprobs(entries, token_bytes: Callable[[int], bytes]) -> dict:
    def one(token_id: int, value: float) -> dict:
        raw = token_bytes(token_id)
        return {"token": _token(raw), "logprob": _logprob(value), "bytes": list(raw)}

    return {"content": [dict(one(e.token_id, e.logprob), top_logprobs=[one(i, v) for i, v in e.top])
                        for e in entries]}


def completion_logprobs(entries, token_bytes: Callable[[int], bytes], offset: int = 0) -> dict:
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(_token(token_bytes(e.token_id)))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": [{_token(token_bytes(i)): _logprob(v) for i, v in e.top} for e in entries],
            "text_offset": offsets}


class Writer:
    """The response bodies of one request: whole, or as stream chunks."""

    def __init__(self, parsed: Parsed, model: str, token_bytes: Callable[[int], bytes]):
        self.parsed, self.model, self.token_bytes = parsed, model, token_bytes
        self.id, self.created = new_id(parsed.kind), int(time.time())
        self.offset = 0  # characters of text so far (completions' text_offset)
        self.sent_logprobs = 0  # logprob entries the chunks so far carried

    def _envelope(self, choices: list, **extra) -> dict:
        chat = self.parsed.kind == "chat"
        obj = ("chat.completion.chunk" if self.parsed.stream else "chat.completion") if chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _logprobs(self, entries):
        if not self.parsed.logprobs:
            return None
        if self.parsed.kind == "chat":
            return chat_logprobs(entries, self.token_bytes)
        return completion_logprobs(entries, self.token_bytes, self.offset)

    def whole(self, done: Completion) -> dict:
        choice = {"index": 0, "logprobs": self._logprobs(done.logprobs or []),
                  "finish_reason": FINISH[done.finish_reason]}
        if self.parsed.kind == "chat":
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        return self._envelope([choice], usage=usage(done))

    def chunk(self, text: str | None, entries=(), finish: str | None = None, first: bool = False) -> dict:
        """One stream chunk: new text (and its tokens' logprobs), or the end (``finish``)."""
        choice = {"index": 0, "logprobs": self._logprobs(list(entries)) if entries else None,
                  "finish_reason": FINISH[finish] if finish else None}
        if self.parsed.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        self.offset += len(text or "")
        self.sent_logprobs += len(entries)
        extra = {"usage": None} if self.parsed.include_usage else {}
        return self._envelope([choice], **extra)

    def usage_chunk(self, done: Completion) -> dict:
        return self._envelope([], usage=usage(done))


def models(name: str, created: int, context_length: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "phimoe",
                                        "root": name, "max_model_len": context_length}]}
