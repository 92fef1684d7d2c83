"""The HTTP side of `phimoe serve`: FastAPI routes over the worker, and one gate in front of them
(API key, body size, the access log, request counts). Every error is an OpenAI-style JSON body."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from phimoe_cli.errors import PhimoeError
from phimoe_cli.server import protocol
from phimoe_cli.server.metrics import Metrics
from phimoe_cli.server.protocol import APIError
from phimoe_cli.server.worker import Job, QueueFull, Worker

MAX_BODY = 16 * 2**20  # bytes: a 128K-token conversation is well under this
ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


@dataclass
class Server:
    """What the routes share. ``engine`` is None while the model loads."""

    served_name: str
    api_key: str | None = None
    max_queue: int = 64
    cors_origins: list[str] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    engine: object = None
    worker: Worker | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    log: object = field(default_factory=lambda: sys.stderr)

    def ready(self, engine) -> None:
        self.worker = Worker(engine, self.max_queue, self.metrics)
        self.engine = engine


def error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class Gate:
    """ASGI middleware: the API key (every path but /health), the body-size limit, one access-log
    line per request (no message contents) and the request counter."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.key = server.api_key.encode() if server.api_key else None

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)  # constant time

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope["headers"])
        path = scope["path"]
        try:
            if self.key and path != "/health" and scope["method"] != "OPTIONS" and not self._authorized(headers):
                await error(APIError(401, "Missing or invalid API key: send 'Authorization: Bearer KEY'",
                                     code="invalid_api_key", type="authentication_error"))(scope, receive, sending)
            elif int(headers.get(b"content-length", b"0") or 0) > MAX_BODY:
                await error(APIError(413, f"The request body is over {MAX_BODY // 2**20} MiB"))(
                    scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except asyncio.CancelledError:  # the server cancels what still runs when its shutdown grace ends
            status[0] = 499
        finally:
            usage = state.get("usage")
            tokens = f" prompt={usage[0]} generated={usage[1]}" if usage else ""
            client = (scope.get("client") or ("-",))[0]
            self.server.log.write(f'{client} "{scope["method"]} {path}" {status[0]}{tokens} '
                                  f"{time.perf_counter() - t0:.3f}s\n")
            self.server.log.flush()
            endpoint = path if path in ENDPOINTS else "other"
            self.server.metrics.requests.labels(endpoint, str(status[0])).inc()


async def read_json(request: Request) -> dict:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"The request body is over {MAX_BODY // 2**20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"The body is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object")
    return data


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="phimoe", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        what = "No such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error(APIError(exc.status_code, f"{what}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error(APIError(500, f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health():
        if server.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        context = server.engine.context_length if server.engine is not None else None
        return protocol.models(server.served_name, server.created, context)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(server, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(server, request, "completion")

    if server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return Gate(app, server)


async def generate(server: Server, request: Request, kind: str):
    engine = server.engine
    if engine is None:
        raise APIError(503, "The model is still loading: retry when GET /health answers 200")
    body = await read_json(request)
    protocol.check_model(body, server.served_name)
    ctx = engine.context_length
    if kind == "chat":
        parsed = protocol.parse_chat(body, ctx)
    else:
        parsed = protocol.parse_completion(body, ctx, engine.vocab_size)
    try:
        ids = await run_in_threadpool(engine.prompt_ids, parsed.request)
        parsed.request.params.validate()
    except PhimoeError as exc:
        raise APIError(400, " ".join(str(exc).split())) from None
    protocol.fit(parsed, len(ids), ctx)
    parsed.request.messages = parsed.request.text = None
    parsed.request.token_ids = ids
    job = Job(parsed.request, asyncio.get_running_loop())
    try:
        server.worker.submit(job)
    except QueueFull:
        raise APIError(429, f"The server is busy ({server.max_queue} requests waiting or running): retry later",
                       code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}) from None
    writer = protocol.Writer(parsed, server.served_name, engine.tokenizer.token_bytes)
    if parsed.stream:
        return StreamingResponse(sse(server, job, writer, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = None
    async for kind_, value in events(job, request):
        if kind_ == "done":
            done = value
    if done is None:  # the client went away
        return Response(status_code=499)
    finished(server, request, job, done)
    return writer.whole(done)


def finished(server: Server, request: Request, job: Job, done) -> None:
    request.state.usage = (done.prompt_tokens, done.completion_tokens)  # for the access log


async def sse(server: Server, job: Job, writer: protocol.Writer, request: Request):
    yield data(writer.chunk(None, first=True))
    try:
        async for kind_, value in events(job, request):
            if kind_ == "piece":
                text, entries = value
                yield data(writer.chunk(text, entries))
            else:
                done = value
                finished(server, request, job, done)
                tail = (done.logprobs or [])[writer.sent_logprobs:]  # tokens that made no text yet
                yield data(writer.chunk(None, tail, finish=done.finish_reason))
                if writer.parsed.include_usage:
                    yield data(writer.usage_chunk(done))
    except APIError as exc:  # the status line is sent already: the error goes in the stream
        yield data(exc.body())
    yield "data: [DONE]\n\n"


async def events(job: Job, request: Request):
    """The job's events until it ends; ends early (cancelling the job) when the client goes.
    A failure in the worker is raised here as an APIError."""
    ended = False
    try:
        while True:
            try:
                kind_, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if kind_ == "error":
                ended = True
                if isinstance(value, PhimoeError):
                    raise APIError(400 if value.exit_code == 2 else 503, " ".join(str(value).split()))
                raise APIError(500, f"internal error: {type(value).__name__}")
            yield kind_, value
            if kind_ == "done":
                ended = True
                return
    finally:
        if not ended:
            job.cancelled.set()


def data(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
