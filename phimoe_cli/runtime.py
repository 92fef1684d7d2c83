"""What the commands share: reading a prompt from arguments and stdin, writing a reply to stdout,
and loading a model with its tokenizer. Errors: phimoe_cli.errors."""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phimoe_cli.errors import UsageError
from phimoe_cli.options import LoadOptions

if TYPE_CHECKING:  # the model (torch) and the hub are imported when a model is loaded, not before
    from phimoe_cli.model import PhimoeForCausalLM
    from phimoe_cli.tokenizer import Tokenizer


def whole_writes(stream):
    """``stream``, or, where it writes straight to its file descriptor (``python -u``,
    PYTHONUNBUFFERED=1), the same descriptor through a buffer. An unbuffered text stream drops the
    rest of a write that a signal cut short (the reader slow, then Ctrl+C), where a buffer keeps it
    for the next flush: `phimoe generate | slow-reader` lost text; the chat's live area, erased by
    counting lines, erased lines above itself, and lines came twice."""
    if not isinstance(getattr(stream, "buffer", None), io.RawIOBase):
        return stream
    try:
        raw = io.FileIO(stream.fileno(), "w", closefd=False)  # its own: closing it leaves ``stream`` open
    except (OSError, ValueError, AttributeError):
        return stream
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding=stream.encoding, errors=stream.errors,
                            line_buffering=True)


def read_prompt(prompt: str | None, stdin=None) -> str:
    """PROMPT as given; ``-`` or nothing with stdin piped: stdin; both: PROMPT, a blank line, stdin."""
    if prompt is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
            raise UsageError("the prompt argument is not valid UTF-8") from None
    stdin = stdin if stdin is not None else sys.stdin
    piped = stdin is not None and not stdin.isatty()
    if prompt == "-":
        if not piped:
            raise UsageError("prompt '-' means stdin, but stdin is a terminal: pipe text in")
        prompt, extra = None, _read_stdin(stdin)
    elif piped:
        extra = _read_stdin(stdin)
    else:
        extra = None
    if prompt is None and extra is None:
        raise UsageError("no prompt: give PROMPT as an argument or pipe text on stdin")
    text = "\n\n".join(p for p in (prompt, extra) if p is not None and p.strip())
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


def _read_stdin(stdin) -> str:
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    if b"\x00" in data:
        raise UsageError("stdin looks binary (it contains NUL bytes); pipe text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not valid UTF-8 (byte {exc.start})") from None


@dataclass
class Loaded:
    model_id: str
    revision: str | None
    path: Path
    model: PhimoeForCausalLM
    tokenizer: Tokenizer
    dtype: str
    device: str
    load_s: float

    @property
    def quantize(self) -> str:
        return getattr(self.model, "quantization", {}).get("quantize", "none")


def load(options: LoadOptions | str, progress: bool | None = None) -> Loaded:
    """Resolve the model (a directory or hub repo id; a string: that model, defaults otherwise),
    then load its tokenizer and weights."""
    from phimoe_cli.hub import resolve_model
    from phimoe_cli.tokenizer import Tokenizer

    o = LoadOptions(model=options) if isinstance(options, str) else options
    t0 = time.perf_counter()
    path = resolve_model(o.model, revision=o.revision, offline=o.offline, progress=progress)
    tokenizer = Tokenizer.from_dir(path)
    from phimoe_cli.model import load_model  # torch: after the model and its tokenizer are found

    net = load_model(path, dtype=o.dtype, device=o.device, progress=progress, quantize=o.quantize,
                     quantize_attention=o.quantize_attention, quantize_head=o.quantize_head, offload=o.offload,
                     gpu_memory=parse_size(o.gpu_memory))
    dtype_name = str(next(net.parameters()).dtype).replace("torch.", "")
    device_name = str(net.model.embed_tokens.weight.device.type)
    return Loaded(o.model, o.revision, path, net, tokenizer, dtype_name, device_name, time.perf_counter() - t0)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_size(text: str | None) -> int | None:
    """'20GiB', '20GB', '512MiB', '1.5e9' -> bytes (None stays None)."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read the size {text!r}: use e.g. 20GiB, 24GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def open_engine(options: LoadOptions, remote=None, context: int | None = None, on_retry=None):
    """The engine a front end talks to: the model of ``options`` loaded here, or, with
    ``remote.base_url``, the server there (load options other than --model are refused)."""
    if remote is not None and remote.base_url:
        given = options.given()
        if given:
            raise UsageError(f"{', '.join(given)}: options for loading a model here; with --base-url the server "
                             "has loaded its own")
        from phimoe_cli.options import DEFAULT_MODEL
        from phimoe_cli.remote import RemoteEngine

        model = None if options.model == DEFAULT_MODEL else options.model  # not given: the server's only model
        return RemoteEngine(remote.base_url, remote.api_key, model, context_length=context, on_retry=on_retry)
    from phimoe_cli.engine import LocalEngine

    if context is not None:  # refuted by config.json alone: say so before the weights load (minutes)
        from phimoe_cli.hub import resolve_config
        from phimoe_cli.model.config import PhimoeConfig

        config = PhimoeConfig.from_file(resolve_config(options.model, revision=options.revision,
                                                       offline=options.offline))
        if context > config.max_position_embeddings:
            raise UsageError(f"--context {context} is more than the model's {config.max_position_embeddings} tokens")
    return LocalEngine(load(options), context_length=context)
