"""An engine that is a remote OpenAI-compatible server (`phimoe serve`, vLLM, llama-server, ...):
the same ``generate(Request) -> Stream -> Completion`` as LocalEngine, over HTTP with SSE.

What a remote server cannot give is None: token ids, prefill speed. Every network failure is one
RemoteError line that names the URL (exit code 1); 429 and 503 are retried a few times with
backoff first (``on_retry`` says so on screen). The API key is sent, never printed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator

import httpx

from phimoe_cli.engine import Completion, Request, Stream
from phimoe_cli.errors import PhimoeError, UsageError
from phimoe_cli.params import GenerationError

RETRIES = 4  # attempts after the first, for 429 / 503
MAX_WAIT_S = 30.0  # the most one Retry-After is followed


class RemoteError(PhimoeError):
    """A failure talking to the server (exit code 1)."""


class ContextTooLong(GenerationError):
    """The server says the prompt (with max_tokens) does not fit its context."""


def timeout_s() -> float:
    """Seconds to wait for the server's next bytes (PHIMOE_HTTP_TIMEOUT, default 600)."""
    raw = os.environ.get("PHIMOE_HTTP_TIMEOUT") or "600"
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"PHIMOE_HTTP_TIMEOUT must be a number of seconds, got {raw!r}") from None


