"""The `phimoe` command line: one thin function per command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from phimoe_cli import __version__, options
from phimoe_cli.params import MAX_NEW_TOKENS

app = typer.Typer(
    name="phimoe",
    help="Chat with Microsoft's Phi-3.5-MoE-instruct on your own hardware.",
    no_args_is_help=True,
    add_completion=True,
    epilog=("Examples:\n\n"
            "phimoe chat -q nf4                        a conversation (4-bit experts)\n\n"
            "phimoe generate -t 0 \"Name a river\"      one reply on stdout\n\n"
            "git diff | phimoe generate - -s \"Review this.\"\n\n"
            "phimoe serve --port 8000                  an OpenAI-compatible API\n\n"
            "phimoe chat --base-url http://host:8000/v1   a model served elsewhere\n\n"
            "phimoe info --plan                        what the model needs here"),
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
    text: Annotated[str | None, typer.Argument(help="The text to encode (default: read stdin).",
                                               show_default=False)] = None,
    model: options.Model = options.DEFAULT_MODEL,
    revision: options.Revision = None,
    jsonl: Annotated[bool, typer.Option(
        "--jsonl", help="Each stdin line is a JSON string (or array with --decode).")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Encode TEXT as one user message in the chat format.")] = False,
    decode: Annotated[bool, typer.Option("--decode", help="Turn a JSON array of ids back into text.")] = False,
) -> None:
    """Print the token ids of TEXT (or stdin) as a JSON array: plain text, no chat template."""
    from phimoe_cli.tokenize_command import main as run_tokenize

    code = run_tokenize(text, model, revision=revision, jsonl=jsonl, chat=chat, decode=decode)
    if code:
        raise typer.Exit(code)


@app.command()
@options.with_sampling
@options.with_loading
@options.with_remote
def generate(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; '-' or omitted: read stdin. Both: PROMPT, a blank line, stdin.", show_default=False)] = None,
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    raw: Annotated[bool, typer.Option("--raw", help="Encode the prompt as is, without the chat format.")] = False,
    max_new_tokens: options.MaxNewTokens = None,
    stop: options.Stop = None,
    ignore_eos: options.IgnoreEos = False,
    json_out: options.Json = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Write timings to stderr.")] = False,
    no_stdin: Annotated[bool, typer.Option(
        "--no-stdin", help="Never read stdin (in a `while read` loop, or beside an open, silent pipe).")] = False,
    load: options.LoadOptions | None = None,
    sampling: dict | None = None,
    remote: options.Remote | None = None,
) -> None:
    """Generate a reply to PROMPT (or stdin) and print it: stdout carries only the text."""
    from phimoe_cli.generate_command import run_generate

    raise typer.Exit(run_generate(
        prompt, load=load, system=system, raw=raw, params=options.sampling(sampling or {}),
        max_new_tokens=max_new_tokens or MAX_NEW_TOKENS["generate"], stop=stop or [], ignore_eos=ignore_eos,
        json_out=json_out, verbose=verbose, remote=remote, no_stdin=no_stdin,
    ))


@app.command()
def quantize(
    model: options.ModelArg,
    out: Annotated[str, typer.Argument(help="Directory to write the quantized checkpoint to.")],
    quantize: options.Quantize = None,
    quantize_attention: options.QuantizeAttention = False,
    quantize_head: options.QuantizeHead = False,
    dtype: options.Dtype = "auto",
    revision: options.Revision = None,
    offline: options.Offline = False,
) -> None:
    """Write a quantized checkpoint (quantized tensor by tensor; loads fast with --model OUT). -q: nf4
    unless given."""
    quant = quantize or "nf4"
    if quant == "none":
        raise typer.BadParameter("choose int8, nf4 or fp4", param_hint="--quantize")
    from phimoe_cli.errors import UsageError

    target = Path(out).expanduser()
    try:  # before minutes of loading and quantizing: can OUT be written, and is it free?
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise UsageError(f"{target} exists and is not empty")
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None
    from phimoe_cli.hub import resolve_model
    from phimoe_cli.model import load_model
    from phimoe_cli.model.saving import save_quantized

    path = resolve_model(model, revision=revision, offline=offline or None)
    net = load_model(path, dtype=dtype, quantize=quant, quantize_attention=quantize_attention,
                     quantize_head=quantize_head)
    try:
        typer.echo(str(save_quantized(net, path, target)))
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None


@app.command(name="eval")
def evaluate(
    model: options.ModelArg,
    text: Annotated[str, typer.Option("--text", help="A UTF-8 text file to score.")],
    quantize: options.Quantize = None,
    quantize_attention: options.QuantizeAttention = False,
    quantize_head: options.QuantizeHead = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Score at most this many tokens.")] = 1024,
    dtype: options.Dtype = "auto",
    device: options.Device = "cpu",
    json_out: options.Json = False,
) -> None:
    """Quality cost of a quantization (-q: int8 unless given): KL divergence, top-1 agreement,
    perplexities."""
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
    result = run_eval(path, ids, quantize or "int8", dtype=dtype, device=device, quantize_attention=quantize_attention,
                      quantize_head=quantize_head)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{result['quantize']} on {result['tokens']} tokens: KL {result['kl']:.4f}, "
            f"top-1 agreement {result['top1_agreement']:.1%}, perplexity {result['perplexity']:.2f} "
            f"(reference {result['perplexity_reference']:.2f})"
        )


@app.command()
@options.with_sampling
@options.with_loading
@options.with_remote
def chat(
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", "-r", help="Continue a saved conversation (a JSON file, or 'last').")] = None,
    max_new_tokens: options.MaxNewTokens = None,
    stop: options.Stop = None,
    ignore_eos: options.IgnoreEos = False,
    context: options.Context = None,
    on_overflow: Annotated[str, typer.Option(
        "--on-overflow", help="When the context is full: drop-oldest (turns) or error.")] = "drop-oldest",
    plain: Annotated[bool, typer.Option("--plain", help="Print replies as raw text, not Markdown.")] = False,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not read or write the input history.")] = False,
    load: options.LoadOptions | None = None,
    sampling: dict | None = None,
    remote: options.Remote | None = None,
) -> None:
    """Chat in the terminal (/help inside). With stdin piped: answer it as one message and exit."""
    from phimoe_cli.chat import run_chat

    raise typer.Exit(run_chat(
        load=load, system=system, sampling=sampling or {}, max_new_tokens=max_new_tokens,
        stop=stop or [], ignore_eos=ignore_eos, context=context, plain=plain, no_history=no_history, resume=resume,
        on_overflow=on_overflow, remote=remote,
    ))


@app.command()
@options.with_loading
def serve(
    model: options.Model = options.DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    api_key: options.ServeApiKey = None,
    served_model_name: Annotated[str | None, typer.Option(
        "--served-model-name", show_default=False, help="The model's name in the API (default: --model as given).")]
    = None,
    context: options.Context = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting or running before 429.")]
    = 64,
    cache_memory: Annotated[str, typer.Option(
        "--cache-memory", help="KV cache kept for clients that resend a conversation (LRU beyond it).")] = "2GiB",
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Allow browsers from this origin (repeatable; default: no CORS).")] = None,
    load: options.LoadOptions | None = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    from phimoe_cli.server.main import run_serve

    raise typer.Exit(run_serve(load=load, host=host, port=port, api_key=api_key, served_name=served_model_name,
                               context=context, max_queue=max_queue, cache_memory=cache_memory,
                               cors_origins=cors_origin or []))


@app.command()
def download(
    repo: Annotated[str, typer.Argument(help="Hub repo id.")] = options.DEFAULT_MODEL,
    revision: options.Revision = None,
) -> None:
    """Fetch a model into the Hugging Face cache (resumable) and print where it went."""
    from phimoe_cli.hub import download_model

    typer.echo(str(download_model(repo, revision=revision)))


@app.command()
def info(
    model_arg: Annotated[str | None, typer.Argument(
        metavar="[MODEL]", help="Hub repo id or local checkpoint directory (or --model).", show_default=False)] = None,
    model: options.Model = options.DEFAULT_MODEL,
    revision: options.Revision = None,
    offline: options.Offline = False,
    context: options.Context = None,
    plan: Annotated[bool, typer.Option("--plan", help="Also show where --device auto would place the model.")] = False,
    quantize: options.Quantize = None,
    gpu_memory: options.GpuMemory = None,
    json_out: options.Json = False,
) -> None:
    """Architecture, parameters and memory needs from config.json alone (no weight download)."""
    from phimoe_cli.errors import UsageError
    from phimoe_cli.info_command import run_info
    from phimoe_cli.runtime import parse_size

    if model_arg is not None and model != options.DEFAULT_MODEL and model_arg != model:
        raise UsageError(f"two models given: {model_arg!r} and --model {model!r}")
    run_info(model_arg or model, revision=revision, offline=offline or None, context=context or 4096, json_out=json_out,
             plan=plan, quantize=quantize or "none", gpu_memory=parse_size(gpu_memory))


@app.command()
def bench(
    shape: Annotated[str, typer.Option("--shape", help="phi-3.5-moe (the real dimensions), mid or tiny.")] = "mid",
    prompt_tokens: Annotated[int, typer.Option("-p", "--prompt-tokens", min=1, help="Prompt tokens to prefill.")] = 128,
    gen_tokens: Annotated[int, typer.Option("-n", "--gen-tokens", min=0,
                                            help="Tokens to decode after the prompt.")] = 64,
    dtype: options.Dtype = "auto",
    device: options.Device = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: torch's).")] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs; the best counts.")] = 3,
    layers: Annotated[int | None, typer.Option("--layers", min=1, help="Keep only N layers (to fit memory).")] = None,
    compare: Annotated[str | None, typer.Option("--compare",
                                                help="Also run 'transformers' on the same weights.")] = None,
    quantize: options.Quantize = None,
    quantize_attention: options.QuantizeAttention = False,
    quantize_head: options.QuantizeHead = False,
    offload: options.Offload = "none",
    gpu_memory: options.GpuMemory = None,
    json_out: options.Json = False,
) -> None:
    """Prefill and decode speed of a random-weight model of a given shape, against the roofline."""
    from phimoe_cli.bench import main as run_bench
    from phimoe_cli.runtime import parse_size

    raise typer.Exit(run_bench(
        as_json=json_out, shape=shape, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, dtype=dtype,
        device=device, threads=threads, repeat=repeat, layers=layers, compare=compare, quantize=quantize or "none",
        quantize_attention=quantize_attention, quantize_head=quantize_head, offload=offload,
        gpu_memory=parse_size(gpu_memory),
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


class _ReaderGone(Exception):
    """stdout's reader went away (BrokenPipeError), carried past click, which would exit 1 silently."""


