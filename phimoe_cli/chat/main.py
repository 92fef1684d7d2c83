"""`phimoe chat`: load the model, resume or start a conversation, then the loop (or, with stdin
piped, one reply)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.text import Text

from phimoe_cli.chat.conversation import OVERFLOW_POLICIES, ContextOverflow, latest_autosave, resolve_settings
from phimoe_cli.chat.input import make_prompt_session
from phimoe_cli.chat.session import ChatSession
from phimoe_cli.errors import UsageError
from phimoe_cli.options import DEFAULT_MODEL, LoadOptions, Remote
from phimoe_cli.params import GenerationError
from phimoe_cli.runtime import open_engine, read_prompt, whole_writes
from phimoe_cli.transcript import Transcript, TranscriptError, data_dir, private_file


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def run_chat(*, load: LoadOptions, system: str | None, sampling: dict, max_new_tokens: int | None,
             stop: list[str], ignore_eos: bool, context: int | None, plain: bool, no_history: bool,
             resume: str | None, on_overflow: str, remote: Remote | None = None) -> int:
    if on_overflow not in OVERFLOW_POLICIES:
        raise UsageError(f"--on-overflow must be drop-oldest or error, got {on_overflow!r}")
    transcript, resume_path = None, None
    if resume:
        resume_path = latest_autosave() if resume == "last" else Path(resume).expanduser()
        try:
            transcript = Transcript.load(resume_path)
        except TranscriptError as exc:
            raise UsageError(str(exc)) from None
    if transcript is not None:
        load, remote = _resumed_model(transcript.model, load, remote)
    settings = resolve_settings(dict(sampling, max_new_tokens=max_new_tokens), transcript)
    try:
        settings.params.validate()
    except GenerationError as exc:
        raise UsageError(str(exc)) from None

    interactive = sys.stdin is not None and sys.stdin.isatty()
    text = None if interactive else read_prompt(None)  # piped: one message, read before loading

    history_path = None
    if interactive and not no_history and not _env_flag("PHIMOE_NO_HISTORY"):
        history_path = data_dir() / "history"
        try:
            private_file(history_path)
        except OSError as exc:
            sys.stderr.write(f"warning: no history ({history_path}: {exc.strerror or exc})\n")
            history_path = None

    console = Console(file=whole_writes(sys.stdout if interactive else sys.stderr), highlight=False)
    engine = open_engine(load, remote, context=context,
                         on_retry=lambda line: console.print(Text(line, style="yellow"), soft_wrap=True))
    session = ChatSession(
        engine, settings, system=system if transcript is None else None, stop=stop, ignore_eos=ignore_eos,
        plain=plain or not interactive, on_overflow=on_overflow, console=console, history_path=history_path,
    )
    if transcript is not None:
        session.load_transcript(transcript, resume_path, show=interactive, settings=False)
        if system:
            session.conv.set_system(system)

    if not interactive:
        session.saver.enabled = False  # a one-shot answer, like `phimoe generate`
        try:
            turn = session.reply(text, out=sys.stdout, show_stats=False)
        except ContextOverflow as exc:
            raise UsageError(str(exc)) from None
        if turn.finish_reason == "interrupted":
            sys.stderr.write("interrupted\n")
            return 130
        return 0
    return session.repl(make_prompt_session(history_path))


def _resumed_model(saved: dict, load: LoadOptions, remote: Remote | None) -> tuple[LoadOptions, Remote | None]:
    """With --resume and no --model (nor --base-url): the transcript's model, as it was loaded (its
    directory if it is still there, else its id and revision; its dtype and quantization unless the
    command line says otherwise), or the server it was served by."""
    if load.model != DEFAULT_MODEL or (remote is not None and remote.base_url) or not saved.get("id"):
        return load, remote
    if saved.get("base_url"):
        return replace(load, model=saved["id"]), Remote(saved["base_url"], remote.api_key if remote else None)
    path = saved.get("path")
    local = isinstance(path, str) and Path(path).is_dir()
    changes = {"model": path if local else saved["id"]}
    if not local and load.revision is None and saved.get("revision"):
        changes["revision"] = saved["revision"]
    if load.dtype == "auto" and saved.get("dtype") in ("bfloat16", "float16", "float32"):
        changes["dtype"] = saved["dtype"]
    if load.quantize == "none" and saved.get("quantization") in ("int8", "nf4", "fp4"):
        changes["quantize"] = saved["quantization"]
    return replace(load, **changes), remote
