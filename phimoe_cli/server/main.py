"""`phimoe serve`: bind, answer /health with 503 while the model loads, then serve until Ctrl+C or
SIGTERM (stop accepting, let what runs finish for a few seconds, cancel the rest, exit 0)."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

from phimoe_cli.errors import PhimoeError, UsageError, report
from phimoe_cli.options import LoadOptions

GRACE_S = 3  # seconds in-flight requests get to finish on shutdown


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def run_serve(*, load: LoadOptions, host: str, port: int, api_key: str | None, served_name: str | None,
              context: int | None, max_queue: int, cache_memory: str, cors_origins: list[str]) -> int:
    import uvicorn

    from phimoe_cli.engine import LocalEngine
    from phimoe_cli.runtime import load as load_model
    from phimoe_cli.runtime import parse_size
    from phimoe_cli.server.app import Server, create_app

    budget = parse_size(cache_memory)
    if max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {max_queue}")
    sock = bind(host, port)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    server = Server(served_name or load.model, api_key=api_key, max_queue=max_queue, cors_origins=cors_origins)
    def stopping() -> None:  # a signal: what runs gets GRACE_S - 1 s, then ends cleanly ("abort", [DONE])
        def cancel() -> None:
            if server.worker is not None:
                server.worker.cancel_running()

        timer = threading.Timer(max(0.5, GRACE_S - 1), cancel)
        timer.daemon = True
        timer.start()

    http = _Uvicorn(uvicorn.Config(create_app(server), log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=GRACE_S, lifespan="off"), on_stop=stopping)
    failed: list[PhimoeError] = []

    def loading() -> None:
        try:
            server.ready(LocalEngine(load_model(load), context_length=context, cache_budget=budget))
            sys.stderr.write(f"phimoe serve: {server.served_name} ready at {where}/v1\n")
        except PhimoeError as exc:
            failed.append(exc)
            http.should_exit = True
        except BaseException as exc:  # a bug: say so in one line, stop the server
            failed.append(PhimoeError(f"loading the model failed: {type(exc).__name__}: {exc}"))
            http.should_exit = True

    sys.stderr.write(f"phimoe serve: listening on {where} (loading {load.model} ...)\n")
    sys.stderr.flush()
    threading.Thread(target=loading, name="phimoe-load", daemon=True).start()
    try:
        http.run(sockets=[sock])
    finally:
        if server.worker is not None:
            server.worker.stop()
    if failed:
        return report(failed[0])
    sys.stderr.write("phimoe serve: stopped\n")
    return 0


class _Uvicorn:
    """uvicorn's server, but a signal ends it with exit 0 (uvicorn raises the signal again after
    its graceful shutdown, which would end the process as killed). A second signal: at once."""

    def __init__(self, config, on_stop=None):
        import uvicorn

        self.server = uvicorn.Server(config)
        self.on_stop = on_stop or (lambda: None)

    @property
    def should_exit(self) -> bool:
        return self.server.should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.server.should_exit = value

    def run(self, sockets) -> None:
        import asyncio

        def stop(signum, frame) -> None:
            if self.server.should_exit:
                self.server.force_exit = True
            else:
                self.on_stop()
            self.server.should_exit = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.server.capture_signals = contextlib.nullcontext  # ours, above
        try:
            asyncio.run(self.server.serve(sockets=sockets))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
