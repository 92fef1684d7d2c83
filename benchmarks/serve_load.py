"""Load on `phimoe serve`: N concurrent clients x M streamed chat requests each, against one client
alone, measured in the same run (levels interleaved: 1, N1, 1, N2, ...).

Per level: time to first token p50 / p95 (from sending the request to the first text chunk),
aggregate generated tok/s over the level's wall time, and each relative to one client alone.
Every request asks for a fixed number of tokens (``ignore_eos``) from a different prompt.

    python benchmarks/serve_load.py                      # starts a server on the mid checkpoint
    python benchmarks/serve_load.py --clients 1 4 16 --requests 4 --max-tokens 32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --model NAME   # a running server
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]


def start_server(model: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    import os

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = open(Path("/tmp") / f"serve-load-{os.getpid()}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "phimoe_cli.cli", "serve", "--model", str(model), "--port", "0",
                             "--max-queue", "1024"], stderr=log, stdout=subprocess.DEVNULL, env=env, cwd="/tmp")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = Path(log.name).read_text()
        m = re.search(r"ready at (http://\S+)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, tokens, time.perf_counter() - t0


def level(url: str, model: str, clients: int, requests: int, max_tokens: int, tag: int) -> dict:
    ttfts, tokens, lock = [], [0], threading.Lock()

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        for j in range(requests):
            ttft, n, _ = one_request(client, model, f"Run {tag}, client {i}, request {j}: tell me a story", max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"clients": clients, "p50": statistics.median(ttfts), "p95": ttfts[min(len(ttfts) - 1,
            round(0.95 * (len(ttfts) - 1)))], "tok_s": tokens[0] / wall, "requests": len(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server's /v1 URL (default: start one)")
    ap.add_argument("--model", help="the served model's name (with --url)")
    ap.add_argument("--shape", default="mid", help="checkpoint shape when starting a server (benchmarks/peers.py)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the server it starts")
    args = ap.parse_args()
    proc = None
    if args.url:
        url, model = args.url, args.model
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from peers import make_checkpoint, peers_dir

        path = make_checkpoint(args.shape, peers_dir() / "models")
        proc, url = start_server(path, args.threads)
        url, model = url, str(path)
    if model is None:
        model = openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
    try:
        level(url, model, 1, 1, 4, tag=-1)  # warm up
        rows, tag = [], 0
        for n in args.clients:
            alone = level(url, model, 1, args.requests, args.max_tokens, tag)
            many = level(url, model, n, args.requests, args.max_tokens, tag + 1)
            tag += 2
            rows.append((alone, many))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"{args.requests} streamed requests per client, {args.max_tokens} tokens each, greedy, ignore_eos")
    print("| clients | TTFT p50 s | TTFT p95 s | aggregate tok/s | one client alone (same run): TTFT p50 s, tok/s "
          "| tok/s ratio | TTFT p50 ratio |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for alone, many in rows:
        print(f"| {many['clients']} | {many['p50']:.3f} | {many['p95']:.3f} | {many['tok_s']:.1f} | "
              f"{alone['p50']:.3f}, {alone['tok_s']:.1f} | {many['tok_s'] / alone['tok_s']:.2f}x | "
              f"{many['p50'] / alone['p50']:.1f}x |")


if __name__ == "__main__":
    main()
