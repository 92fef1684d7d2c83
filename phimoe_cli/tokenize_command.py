"""`phimoe tokenize`: text -> token ids (and back), a debugging aid and a stable contract for tools.

Output contract:
* encode (default, ``--chat``): one JSON array of ids per input, on one line.
* ``--decode``: the text, followed by a newline; with ``--jsonl`` one JSON string per line (exact).
* errors: one line on stderr starting with ``error:``; exit code 2 for bad input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from phimoe_cli.errors import PhimoeError, UsageError, report
from phimoe_cli.tokenizer import Tokenizer, TokenizerError


def resolve_tokenizer_dir(model: str, revision: str | None = None) -> Path:
    """The directory holding ``model``'s tokenizer files.

    A local directory is used as it is. A hub repo id is looked up in the local Hugging Face cache
    only (through :mod:`phimoe_cli.hub` when it is installed): tokenizing never starts the
    checkpoint's download.
    """
    path = Path(model).expanduser()
    if path.is_dir() and revision is None:
        return path
    try:
        from phimoe_cli import hub
    except ImportError:
        raise UsageError(f"model directory '{model}' does not exist") from None
    local = hub.is_local_path(model)
    try:
        if local:
            return hub.resolve_model(model, revision=revision)
        return hub.resolve_model(model, revision=revision, offline=True)
    except hub.HubError as exc:
        prefix = "" if local else "`phimoe tokenize` reads the local cache only, never downloads: "
        raise UsageError(prefix + str(exc), exit_code=getattr(exc, "exit_code", 2) or 2) from None


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not valid UTF-8 (byte {exc.start})") from None


def _parse_ids(value: Any, where: str, tok: Tokenizer) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise UsageError(f"{where}: expected a JSON array of token ids")
    for i in value:
        if not tok.is_real(i):
            raise UsageError(f"{where}: {i} is not a token id of this tokenizer (0..{tok.num_real_tokens - 1})")
    return value


def _load_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where}: invalid JSON: {exc}") from None


def _transform(tok: Tokenizer, value: Any, where: str, *, chat: bool, decode: bool, jsonl: bool) -> str:
    """One input -> one output line (without the newline)."""
    if decode:
        text = tok.decode(_parse_ids(value, where, tok), skip_special_tokens=False)
        return json.dumps(text, ensure_ascii=False) if jsonl else text
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a JSON string")
    try:
        ids = tok.apply_chat([{"role": "user", "content": value}]) if chat else tok.encode(value)
    except TokenizerError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return json.dumps(ids)


def run(text: str | None, model: str, *, revision: str | None, jsonl: bool, chat: bool, decode: bool) -> None:
    """Raises UsageError / TokenizerError for the caller to report."""
    if chat and decode:
        raise UsageError("--chat and --decode cannot be combined")
    if jsonl and text is not None:
        raise UsageError("--jsonl reads its lines from stdin: do not pass TEXT")
    tok = Tokenizer.from_dir(resolve_tokenizer_dir(model, revision))
    out = sys.stdout.buffer

    def emit(line: str) -> None:
        out.write(line.encode("utf-8") + b"\n")
        out.flush()

    if jsonl:
        lines = _read_stdin().split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line (or empty input)
        for number, line in enumerate(lines, start=1):
            where = f"stdin line {number}"
            emit(_transform(tok, _load_json(line, where), where, chat=chat, decode=decode, jsonl=True))
        return
    source = text if text is not None else _read_stdin()
    where = "TEXT" if text is not None else "stdin"
    value: Any = _load_json(source, where) if decode else source
    emit(_transform(tok, value, where, chat=chat, decode=decode, jsonl=False))


def main(text: str | None, model: str, *, revision: str | None, jsonl: bool, chat: bool, decode: bool) -> int:
    """Run the command; report errors as one ``error:`` line on stderr. Returns the exit code."""
    try:
        run(text, model, revision=revision, jsonl=jsonl, chat=chat, decode=decode)
    except TokenizerError as exc:  # here the tokenizer's input is what the user typed: exit 2
        return report(UsageError(str(exc)))
    except PhimoeError as exc:
        return report(exc)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0
