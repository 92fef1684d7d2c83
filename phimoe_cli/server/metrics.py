"""What GET /metrics reports, in Prometheus' text format (``prometheus_client``, a registry of the
server's own so that two servers in one process never share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("phimoe_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("phimoe_cancelled_requests", "Requests whose client went away mid-generation",
                                 registry=r)
        self.prompt_tokens = Counter("phimoe_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("phimoe_cached_prompt_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("phimoe_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("phimoe_queue_depth", "Requests waiting or running", registry=r)
        self.decode_rate = Gauge("phimoe_decode_tokens_per_second", "Decode speed of the last finished request",
                                 registry=r)
        self.ttft = Histogram("phimoe_time_to_first_token_seconds", "From queued to the first text",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.cache_bytes = Gauge("phimoe_prefix_cache_bytes", "Bytes of KV cache kept for prefix reuse", registry=r)

    def finished(self, done, first_s: float | None, cache_bytes: int, cancelled: bool) -> None:
        if cancelled:
            self.cancelled.inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.cached_tokens.inc(done.cached_tokens)
        self.generated_tokens.inc(done.completion_tokens)
        if done.decode_tokens_per_s:
            self.decode_rate.set(done.decode_tokens_per_s)
        if first_s is not None:
            self.ttft.observe(first_s)
        self.cache_bytes.set(cache_bytes)

    def text(self) -> bytes:
        return generate_latest(self.registry)
