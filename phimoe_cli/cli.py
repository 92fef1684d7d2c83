"""The `phimoe` command line: one thin function per command."""

from __future__ import annotations

import typer

from phimoe_cli import __version__

app = typer.Typer(
    name="phimoe",
    help="Chat with Microsoft's Phi-3.5-MoE-instruct on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"phimoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Chat with Microsoft's Phi-3.5-MoE-instruct on your own hardware."""


@app.command()
def tokenize(
    text: str = typer.Argument(None, help="The text to encode (default: read stdin).", show_default=False),
    model: str = typer.Option(
        "microsoft/Phi-3.5-MoE-instruct", "--model", "-m", help="Checkpoint directory or (downloaded) hub repo id."
    ),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Each stdin line is a JSON string (or array with --decode)."),
    chat: bool = typer.Option(False, "--chat", help="Encode TEXT as one user message in the chat format."),
    decode: bool = typer.Option(False, "--decode", help="Turn a JSON array of ids back into text."),
) -> None:
    """Print the token ids of TEXT (or stdin) as a JSON array: plain text, no chat template."""
    from phimoe_cli.tokenize_command import main as run_tokenize

    code = run_tokenize(text, model, revision=revision, jsonl=jsonl, chat=chat, decode=decode)
    if code:
        raise typer.Exit(code)


DEFAULT_MODEL = "microsoft/Phi-3.5-MoE-instruct"
_SAMPLING = "Sampling"


@app.command()
def generate(
    prompt: str = typer.Argument(None,
        help="The prompt; '-' or omitted: read stdin. Both: PROMPT, a blank line, stdin.", show_default=False),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub repo id or local checkpoint directory."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hugging Face cache."),
    system: str = typer.Option(None, "--system", "-s", help="A system message."),
    raw: bool = typer.Option(False, "--raw", help="Encode the prompt as is, without the chat format."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0,
        help="0 = greedy.", rich_help_panel=_SAMPLING),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k best tokens (0 = off).", rich_help_panel=_SAMPLING),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0,
        help="Nucleus sampling (1 = off).", rich_help_panel=_SAMPLING),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0,
        help="Drop tokens below min_p x the best (0 = off).", rich_help_panel=_SAMPLING),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty",
        help="> 1 discourages repeats (1 = off).", rich_help_panel=_SAMPLING),
    seed: int = typer.Option(None, "--seed", min=0, help="Make sampling reproducible.", rich_help_panel=_SAMPLING),
    stop: list[str] = typer.Option(None, "--stop", help="Stop at this text (repeatable; not printed)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past stop tokens (benchmarking)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (plan from free GPU memory)."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="Experts as none, int8, nf4 or fp4 (bitsandbytes)."),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="Also quantize q/k/v/o."),
    offload: str = typer.Option("none", "--offload",
        help="experts: kept in host RAM, the used ones cached on the device; disk: memory-mapped from the files."),
    gpu_memory: str = typer.Option(None, "--gpu-memory",
        help="Device memory for --offload / --device auto, e.g. 20GiB."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the text."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Write timings to stderr."),
) -> None:
    """Generate a reply to PROMPT (or stdin) and print it: stdout carries only the text."""
    from phimoe_cli.generate_command import run_generate
    from phimoe_cli.generation import SamplingParams

    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    code = run_generate(
        prompt, model=model, revision=revision, offline=offline or None, system=system, raw=raw,
        params=params, max_new_tokens=max_new_tokens, stop=stop or [], ignore_eos=ignore_eos,
        dtype=dtype, device=device, json_out=json_out, verbose=verbose,
        quantize=quantize, quantize_attention=quantize_attention, offload=offload, gpu_memory=gpu_memory,
    )
    raise typer.Exit(code)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Hub repo id or local checkpoint directory."),
    out: str = typer.Argument(..., help="Directory to write the quantized checkpoint to."),
    quant: str = typer.Option("nf4", "--quantize", "-q", help="int8, nf4 or fp4."),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="Also quantize q/k/v/o."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype of what is not quantized."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hugging Face cache."),
) -> None:
    """Write a quantized checkpoint (quantized tensor by tensor; loads fast with --model OUT)."""
    from phimoe_cli.hub import resolve_model
    from phimoe_cli.model import load_model
    from phimoe_cli.model.saving import save_quantized

    if quant == "none":
        raise typer.BadParameter("choose int8, nf4 or fp4", param_hint="--quantize")
    path = resolve_model(model, revision=revision, offline=offline or None)
    net = load_model(path, dtype=dtype, quantize=quant, quantize_attention=quantize_attention)
    typer.echo(str(save_quantized(net, path, out)))


