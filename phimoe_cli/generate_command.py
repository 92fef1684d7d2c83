"""`phimoe generate`: one reply, streamed to stdout (or one JSON object with --json)."""

from __future__ import annotations

import json
import sys

from phimoe_cli.engine import Request
from phimoe_cli.options import LoadOptions, Remote
from phimoe_cli.params import SamplingParams
from phimoe_cli.runtime import open_engine, read_prompt, whole_writes


def run_generate(prompt, *, load: LoadOptions, system, raw, params: SamplingParams, max_new_tokens: int, stop,
                 ignore_eos: bool, json_out: bool, verbose: bool, remote: Remote | None = None,
                 no_stdin: bool = False) -> int:
    text = read_prompt(prompt, stdin=_NoStdin() if no_stdin else None)
    params.validate()
    engine = open_engine(load, remote, on_retry=lambda line: sys.stderr.write(f"{line}\n"))
    messages = None if raw else ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    request = Request(messages=messages, text=text if raw else None, params=params, max_new_tokens=max_new_tokens,
                      stop=stop, ignore_eos=ignore_eos)
    stream = engine.generate(request)
    out = whole_writes(sys.stdout)
    try:
        for piece in stream:
            if not json_out:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:  # Ctrl+C while a piece was written (a slow reader): the reply ends there,
        # the piece kept by whole_writes' buffer (typer would turn this into a silent exit 130)
        stream.close()
    res = stream.completion
    if json_out:
        out.write(json.dumps({
            "model": engine.name,
            "text": res.text,
            "prompt_token_ids": res.prompt_token_ids,
            "token_ids": res.token_ids,
            "finish_reason": res.finish_reason,
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
            "timings": {
                "load_s": round(engine.load_s, 4),
                "time_to_first_token_s": round(res.time_to_first_token_s, 4),
                "prefill_tokens_per_s": round(res.prefill_tokens_per_s, 2) if engine.tokenizer else None,
                "decode_tokens_per_s": round(res.decode_tokens_per_s, 2),
            },
        }, ensure_ascii=False) + "\n")
    elif res.text and not res.text.endswith("\n"):
        out.write("\n")
    out.flush()
    if verbose:
        sys.stderr.write(
            f"prompt {res.prompt_tokens} tokens, generated {res.completion_tokens} ({res.finish_reason}); "
            f"load {engine.load_s:.2f} s, first token {res.time_to_first_token_s:.2f} s, "
            f"prefill {res.prefill_tokens_per_s:.1f} tok/s, decode {res.decode_tokens_per_s:.1f} tok/s\n"
        )
        stats = engine.offload_stats()
        if stats:
            sys.stderr.write(f"expert cache: {stats['capacity_per_layer']} per layer on {engine.loaded.device}, "
                             f"hit rate {stats['hit_rate']:.0%} ({stats['hits']} hits, {stats['misses']} misses)\n")
    if res.finish_reason == "interrupted":
        sys.stderr.write("interrupted\n")
        return 130
    return 0


class _NoStdin:
    """--no-stdin: stdin as a terminal, never read."""

    def isatty(self) -> bool:
        return True