class RemoteEngine:
    """The model a server at ``base_url`` (…/v1) serves. ``model``: its served name (None: the
    server's only one); ``context_length``: when the server does not say it."""

    tokenizer = None  # token ids come from the server, if at all
    load_s = 0.0

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 context_length: int | None = None, on_retry: Callable[[str], None] | None = None):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url must start with http:// or https://, got {base_url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        wait = timeout_s()
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(wait, connect=min(wait, 10.0)))
        self.on_retry = on_retry or (lambda text: None)
        served = self._models()
        names = [m.get("id") for m in served if isinstance(m, dict)]
        if model is None:
            if len(names) != 1:
                choices = ", ".join(map(str, names)) or "none"
                raise UsageError(f"{self.base_url} serves {len(names)} models ({choices}): choose one with --model")
            model = names[0]
        elif model not in names:
            raise UsageError(f"{self.base_url} does not serve {model!r}; it serves: {', '.join(map(str, names))}")
        self.name = model
        info = served[names.index(model)]
        told = info.get("max_model_len") or info.get("context_length")
        self.context_length = context_length or (int(told) if isinstance(told, int) else None)

    def describe(self) -> dict:
        """The transcript's record of the model: the server and the name, never the key."""
        return {"id": self.name, "base_url": self.base_url}

    def cache_bytes(self) -> int:
        return 0

    def offload_stats(self) -> None:
        return None

    # -- HTTP ------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> httpx.Response:
        """The response to one request (status < 400), after retrying 429 / 503."""
        url = self.base_url + path
        for attempt in range(RETRIES + 1):
            try:
                request = self.http.build_request(method, url, json=body)
                response = self.http.send(request, stream=stream)
            except httpx.TimeoutException:
                raise RemoteError(f"{url}: no answer within {timeout_s():g} s (PHIMOE_HTTP_TIMEOUT)") from None
            except httpx.HTTPError as exc:
                raise RemoteError(f"cannot reach {url}: {_reason(exc)}") from None
            if response.status_code in (429, 503) and attempt < RETRIES:
                wait = _retry_after(response, 2.0**attempt)
                response.close()
                self.on_retry(f"{url} answered {response.status_code}: retrying in {wait:.0f} s "
                              f"({attempt + 1}/{RETRIES})")
                time.sleep(wait)
                continue
            if response.status_code >= 400:
                if stream:
                    response.read()
                response.close()
                raise self._failure(url, response)
            return response
        raise AssertionError("unreachable")

    def _failure(self, url: str, response: httpx.Response) -> PhimoeError:
        status = response.status_code
        message, code = _error_message(response)
        if status == 401 or status == 403:
            return RemoteError(f"{url}: the server refused the API key ({status}): set --api-key or PHIMOE_API_KEY")
        if status == 404:
            return RemoteError(f"{url}: not found (404){': ' + message if message else ''}")
        if status == 400 and (code == "context_length_exceeded" or "context length" in message.lower()):
            return ContextTooLong(f"{url}: {message}")
        return RemoteError(f"{url}: {status} {response.reason_phrase}{': ' + message if message else ''}")

    def _models(self) -> list:
        response = self._send("GET", "/models")
        try:
            data = response.json()["data"]
            assert isinstance(data, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise RemoteError(f"{self.base_url}/models: not an OpenAI-compatible model list") from None
        return data

    # -- generation ------------------------------------------------------------------------------

    def body(self, request: Request) -> tuple[str, dict]:
        """The endpoint and body for ``request`` (sampling as vLLM reads it)."""
        p = request.params.validate()
        body = {"model": self.name, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": request.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p}
        if p.seed is not None:
            body["seed"] = p.seed
        for name in ("top_k", "min_p", "repetition_penalty"):  # vLLM's extra fields, only when not off
            if getattr(p, name) != {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}[name]:
                body[name] = getattr(p, name)
        if request.stop:
            body["stop"] = list(request.stop)
        if request.ignore_eos:
            body["ignore_eos"] = True
        if request.messages is not None:
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in request.messages]
            return "/chat/completions", body
        body["prompt"] = request.text if request.text is not None else list(request.token_ids or [])
        return "/completions", body

    def generate(self, request: Request) -> Stream:
        """Start a reply: the request is sent now (errors are raised here); the text streams."""
        path, body = self.body(request)
        url = self.base_url + path
        t0 = time.perf_counter()
        response = self._send("POST", path, body, stream=True)
        got = {"usage": None, "finish": None, "first": None, "last": None}
        chat = "messages" in body

        def pieces() -> Iterator[str]:
            try:
                for event in _events(response, url):
                    if request.cancelled is not None and request.cancelled():
                        got["finish"] = "interrupted"
                        return
                    if event.get("usage"):
                        got["usage"] = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if choice.get("finish_reason"):
                            got["finish"] = choice["finish_reason"]
                        if piece:
                            now = time.perf_counter()
                            got["first"] = got["first"] or now
                            got["last"] = now
                            yield piece
            except KeyboardInterrupt:
                got["finish"] = "interrupted"
            finally:
                response.close()

        def finish(interrupted: bool) -> Completion:
            text = "".join(stream.text)
            usage = got["usage"] or {}
            n = int(usage.get("completion_tokens") or 0)
            first, last = got["first"], got["last"]
            reason = "interrupted" if interrupted else (got["finish"] or "stop")  # (cancelled: "interrupted")
            if reason not in ("stop", "length", "interrupted"):
                reason = "stop"
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
            return Completion(
                text=text, token_ids=None, prompt_token_ids=None, finish_reason=reason,
                prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=n,
                time_to_first_token_s=(first - t0) if first else 0.0,
                decode_tokens_per_s=(n - 1) / (last - first) if first and last and last > first and n > 1 else 0.0,
                prefill_s=(first - t0) if first else 0.0, decode_s=(last - first) if first and last else 0.0,
            )

        stream = Stream(pieces(), finish)
        return stream


def _events(response: httpx.Response, url: str) -> Iterator[dict]:
    """The JSON events of an SSE body, until ``data: [DONE]``."""
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments (":"), event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise RemoteError(f"{url}: a malformed event in the stream: {data[:80]!r}") from None
            if not isinstance(event, dict):
                raise RemoteError(f"{url}: a malformed event in the stream: {data[:80]!r}")
            if event.get("error"):
                error = event["error"]
                raise RemoteError(f"{url}: the server failed mid-reply: "
                                  f"{error.get('message') if isinstance(error, dict) else error}")
            yield event
    except httpx.TimeoutException:
        raise RemoteError(f"{url}: the stream stalled for {timeout_s():g} s (PHIMOE_HTTP_TIMEOUT)") from None
    except httpx.HTTPError as exc:
        raise RemoteError(f"{url}: the stream was cut mid-reply ({_reason(exc)})") from None
    raise RemoteError(f"{url}: the stream ended without data: [DONE] (cut mid-reply?)")


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    low = text.lower()
    if "name or service not known" in low or "nodename nor servname" in low or "temporary failure in name" in low:
        return "the host name does not resolve"
    if "connection refused" in low:
        return "connection refused (is the server running?)"
    if "certificate" in low or "ssl" in low or "tls" in low:
        return f"TLS failed: {text[:160]}"
    return text[:200] or type(exc).__name__


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(MAX_WAIT_S, max(0.0, float(response.headers.get("retry-after", default))))
    except ValueError:
        return min(MAX_WAIT_S, default)


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return " ".join(response.text.split())[:200], None
    if isinstance(error, dict):
        return " ".join(str(error.get("message") or "").split())[:300], error.get("code")
    return " ".join(str(error or "").split())[:300], None
