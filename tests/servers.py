"""Servers the tests talk to: a real `phimoe serve` process, and a tiny one that misbehaves on
purpose (for the remote engine's failures)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from conftest import PHIMOE


class Served:
    """A `phimoe serve` process; its stderr goes to a file (a pipe would fill and block it)."""

    def __init__(self, tmp: Path, *args, env: dict | None = None):
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([*PHIMOE, "serve", "--port", "0", *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env=dict(os.environ, **(env or {})))
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on (http://[^ ]+)", self.log_path.read_text())
            self.url = m.group(1) if m else None
            time.sleep(0.05)

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server never became ready:\n" + self.text())

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


class Misbehaving:
    """An HTTP server on 127.0.0.1 whose base URL ``url(mode)`` (…/MODE/v1) picks how it answers:
    ok (a short valid stream), 401, 503 (always), 429once (429 then ok), garbage (an event that is
    not JSON), cut (two chunks, then the connection closes), slow (answers after 3 s), toolong (400,
    context_length_exceeded), two (lists two models), nolist (a /models that is not a list)."""

    def __init__(self):
        self.posts: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _json(self, status, obj, headers=None):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                mode = self.path.split("/")[1]
                if mode == "401":
                    return self._json(401, {"error": {"message": "bad key"}})
                if mode == "nolist":
                    return self._json(200, {"hello": "world"})
                names = ["alpha", "beta"] if mode == "two" else ["alpha"]
                self._json(200, {"object": "list", "data": [{"id": n, "object": "model", "max_model_len": 64}
                                                            for n in names]})

            def do_POST(self):
                mode = self.path.split("/")[1]
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.posts[mode] = owner.posts.get(mode, 0) + 1
                if mode == "401":
                    return self._json(401, {"error": {"message": "bad key"}})
                if mode == "503" or (mode == "429once" and owner.posts[mode] == 1):
                    return self._json(503 if mode == "503" else 429, {"error": {"message": "busy"}},
                                      {"Retry-After": "0"})
                if mode == "toolong":
                    return self._json(400, {"error": {"message": "This model's maximum context length is 64 tokens",
                                                      "code": "context_length_exceeded"}})
                if mode == "slow":
                    time.sleep(3)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if mode == "garbage":
                    self.wfile.write(b"data: {not json\n\n")
                    return
                for piece in ("Hello", " world"):
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                if mode == "cut":
                    return
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/{mode}/v1"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