@app.command(name="eval")
def evaluate(
    model: str = typer.Argument(..., help="Hub repo id or local checkpoint directory."),
    text: str = typer.Option(..., "--text", help="A UTF-8 text file to score."),
    quant: str = typer.Option("int8", "--quantize", "-q", help="int8, nf4 or fp4."),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="Also quantize q/k/v/o."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=2, help="Score at most this many tokens."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Quality cost of a quantization: KL divergence, top-1 agreement, perplexities."""
    import json
    from pathlib import Path

    from phimoe_cli.errors import UsageError
    from phimoe_cli.evaluate import evaluate as run_eval
    from phimoe_cli.hub import resolve_model
    from phimoe_cli.tokenizer import Tokenizer

    try:
        content = Path(text).read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {text}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{text} is not UTF-8 text") from None
    path = resolve_model(model)
    ids = Tokenizer.from_dir(path).encode(content)[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{text} has fewer than 2 tokens")
    result = run_eval(path, ids, quant, dtype=dtype, device=device, quantize_attention=quantize_attention)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{result['quantize']} on {result['tokens']} tokens: KL {result['kl']:.4f}, "
            f"top-1 agreement {result['top1_agreement']:.1%}, perplexity {result['perplexity']:.2f} "
            f"(reference {result['perplexity_reference']:.2f})"
        )


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub repo id or local checkpoint directory."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hugging Face cache."),
    system: str = typer.Option(None, "--system", "-s", help="A system message."),
    resume: str = typer.Option(None, "--resume", "-r", help="Continue a saved conversation (a JSON file, or 'last')."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", "-n", min=1,
        help="Most tokens per reply (default 1024)."),
    temperature: float = typer.Option(None, "--temperature", "-t", min=0.0,
        help="0 = greedy (default 0.7).", rich_help_panel=_SAMPLING),
    top_k: int = typer.Option(None, "--top-k", min=0,
        help="Keep the k best tokens (0 = off) (default 0).", rich_help_panel=_SAMPLING),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0,
        help="Nucleus sampling (1 = off) (default 0.95).", rich_help_panel=_SAMPLING),
    min_p: float = typer.Option(None, "--min-p", min=0.0, max=1.0,
        help="Drop tokens below min_p x the best (default 0).", rich_help_panel=_SAMPLING),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty",
        help="> 1 discourages repeats (default 1).", rich_help_panel=_SAMPLING),
    seed: int = typer.Option(None, "--seed", min=0, help="Make sampling reproducible.", rich_help_panel=_SAMPLING),
    stop: list[str] = typer.Option(None, "--stop", help="End a reply at this text (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past stop tokens (tests, benchmarks)."),
    context: int = typer.Option(None, "--context", min=16, help="Context length in tokens (default the model's)."),
    on_overflow: str = typer.Option("drop-oldest", "--on-overflow",
        help="When the context is full: drop-oldest (turns) or error."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (plan from free GPU memory)."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="Experts as none, int8, nf4 or fp4 (bitsandbytes)."),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="Also quantize q/k/v/o."),
    offload: str = typer.Option("none", "--offload",
        help="experts: kept in host RAM, the used ones cached on the device; disk: memory-mapped from the files."),
    gpu_memory: str = typer.Option(None, "--gpu-memory",
        help="Device memory for --offload / --device auto, e.g. 20GiB."),
    plain: bool = typer.Option(False, "--plain", help="Print replies as raw text, not Markdown."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history."),
) -> None:
    """Chat in the terminal (/help inside). With stdin piped: answer it as one message and exit."""
    from phimoe_cli.repl import run_chat

    raise typer.Exit(run_chat(
        model=model, revision=revision, offline=offline or None, system=system, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        max_new_tokens=max_new_tokens, stop=stop or [], ignore_eos=ignore_eos, dtype=dtype, device=device,
        context=context, plain=plain, no_history=no_history, resume=resume, on_overflow=on_overflow,
        quantize=quantize, quantize_attention=quantize_attention, offload=offload, gpu_memory=gpu_memory,
    ))


@app.command()
def download(
    repo: str = typer.Argument(DEFAULT_MODEL, help="Hub repo id."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit."),
) -> None:
    """Fetch a model into the Hugging Face cache (resumable) and print where it went."""
    from phimoe_cli.hub import download_model

    typer.echo(str(download_model(repo, revision=revision)))


@app.command()
def info(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub repo id or local checkpoint directory."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hugging Face cache."),
    context: int = typer.Option(4096, "--context", min=1, help="Context length for the KV-cache estimate."),
    plan: bool = typer.Option(False, "--plan", help="Also show where --device auto would place the model."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="With --plan: none, int8, nf4 or fp4 experts."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="With --plan: device memory to plan for, e.g. 24GiB."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Architecture, parameters and memory needs from config.json alone (no weight download)."""
    from phimoe_cli.info_command import run_info
    from phimoe_cli.runtime import parse_size

    run_info(model, revision=revision, offline=offline or None, context=context, json_out=json_out,
             plan=plan, quantize=quantize, gpu_memory=parse_size(gpu_memory))


@app.command()
def bench(
    shape: str = typer.Option("mid", "--shape", help="phi-3.5-moe (the real dimensions), mid or tiny."),
    prompt_tokens: int = typer.Option(128, "-p", "--prompt-tokens", min=1, help="Prompt tokens to prefill."),
    gen_tokens: int = typer.Option(64, "-n", "--gen-tokens", min=0, help="Tokens to decode after the prompt."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Timed runs; the best counts."),
    layers: int = typer.Option(None, "--layers", min=1, help="Keep only N layers (to fit memory)."),
    compare: str = typer.Option(None, "--compare", help="Also run 'transformers' on the same weights."),
    quantize: str = typer.Option("none", "--quantize", "-q", help="Experts as none, int8, nf4 or fp4."),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="Also quantize q/k/v/o."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Prefill and decode speed of a random-weight model of a given shape, against the roofline."""
    from phimoe_cli.bench import main as run_bench

    raise typer.Exit(run_bench(
        as_json=json_out, shape=shape, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, dtype=dtype,
        device=device, threads=threads, repeat=repeat, layers=layers, compare=compare, quantize=quantize,
        quantize_attention=quantize_attention,
    ))


def _click_errors():
    """typer's click exception classes (recent typer vendors click; older ones use click)."""
    try:
        from typer._click import exceptions as errors
    except ImportError:  # pragma: no cover
        from click import exceptions as errors

    class _Never(Exception):
        pass

    abort = getattr(typer, "Abort", None) or getattr(errors, "Abort", _Never)
    return getattr(errors, "NoArgsIsHelpError", _Never), errors.UsageError, errors.ClickException, abort


def main() -> None:
    """Entry point: known failures become one 'error:' line and an exit code, never a traceback."""
    import os
    import sys
    import warnings

    # a warning (no C compiler, a kernel falling back) is one line, as errors are
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    no_args, usage_error, click_error, abort = _click_errors()
    try:
        result = app(standalone_mode=False)  # typer.Exit(code) comes back as the result
        code = result if isinstance(result, int) else 0
    except no_args as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n")
        code = 0
    except usage_error as exc:  # unknown option, bad value: one line, exit 2
        command = f"phimoe {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else "phimoe"
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())} (see '{command} --help')\n")
        code = 2
    except click_error as exc:
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}\n")
        code = exc.exit_code
    except (KeyboardInterrupt, abort):
        sys.stderr.write("\ninterrupted\n")
        code = 130
    except BrokenPipeError:
        code = 141  # the reader went away (| head): nothing more to say
    except Exception as exc:
        if os.environ.get("PHIMOE_DEBUG"):
            raise
        from phimoe_cli.errors import PhimoeError, report

        if isinstance(exc, PhimoeError):
            code = report(exc)
        else:  # not one we explain: a bug, or a failure we have not met yet
            text = " ".join(str(exc).split()) or type(exc).__name__
            sys.stderr.write(f"error: {type(exc).__name__}: {text} (set PHIMOE_DEBUG=1 for a traceback)\n")
            code = 1
    _quiet_exit(code)


def _quiet_exit(code: int) -> None:
    """Exit without a second BrokenPipeError when stdout's reader has gone away."""
    import os
    import sys

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or 141
    sys.exit(code)


if __name__ == "__main__":
    main()
