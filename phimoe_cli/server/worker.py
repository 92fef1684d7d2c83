"""The one thread that runs the model: requests wait in a bounded queue and are answered one at a
time, each as it would be alone. A request's events (text pieces with their logprobs, then the
completion or an error) reach its HTTP handler through an asyncio queue; the handler sets
``job.cancelled`` when its client goes, and generation stops before the next token."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time

from phimoe_cli.errors import PhimoeError


class QueueFull(Exception):
    pass


class Job:
    def __init__(self, request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        request.cancelled = self.cancelled.is_set
        self.queued_at = time.perf_counter()
        self.first_s: float | None = None  # from queued to the first event

    def send(self, kind: str, value) -> None:
        """From the worker thread: hand an event to the handler's event loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """Runs jobs on ``engine`` in a thread of its own. At most ``max_queue`` jobs wait or run."""

    def __init__(self, engine, max_queue: int, metrics=None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.depth = 0  # jobs waiting or running
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="phimoe-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self.depth >= self.max_queue:
                raise QueueFull
            self.depth += 1
        self._gauge()
        self._jobs.put(job)
        return job

    def cancel_running(self) -> None:
        """Stop the generation in flight before its next token (it ends as finish_reason "abort")."""
        job = self.current
        if job is not None:
            job.cancelled.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs and what waits; wait for the thread."""
        self._jobs.put(None)
        self.cancel_running()
        self._thread.join(timeout)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                while not self._jobs.empty():  # stopping: whatever still waits is cancelled
                    left = self._jobs.get()
                    if left is not None:
                        left.send("error", PhimoeError("the server is shutting down"))
                return
            self.current = job
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                self.current = None
                with self._lock:
                    self.depth -= 1
                self._gauge()

    def _run(self, job: Job) -> None:
        try:
            stream = self.engine.generate(job.request)
            sent = 0
            for piece in stream:
                if job.first_s is None:
                    job.first_s = time.perf_counter() - job.queued_at
                entries = []
                if stream.logprobs is not None:
                    entries, sent = stream.logprobs[sent:], len(stream.logprobs)
                job.send("piece", (piece, entries))
            done = stream.completion
            if self.metrics is not None:  # here, not in the handler: a cancelled request counts too
                self.metrics.finished(done, job.first_s, self.engine.cache_bytes(), job.cancelled.is_set())
            job.send("done", done)
        except Exception as exc:  # a PhimoeError: 4xx/503; anything else, a bug: 500; the server goes on
            job.send("error", exc)