class _Interrupted(Exception):
    """Ctrl+C, carried past typer, which would exit 130 without a word."""


def _carry(callback):
    """A command's callback whose Ctrl+C and broken stdout reach main() as they happened."""
    import functools

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc
        except KeyboardInterrupt as exc:
            raise _Interrupted() from exc

    run.carried = True
    return run


def main() -> None:
    """Entry point: known failures become one 'error:' line and an exit code, never a traceback."""
    import os
    import sys
    import warnings

    for command in app.registered_commands:
        if not getattr(command.callback, "carried", False):
            command.callback = _carry(command.callback)

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
    except (KeyboardInterrupt, _Interrupted, abort):
        sys.stderr.write("\ninterrupted\n")
        code = 130
    except (BrokenPipeError, _ReaderGone):
        code = 141  # the reader went away (| head): nothing more to say
    except Exception as exc:
        if os.environ.get("PHIMOE_DEBUG"):
            raise
        from phimoe_cli.errors import PhimoeError, report

        if isinstance(exc, PhimoeError):
            code = report(exc)
        elif type(exc).__name__ == "OutOfMemoryError":  # torch's, on a GPU: what to try, not its page of advice
            first = " ".join(str(exc).split(". ")[0].split()) or "out of memory"
            sys.stderr.write(f"error: {first}: the model, its cache or the prompt does not fit the GPU; try -q nf4, "
                             "--offload experts, a smaller --gpu-memory or --device cpu\n")
            code = 1
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
        broken = code == 141  # (a command's own buffer on stdout, runtime.whole_writes, may hold the rest)
    except BrokenPipeError:
        broken, code = True, code or 141
    if broken:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    main()
