"""`phimoe chat`: the interactive conversation.

One model, one KV cache and one conversation per session. Every turn sends the whole conversation,
but the cache already holds everything before the new user message (the prompt, and the reply
exactly as it was generated), so only the new tokens are computed. The conversation is kept as
the ids the model saw: a reply is never re-tokenized (a different tokenization of the same text
would defeat the cache), it is followed by the chat format's closing tokens, and the next user
message is encoded on its own by the chat format.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from phimoe_cli.chat_render import MarkdownStream, PlainStream
from phimoe_cli.engine import LocalEngine, Request
from phimoe_cli.errors import UsageError
from phimoe_cli.generation import GenerationError, SamplingParams
from phimoe_cli.options import LoadOptions, sampling
from phimoe_cli.params import MAX_NEW_TOKENS
from phimoe_cli.runtime import load as load_model
from phimoe_cli.runtime import read_prompt
from phimoe_cli.transcript import Transcript, TranscriptError, data_dir, private_dir, private_file

OVERFLOW_POLICIES = ("drop-oldest", "error")
PROMPT = ">>> "
CONTINUATION = "... "

# /set NAME VALUE: every sampling parameter and the reply length. Aliases -> canonical name.
SETTINGS = {
    "temperature": "temperature", "temp": "temperature", "t": "temperature",
    "top_k": "top_k", "top-k": "top_k",
    "top_p": "top_p", "top-p": "top_p",
    "min_p": "min_p", "min-p": "min_p",
    "repetition_penalty": "repetition_penalty", "repetition-penalty": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "seed": "seed",
    "max_new_tokens": "max_new_tokens", "max-new-tokens": "max_new_tokens", "n": "max_new_tokens",
}
SETTING_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_new_tokens")

COMMANDS = {
    "/help": "show this help",
    "/exit": "leave (also /quit, /bye, Ctrl+D)",
    "/clear": "start a new conversation (keeps the system prompt)",
    "/system": "/system TEXT sets the system prompt; /system alone shows it",
    "/set": "/set NAME VALUE: temperature, top_k, top_p, min_p, repetition_penalty, seed (none = random), "
            "max_new_tokens; /set alone lists them",
    "/show": "model, settings, context, history and autosave files",
    "/save": "/save [FILE]: write the conversation as JSON (default ./chat-DATE-TIME.json)",
    "/load": "/load FILE: continue a saved conversation",
    "/retry": "generate the last reply again",
    "/undo": "remove the last exchange (your message and the reply)",
    "/stats": "speed and cache use of the last turn, and of the session",
}
ALIASES = {"/quit": "/exit", "/bye": "/exit", "/q": "/exit", "/?": "/help", "/h": "/help"}

KEYS = [
    ("Enter", "send"),
    ("Esc Enter / Alt+Enter", "new line (pasted text keeps its newlines)"),
    ("Up / Down, Ctrl+R", "history, search the history"),
    ("Tab", "complete a /command"),
    ("Ctrl+C", "stop the reply (it is kept, marked interrupted); at the prompt: clear the line"),
    ("Ctrl+D", "quit (on an empty line)"),
]


class ContextOverflow(Exception):
    """The conversation does not fit the context; one line for the user."""


# ------------------------------------------------------------------------------------------------
# Conversation bookkeeping (no model, no terminal: unit-testable)
# ------------------------------------------------------------------------------------------------


def closing_ids(tokenizer) -> list[int] | None:
    """The ids the chat format writes after an assistant reply (``<|end|>`` and what follows),
    or None when the format cannot be built one message at a time (then every turn is encoded
    whole and the cache reuses the longest common prefix)."""
    user = {"role": "user", "content": "a"}
    try:
        one = tokenizer.apply_chat([user], add_generation_prompt=True)
        two = tokenizer.apply_chat([user, {"role": "assistant", "content": ""}, user], add_generation_prompt=True)
    except Exception:
        return None
    n = len(one)
    if len(two) <= 2 * n or two[:n] != one or two[-n:] != one:
        return None
    return two[n:-n]


def group_turns(messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, turns): a turn is a user message and what follows it."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    system, turns = list(messages[:i]), []
    for m in messages[i:]:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return system, turns


def drop_oldest_turns(messages: Sequence[dict], measure: Callable[[list[dict]], int],
                      budget: int) -> tuple[list[dict], list[dict]]:
    """Drop whole turns, oldest first, until ``measure(kept) <= budget``; the system prompt stays.
    Returns (kept, dropped). Raises ContextOverflow when even the last turn alone is too long."""
    system, turns = group_turns(messages)
    dropped: list[dict] = []
    while True:
        kept = system + [m for t in turns for m in t]
        size = measure(kept)
        if size <= budget:
            return kept, dropped
        if len(turns) <= 1:
            raise ContextOverflow(
                f"your message needs {size} tokens with the system prompt; the context leaves "
                f"{budget} for the prompt: shorten it (or the system prompt)"
            )
        dropped += turns.pop(0)


class Conversation:
    """Messages, plus the exact ids the model has seen for the first ``known_count`` of them."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.closing = closing_ids(tokenizer)
        self.messages: list[dict] = []
        self.dropped: list[dict] = []
        self.reset_ids()
        if system:
            self.messages.append({"role": "system", "content": system})

    # exact ids ------------------------------------------------------------------------------

    def reset_ids(self) -> None:
        self.known: list[int] = []  # ids of messages[:known_count], as the model saw them
        self.known_count = 0
        self.marks: dict[int, tuple[int, int]] = {}  # len(messages) -> (len(known), known_count)

    def prompt_ids(self) -> list[int]:
        """The prompt for a reply to the conversation as it is now."""
        return self.known + self.tok.apply_chat(self.messages[self.known_count :], add_generation_prompt=True)

    def measure(self, messages: list[dict]) -> int:
        return len(self.tok.apply_chat(messages, add_generation_prompt=True))

    # changes --------------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})
        self.reset_ids()

    def add_user(self, text: str) -> None:
        self.marks[len(self.messages)] = (len(self.known), self.known_count)
        self.messages.append({"role": "user", "content": text})

    def add_reply(self, text: str, prompt_ids: list[int], reply_ids: list[int], interrupted: bool) -> None:
        message = {"role": "assistant", "content": text}
        if interrupted:
            message["interrupted"] = True
        self.messages.append(message)
        if self.closing is not None:
            self.known = list(prompt_ids) + list(reply_ids) + self.closing
            self.known_count = len(self.messages)
        else:
            self.reset_ids()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` messages."""
        del self.messages[n:]
        mark = self.marks.get(n)
        if mark is not None and mark[1] <= n:
            self.known, self.known_count = self.known[: mark[0]], mark[1]
            self.marks = {k: v for k, v in self.marks.items() if k <= n}
        elif self.known_count > n:
            self.reset_ids()

    def last_user_index(self) -> int | None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return i
        return None

    def clear(self) -> None:
        system = self.system
        self.messages = [{"role": "system", "content": system}] if system is not None else []
        self.dropped = []
        self.reset_ids()

    def replace(self, messages: list[dict], dropped: list[dict] | None = None) -> None:
        self.messages = [dict(m) for m in messages]
        self.dropped = [dict(m) for m in dropped or []]
        self.reset_ids()

    def drop_to_fit(self, budget: int) -> list[dict]:
        kept, dropped = drop_oldest_turns(self.messages, self.measure, budget)
        if dropped:
            self.dropped += dropped
            self.messages = kept
            self.reset_ids()
        return dropped

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    recomputed: bool = False  # the context crossed LongRoPE's boundary: computed again once

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefill_tokens


@dataclass
class SessionStats:
    turns: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    completion_tokens: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    last: TurnStats | None = None
    history: list[TurnStats] = field(default_factory=list)


@dataclass
class Settings:
    params: SamplingParams
    max_new_tokens: int


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def resolve_settings(cli: dict, transcript: Transcript | None) -> Settings:
    """Sampling settings: the command line's, else the transcript's, else the defaults."""
    params = sampling(cli, dict(transcript.sampling) if transcript else None)
    try:
        params.validate()
    except GenerationError as exc:
        raise UsageError(f"bad sampling setting in the transcript: {exc}") from None
    saved_max = transcript.max_new_tokens if transcript else None
    max_new = cli.get("max_new_tokens") or saved_max or MAX_NEW_TOKENS["chat"]
    return Settings(params, max_new)


def latest_autosave() -> Path:
    folder = data_dir() / "chats"
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        raise UsageError(f"no saved conversation in {folder} to resume")
    return files[-1]


class ChatSession:
    def __init__(self, loaded, settings: Settings, *, system: str | None, stop: list[str], ignore_eos: bool,
                 context: int | None, plain: bool, on_overflow: str, console: Console | None = None,
                 history_path: Path | None = None):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.settings = settings
        self.stop = stop
        self.ignore_eos = ignore_eos
        self.on_overflow = on_overflow
        self.console = console or Console(highlight=False, soft_wrap=False)
        self.plain = plain or not self.console.is_terminal
        self.engine = LocalEngine(loaded, context_length=context)
        self.conv = Conversation(self.tok, system)
        self.stats = SessionStats()
        self.history_path = history_path
        self.autosave_path: Path | None = None
        self.autosave_error: str | None = None
        self.autosave_enabled = True
        self.created = None

    # -- output helpers --------------------------------------------------------------------------

    def out(self, renderable, **kwargs) -> None:
        """One line of session output; the terminal wraps it (paths stay copyable)."""
        self.console.print(renderable, soft_wrap=True, **kwargs)

    def note(self, text: str, style: str = "dim") -> None:
        self.out(Text(text, style=style))

    def hint(self, text: str) -> None:
        self.out(Text(text, style="yellow"))

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def context_used(self) -> int:
        if self.conv.known_count == len(self.conv.messages) and self.conv.known:
            return len(self.conv.known)
        if not self.conv.messages:
            return 0
        return len(self.conv.prompt_ids())

    # -- a turn ----------------------------------------------------------------------------------

    def room(self) -> int:
        """Tokens kept free for the reply when fitting the conversation into the context."""
        return max(1, min(self.settings.max_new_tokens, self.context_length // 4))

    def fit(self) -> list[int]:
        """The prompt for the next reply, applying the overflow policy; raises ContextOverflow."""
        budget = self.context_length - self.room()
        prompt = self.conv.prompt_ids()
        if len(prompt) <= budget:
            return prompt
        if self.on_overflow == "error":
            raise ContextOverflow(
                f"the conversation needs {len(prompt)} tokens plus {self.room()} for the reply; the context "
                f"holds {self.context_length}: /undo or /clear, or start with --on-overflow drop-oldest"
            )
        dropped = self.conv.drop_to_fit(budget)
        turns = sum(1 for m in dropped if m["role"] == "user")
        prompt = self.conv.prompt_ids()
        self.hint(
            f"context full: dropped the {turns} oldest turn{'s' if turns != 1 else ''} "
            f"({len(dropped)} messages) to fit {self.context_length} tokens; the system prompt stays"
        )
        return prompt

    def reply(self, text: str | None, out=None, show_stats: bool = True) -> TurnStats | None:
        """Add the user message ``text`` (None: answer the conversation as it is) and stream a
        reply. Returns the turn's stats, or None when the message did not fit."""
        n_before = len(self.conv.messages)
        if text is not None:
            self.conv.add_user(text)
        try:
            prompt = self.fit()
        except ContextOverflow:
            if text is not None:
                self.conv.truncate(n_before)
            raise
        stream = PlainStream(out or sys.stdout) if (self.plain or out is not None) else MarkdownStream(self.console)
        s = self.settings
        pieces = self.engine.generate(Request(token_ids=prompt, params=s.params, max_new_tokens=s.max_new_tokens,
                                              stop=self.stop, ignore_eos=self.ignore_eos))
        interrupted = False
        shown: list[str] = []
        try:
            for piece in pieces:
                shown.append(piece)
                stream.feed(piece)
        except KeyboardInterrupt:  # Ctrl+C while we were drawing, not generating
            interrupted = True
        except GenerationError:  # refused before the first token: the message is not kept
            stream.finish()
            if text is not None:
                self.conv.truncate(n_before)
            raise
        # From here on the turn is recorded whatever happens: a second Ctrl+C waits.
        old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            if interrupted:
                pieces.close()
            res = pieces.completion
            interrupted = interrupted or res.finish_reason == "interrupted"
            reply_text = "".join(shown)
            with contextlib.suppress(KeyboardInterrupt):
                stream.finish()
            self.conv.add_reply(reply_text, prompt, res.token_ids, interrupted)
            turn = TurnStats(
                prompt_tokens=len(prompt), prefill_tokens=res.prefill_tokens,
                completion_tokens=len(res.token_ids), finish_reason="interrupted" if interrupted else res.finish_reason,
                time_to_first_token_s=res.time_to_first_token_s, prefill_tokens_per_s=res.prefill_tokens_per_s,
                decode_tokens_per_s=res.decode_tokens_per_s,
                recomputed=res.recomputed,
            )
            st = self.stats
            st.turns += 1
            st.prompt_tokens += turn.prompt_tokens
            st.prefill_tokens += turn.prefill_tokens
            st.completion_tokens += turn.completion_tokens
            st.prefill_s += res.prefill_s
            st.decode_s += res.decode_s
            st.last = turn
            st.history.append(turn)
            if show_stats:
                if interrupted:
                    self.note("[interrupted: the partial reply is kept; /retry for a new one]", "yellow")
                self.note(self.stats_line(turn))
            self.autosave()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        return turn

    def stats_line(self, t: TurnStats) -> str:
        used = self.context_used()
        parts = [
            f"{t.completion_tokens} tokens",
            f"{t.decode_tokens_per_s:.1f} tok/s",
            f"first token {t.time_to_first_token_s:.2f} s",
            f"context {used}/{self.context_length}",
        ]
        if t.finish_reason == "length":
            parts.append("context full" if used >= self.context_length else "max_new_tokens reached")
        return " · ".join(parts)

    # -- persistence -----------------------------------------------------------------------------

    def transcript(self) -> Transcript:
        t = Transcript(
            messages=self.conv.messages, sampling=self.settings.params.to_dict(),
            max_new_tokens=self.settings.max_new_tokens, dropped=self.conv.dropped,
            model={
                "id": self.loaded.model_id, "revision": self.loaded.revision, "path": str(self.loaded.path),
                "dtype": self.loaded.dtype, "device": self.loaded.device,
                "quantization": _quantization(self.loaded),
            },
        )
        if self.created:
            t.created = self.created
        else:
            self.created = t.created
        return t

    def new_autosave(self) -> None:
        """The next autosave goes to a new file (the conversation before stays saved)."""
        self.autosave_path = None
        self.created = None

    def autosave(self) -> None:
        if not self.autosave_enabled:
            return
        try:
            if self.autosave_path is None:
                folder = private_dir(data_dir() / "chats")
                stamp = time.strftime("%Y%m%d-%H%M%S")
                self.autosave_path = folder / f"{stamp}-{os.getpid()}.json"
                n = 1
                while self.autosave_path.exists():
                    n += 1
                    self.autosave_path = folder / f"{stamp}-{os.getpid()}-{n}.json"
            self.transcript().save(self.autosave_path)
            self.autosave_error = None
        except (OSError, TranscriptError) as exc:
            if self.autosave_error is None:  # say it once, not after every turn
                self.hint(f"autosave failed: {' '.join(str(exc).split())}")
            self.autosave_error = str(exc)

    def load_transcript(self, t: Transcript, source: Path, show: bool = True, settings: bool = True) -> None:
        """Continue ``t``; with ``settings``, its sampling settings too (--resume has merged them
        with the command line's already)."""
        self.conv.replace(t.messages, t.dropped)
        self.created = None
        self.new_autosave()
        if settings:
            params = dict(self.settings.params.to_dict())
            params.update({k: v for k, v in t.sampling.items()})
            try:
                self.settings = Settings(SamplingParams(**params).validate(),
                                         t.max_new_tokens or self.settings.max_new_tokens)
            except (GenerationError, TypeError) as exc:
                self.hint(f"kept the current sampling settings: {exc}")
        saved_model = t.model.get("id")
        if saved_model and saved_model != self.loaded.model_id and str(Path(saved_model)) != str(self.loaded.path):
            self.note(f"this conversation was with {saved_model}; it continues with {self.loaded.model_id}")
        if show:
            self.replay()
        self.note(f"loaded {source}: {self.conv.turns} turns, {len(self.conv.messages)} messages")

    def replay(self) -> None:
        for m in self.conv.messages:
            if m["role"] == "system":
                self.note(f"system: {m['content']}")
            elif m["role"] == "user":
                self.out(Text(PROMPT, style="bold") + Text(m["content"]))
            else:
                stream = PlainStream(self.console.file) if self.plain else MarkdownStream(self.console, live=False)
                stream.feed(m["content"])
                stream.finish()
                if m.get("interrupted"):
                    self.note("[interrupted]", "yellow")

    # -- commands --------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        handler = getattr(self, "cmd_" + name[1:], None) if name in COMMANDS else None
        if handler is None:
            close = [c for c in COMMANDS if c.startswith(name[:3])] if len(name) > 1 else []
            extra = f" (did you mean {close[0]}?)" if close else ""
            self.hint(f"unknown command {name}{extra}: /help lists the commands; "
                      "start a line with // to send one beginning with /")
            return True
        try:
            return handler(arg) is not False
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. /save to a bad path: hint, go on
            self.hint(f"{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
            return True

    def cmd_exit(self, arg: str):
        return False

    def cmd_help(self, arg: str) -> None:
        self.out(Text("Commands", style="bold"))
        for name, text in COMMANDS.items():
            self.out(Text(f"  {name:<8} ", style="cyan") + Text(text))
        self.out(Text("Keys", style="bold"))
        for key, text in KEYS:
            self.out(Text(f"  {key:<22} ", style="cyan") + Text(text))
        self.out(Text("A line starting with // sends text that starts with /.", style="dim"))

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.new_autosave()
        self.note("new conversation" + (" (the system prompt stays)" if self.conv.system else ""))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.note(f"system prompt: {self.conv.system}" if self.conv.system
                      else "no system prompt (/system TEXT sets one)")
            return
        self.conv.set_system(arg)
        self.note("system prompt set (the next reply recomputes the context)")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            self._show_settings()
            return
        parts = arg.split(None, 1)
        key = SETTINGS.get(parts[0].lower())
        if key is None:
            self.hint(f"unknown setting {parts[0]!r}: one of {', '.join(SETTING_NAMES)}")
            return
        if len(parts) < 2:
            self.hint(f"/set {key} VALUE (now {self._setting(key)})")
            return
        raw = parts[1].strip()
        try:
            value = _parse_setting(key, raw)
            if key == "max_new_tokens":
                self.settings.max_new_tokens = value
            else:
                params = SamplingParams(**{**self.settings.params.to_dict(), key: value}).validate()
                self.settings.params = params
        except (ValueError, GenerationError) as exc:
            self.hint(f"bad value for {key}: {exc}")
            return
        self.note(f"{key} = {self._setting(key)}")

    def _setting(self, key: str):
        if key == "max_new_tokens":
            return self.settings.max_new_tokens
        value = getattr(self.settings.params, key)
        return "none (random)" if key == "seed" and value is None else value

    def _show_settings(self) -> None:
        self.out(Text("  " + "  ".join(f"{k}={self._setting(k)}" for k in SETTING_NAMES)))

    def cmd_show(self, arg: str) -> None:
        ld = self.loaded
        rows = [
            ("model", f"{ld.model_id}" + (f" @ {ld.revision}" if ld.revision else "")),
            ("path", str(ld.path)),
            ("dtype / device", f"{ld.dtype} / {ld.device}"),
            ("quantization", _quantization(ld) or "none"),
            ("context", f"{self.context_used()} / {self.context_length} tokens "
                        f"(KV cache {self.engine.cache_bytes() / 2**20:.1f} MiB allocated)"),
            ("on overflow", self.on_overflow),
            ("system prompt", self.conv.system or "none"),
            ("settings", "  ".join(f"{k}={self._setting(k)}" for k in SETTING_NAMES)),
            ("conversation", f"{self.conv.turns} turns, {len(self.conv.messages)} messages"
                             + (f" ({len(self.conv.dropped)} dropped to fit)" if self.conv.dropped else "")),
            ("history", str(self.history_path) if self.history_path else "off"),
            ("autosave", str(self.autosave_path) if self.autosave_path
             else f"{data_dir() / 'chats'} (after the first reply)"),
        ]
        for k, v in rows:
            self.out(Text(f"  {k:<15}", style="cyan") + Text(v))

    def cmd_save(self, arg: str) -> None:
        path = Path(arg).expanduser() if arg else Path.cwd() / time.strftime("chat-%Y%m%d-%H%M%S.json")
        if path.is_dir():
            path = path / time.strftime("chat-%Y%m%d-%H%M%S.json")
        try:
            self.transcript().save(path)
        except TranscriptError as exc:
            self.hint(str(exc))
            return
        self.note(f"saved {len(self.conv.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.hint("/load FILE")
            return
        try:
            t = Transcript.load(Path(arg))
        except TranscriptError as exc:
            self.hint(str(exc))
            return
        self.load_transcript(t, Path(arg))

    def cmd_retry(self, arg: str) -> None:
        i = self.conv.last_user_index()
        if i is None:
            self.hint("nothing to retry yet")
            return
        text = self.conv.messages[i]["content"]
        self.conv.truncate(i)
        if self.settings.params.seed is not None and self.settings.params.temperature > 0:
            self.note(f"(seed is {self.settings.params.seed}: the same reply again; /set seed none for a new one)")
        elif self.settings.params.temperature == 0:
            self.note("(temperature is 0: the same reply again; /set temperature 0.7 for a new one)")
        self.out(Text(PROMPT, style="bold") + Text(text), style="dim")
        self._reply_or_hint(text)

    def cmd_undo(self, arg: str) -> None:
        i = self.conv.last_user_index()
        if i is None:
            self.hint("nothing to undo")
            return
        self.conv.truncate(i)
        self.note(f"removed the last exchange; {self.conv.turns} turns left")
        self.autosave()

    def cmd_stats(self, arg: str) -> None:
        st, t = self.stats, self.stats.last
        if t is None:
            self.note("no reply yet")
        else:
            self.out(Text("last turn", style="bold"))
            self.out(Text(
                f"  prompt {t.prompt_tokens} tokens: prefilled {t.prefill_tokens}, "
                f"reused {t.reused_tokens} from the cache"
                + ("\n  (crossed the LongRoPE boundary: the whole context was recomputed once)" if t.recomputed else "")
            ))
            self.out(Text(
                f"  reply {t.completion_tokens} tokens ({t.finish_reason}); "
                f"first token {t.time_to_first_token_s:.2f} s; "
                f"prefill {t.prefill_tokens_per_s:.1f} tok/s; decode {t.decode_tokens_per_s:.1f} tok/s"
            ))
        self.out(Text("session", style="bold"))
        decode = st.completion_tokens / st.decode_s if st.decode_s > 0 else 0.0
        self.out(Text(
            f"  {st.turns} replies; prompts {st.prompt_tokens} tokens, prefilled {st.prefill_tokens}, "
            f"reused {st.prompt_tokens - st.prefill_tokens}; "
            f"generated {st.completion_tokens} tokens ({decode:.1f} tok/s)"
        ))
        self.out(Text(f"  context {self.context_used()} / {self.context_length} tokens; "
                      f"model loaded in {self.loaded.load_s:.1f} s"))

    def _reply_or_hint(self, text: str | None) -> None:
        try:
            self.reply(text)
        except ContextOverflow as exc:
            self.hint(str(exc))
        except GenerationError as exc:
            self.hint(" ".join(str(exc).split()))
        except (RuntimeError, ValueError) as exc:  # never lose the session (and the loaded model)
            self.hint(f"the reply failed: {' '.join(str(exc).split()) or type(exc).__name__}")

    # -- the loop --------------------------------------------------------------------------------

    def repl(self, prompt_session) -> int:
        ld = self.loaded
        self.note(
            f"phimoe chat · {ld.model_id} · {ld.dtype} · {ld.device} · context {self.context_length} · "
            f"/help for help, Ctrl+D quits"
        )
        while True:
            try:
                line = prompt_session.prompt()
            except KeyboardInterrupt:
                self.note("(the line was cleared; /exit or Ctrl+D quits)")
                continue
            except EOFError:
                break
            if not line.strip():
                continue
            stripped = line.strip()
            if stripped.startswith("/") and not stripped.startswith("//"):
                if not self.command(stripped):
                    break
                continue
            if stripped.startswith("//"):
                line = line.lstrip()[1:]
            self._reply_or_hint(line)
        if self.autosave_path is not None and self.autosave_error is None:
            self.note(f"conversation saved: phimoe chat --resume {self.autosave_path}")
        return 0


def _quantization(loaded) -> str | None:
    """The loaded model's weight quantization (None: full precision)."""
    value = getattr(loaded, "quantize", None) or getattr(loaded, "quantization", None)
    return None if value in (None, "none") else str(value)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _parse_setting(key: str, raw: str):
    if key == "seed":
        if raw.lower() in ("none", "random", "off", "-"):
            return None
        value = int(raw)
        if value < 0:
            raise ValueError("the seed must be >= 0 (or none)")
        return value
    if key in ("top_k", "max_new_tokens"):
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if key == "max_new_tokens" and value < 1:
            raise ValueError("it must be >= 1")
        return value
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None


# ------------------------------------------------------------------------------------------------
# prompt-toolkit input
# ------------------------------------------------------------------------------------------------


def make_prompt_session(history_path: Path | None):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    class SlashCompleter(Completer):
        paths = PathCompleter(expanduser=True)

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name in [*COMMANDS, *ALIASES]:
                    if name.startswith(text.lower()):
                        yield Completion(name, start_position=-len(text), display_meta=COMMANDS.get(name, ""))
                return
            command, _, rest = text.partition(" ")
            if command == "/set" and " " not in rest:
                for name in SETTING_NAMES:
                    if name.startswith(rest.lower()):
                        yield Completion(name, start_position=-len(rest))
            elif command in ("/load", "/save"):
                yield from self.paths.get_completions(Document(rest), complete_event)

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    output = None
    if not sys.stdout.isatty() and sys.stderr.isatty():
        from prompt_toolkit.output import create_output

        output = create_output(stdout=sys.stderr)
    history = FileHistory(str(history_path)) if history_path else InMemoryHistory()
    return PromptSession(
        PROMPT, history=history, completer=SlashCompleter(), complete_while_typing=False,
        key_bindings=bindings, multiline=False, prompt_continuation=CONTINUATION,
        enable_history_search=False, output=output,
    )


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def run_chat(*, load: LoadOptions, system: str | None, sampling: dict, max_new_tokens: int | None,
             stop: list[str], ignore_eos: bool, context: int | None, plain: bool, no_history: bool,
             resume: str | None, on_overflow: str) -> int:
    if on_overflow not in OVERFLOW_POLICIES:
        raise UsageError(f"--on-overflow must be drop-oldest or error, got {on_overflow!r}")
    transcript, resume_path = None, None
    if resume:
        resume_path = latest_autosave() if resume == "last" else Path(resume).expanduser()
        try:
            transcript = Transcript.load(resume_path)
        except TranscriptError as exc:
            raise UsageError(str(exc)) from None
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

    console = Console(highlight=False, stderr=not interactive)
    loaded = load_model(load)
    max_ctx = loaded.model.config.max_position_embeddings
    if context is not None and context > max_ctx:
        raise UsageError(f"--context {context} is more than the model's {max_ctx} tokens")

    session = ChatSession(
        loaded, settings, system=system if transcript is None else None, stop=stop, ignore_eos=ignore_eos,
        context=context, plain=plain or not interactive, on_overflow=on_overflow, console=console,
        history_path=history_path,
    )
    if transcript is not None:
        session.load_transcript(transcript, resume_path, show=interactive, settings=False)
        if system:
            session.conv.set_system(system)

    if not interactive:
        session.autosave_enabled = False  # a one-shot answer, like `phimoe generate`
        try:
            turn = session.reply(text, out=sys.stdout, show_stats=False)
        except ContextOverflow as exc:
            raise UsageError(str(exc)) from None
        if turn.finish_reason == "interrupted":
            sys.stderr.write("interrupted\n")
            return 130
        return 0
    return session.repl(make_prompt_session(history_path))
