"""One chat session: the model's engine, the conversation, the settings; a turn (stream the reply,
record it, autosave), persistence, and the read-reply loop."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from phimoe_cli.chat.commands import PROMPT, run_command
from phimoe_cli.chat.conversation import ContextOverflow, Conversation, SessionStats, Settings, TurnStats
from phimoe_cli.chat.input import no_echo
from phimoe_cli.chat_render import MarkdownStream, PlainStream
from phimoe_cli.engine import Request
from phimoe_cli.errors import PhimoeError
from phimoe_cli.params import GenerationError, SamplingParams
from phimoe_cli.remote import ContextTooLong
from phimoe_cli.transcript import Transcript, TranscriptError, data_dir, private_dir


class Autosave:
    """The conversation saved after every reply, to a new file per conversation in the data
    folder's chats/ (``phimoe chat --resume last`` finds the newest)."""

    def __init__(self):
        self.enabled = True
        self.path: Path | None = None  # None: the next save picks a new file
        self.error: str | None = None

    def save(self, transcript: Transcript, hint) -> None:
        if not self.enabled:
            return
        try:
            if self.path is None:
                folder = private_dir(data_dir() / "chats")
                stamp = time.strftime("%Y%m%d-%H%M%S")
                self.path = folder / f"{stamp}-{os.getpid()}.json"
                n = 1
                while self.path.exists():
                    n += 1
                    self.path = folder / f"{stamp}-{os.getpid()}-{n}.json"
            transcript.save(self.path)
            self.error = None
        except (OSError, TranscriptError) as exc:
            if self.error is None:  # say it once, not after every turn
                hint(f"autosave failed: {' '.join(str(exc).split())}")
            self.error = str(exc)


class ChatSession:
    """``engine``: a LocalEngine, or a RemoteEngine (no tokenizer: the conversation goes as
    messages, and the server's answer says when it does not fit)."""

    def __init__(self, engine, settings: Settings, *, system: str | None, stop: list[str], ignore_eos: bool,
                 plain: bool, on_overflow: str, console: Console | None = None, history_path: Path | None = None):
        self.engine = engine
        self.tok = engine.tokenizer
        self.settings = settings
        self.stop = stop
        self.ignore_eos = ignore_eos
        self.on_overflow = on_overflow
        self.console = console or Console(highlight=False, soft_wrap=False)
        self.plain = plain or not self.console.is_terminal
        self.conv = Conversation(self.tok, system)
        self.stats = SessionStats()
        self.history_path = history_path
        self.saver = Autosave()
        self.created = None
        self._warned_unsaved = False
        self._busy = False  # a reply is streaming or being recorded: a signal only sets the flag
        self.terminating: int | None = None  # SIGTERM / SIGHUP received
        self._drawing = False  # a piece of the reply is being drawn: Ctrl+C waits for the next token
        self._stop_asked = False  # Ctrl+C came while drawing
        self._stream = None  # the reply's display while it streams

    # -- output helpers --------------------------------------------------------------------------

    def out(self, renderable, **kwargs) -> None:
        """One line of session output; the terminal wraps it (paths stay copyable)."""
        self.console.print(renderable, soft_wrap=True, **kwargs)

    def note(self, text: str, style: str = "dim") -> None:
        self.out(Text(text, style=style))

    def hint(self, text: str) -> None:
        self.out(Text(text, style="yellow"))

    @property
    def context_length(self) -> int | None:
        return self.engine.context_length

    def context_used(self) -> int:
        if self.tok is None:  # remote: what the server counted for the last turn
            last = self.stats.last
            return last.prompt_tokens + last.completion_tokens if last and self.conv.messages else 0
        if self.conv.known_count == len(self.conv.messages) and self.conv.known:
            # what the model has seen: the closing <|end|> after the last reply comes with the next prompt
            return len(self.conv.known) - len(self.conv.closing or [])
        if not self.conv.messages:
            return 0
        return len(self.conv.prompt_ids())

    # -- a turn ----------------------------------------------------------------------------------

    def room(self) -> int:
        """Tokens kept free for the reply when fitting the conversation into the context."""
        return max(1, min(self.settings.max_new_tokens, self.context_length // 4))

    def fit(self) -> list[int] | None:
        """The prompt for the next reply, applying the overflow policy; raises ContextOverflow.
        None for a remote engine: its server counts the tokens (see _start)."""
        if self.tok is None:
            return None
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
            pieces = self._start(prompt)
        except PhimoeError:  # refused before the first token (too long, bad settings, no server): the
            if text is not None:  # message is not kept (it is in the input history)
                self.conv.truncate(n_before)
            raise
        stream = PlainStream(out or sys.stdout) if (self.plain or out is not None) else MarkdownStream(self.console)
        interrupted, failure = False, None
        shown: list[str] = []
        self._busy, self._stop_asked = True, False
        # Ctrl+C while computing stops there (KeyboardInterrupt, caught by the generation); while a
        # piece is drawn it waits for the next token (``Request.cancelled``): a live-area frame cut
        # halfway would leave lines on the screen that the finished reply then prints again.
        sigint = signal.signal(signal.SIGINT, self._on_interrupt) if _main_thread() else None
        self._stream = stream
        try:
            with no_echo() if isinstance(stream, MarkdownStream) else contextlib.nullcontext():
                for piece in pieces:
                    self._drawing = True
                    shown.append(piece)
                    stream.feed(piece)
                    self._drawing = False
        except KeyboardInterrupt:  # Ctrl+C between the generation and the drawing
            interrupted = True
        except PhimoeError as exc:  # the stream was cut: keep what came, marked interrupted
            interrupted, failure = True, exc
        finally:
            # From here on the turn is recorded whatever happens: a second Ctrl+C (or SIGTERM) waits.
            self._drawing, self._stream = False, None
            if sigint is not None:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if interrupted:
                pieces.close()
            res = pieces.completion
            interrupted = interrupted or res.finish_reason == "interrupted"
            reply_text = "".join(shown)
            with contextlib.suppress(KeyboardInterrupt, OSError):  # OSError: the terminal is gone (SIGHUP)
                stream.finish()
            if failure is not None and not reply_text:
                if text is not None:
                    self.conv.truncate(n_before)
                raise failure
            self.conv.add_reply(reply_text, prompt, res.token_ids, interrupted)
            turn = TurnStats(
                prompt_tokens=res.prompt_tokens, prefill_tokens=res.prefill_tokens,
                completion_tokens=res.completion_tokens,
                finish_reason="interrupted" if interrupted else res.finish_reason,
                time_to_first_token_s=res.time_to_first_token_s, prefill_tokens_per_s=res.prefill_tokens_per_s,
                decode_tokens_per_s=res.decode_tokens_per_s,
                recomputed=res.recomputed, recomputed_in_prompt=res.recomputed_in_prompt,
            )
            self.stats.add(turn, res.prefill_s, res.decode_s)
            self.autosave()  # before anything is printed: the terminal may be gone
            if show_stats:
                if interrupted:
                    self.note("[interrupted: the partial reply is kept; /retry for a new one]", "yellow")
                self.note(stats_line(self, turn))
        finally:
            self._busy = False
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
        if failure is not None:
            raise failure
        return turn

    def _start(self, prompt: list[int] | None):
        """The engine's stream for the next reply. Remote (``prompt`` None): the messages go as they
        are; when the server says they do not fit, the oldest turns are dropped (or ContextOverflow)."""
        s = self.settings
        request = Request(params=s.params, max_new_tokens=s.max_new_tokens, stop=self.stop,
                          ignore_eos=self.ignore_eos, cancelled=self._cancelled, on_recompute=self._on_recompute)
        if prompt is not None:
            request.token_ids = prompt
            return self.engine.generate(request)
        while True:
            request.messages = self.conv.messages  # (the engine sends role and content only)
            try:
                return self.engine.generate(request)
            except ContextTooLong as exc:
                if self.on_overflow == "error" or self.conv.turns <= 1:
                    raise ContextOverflow(f"{exc}: /undo or /clear, or lower max_new_tokens") from None
                dropped = self.conv.drop_oldest_turn()
                self.hint(f"context full: dropped the oldest turn ({len(dropped)} messages); the system prompt stays")

    # -- persistence -----------------------------------------------------------------------------

    def transcript(self) -> Transcript:
        t = Transcript(
            messages=self.conv.messages, sampling=self.settings.params.to_dict(),
            max_new_tokens=self.settings.max_new_tokens, dropped=self.conv.dropped,
            model=self.engine.describe(),
        )
        if self.created:
            t.created = self.created
        else:
            self.created = t.created
        return t

    def new_autosave(self) -> None:
        """The next autosave goes to a new file (the conversation before stays saved)."""
        self.saver.path = None
        self.created = None

    def autosave(self) -> None:
        self.saver.save(self.transcript(), self.hint)

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
        saved_model, now = t.model.get("id"), self.engine.describe()
        if saved_model and saved_model != now["id"] and str(Path(saved_model)) != now.get("path"):
            self.note(f"this conversation was with {saved_model}; it continues with {now['id']}")
        if show:
            replay(self)
        self.note(f"loaded {source}: {self.conv.turns} turns, {len(self.conv.messages)} messages")

    def _reply_or_hint(self, text: str | None) -> None:
        try:
            self.reply(text)
        except ContextOverflow as exc:
            self.hint(str(exc))
        except GenerationError as exc:
            self.hint(" ".join(str(exc).split()))
        except PhimoeError as exc:  # e.g. the server is unreachable: the session goes on
            self.hint(" ".join(str(exc).split()))
        except (RuntimeError, ValueError) as exc:  # never lose the session (and the loaded model)
            self.hint(f"the reply failed: {' '.join(str(exc).split()) or type(exc).__name__}")

    # -- the loop --------------------------------------------------------------------------------

    def repl(self, prompt_session) -> int:
        d = self.engine.describe()
        where = d["base_url"] if "base_url" in d else f"{d['dtype']} · {d['device']}"
        self.note(
            f"phimoe chat · {d['id']} · {where} · context {self.context_length or '?'} · "
            f"/help for help, Ctrl+D quits"
        )
        previous = {sig: signal.signal(sig, self._on_terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return self._loop(prompt_session)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_recompute(self, tokens: int) -> None:
        """The reply pauses while the whole context is computed again (LongRoPE): say so meanwhile."""
        if isinstance(self._stream, MarkdownStream):
            self._drawing = True
            self._stream.status(f"(the context crossed LongRoPE's boundary: computing its {tokens} tokens "
                                "again with the long factors, once)")
            self._drawing = False

    def _cancelled(self) -> bool:
        return self.terminating is not None or self._stop_asked

    def _on_interrupt(self, signum, frame) -> None:
        """Ctrl+C while a reply streams."""
        if not self._drawing:
            raise KeyboardInterrupt
        self._stop_asked = True

    def _on_terminate(self, signum, frame) -> None:
        """SIGTERM / SIGHUP: the reply in flight stops before its next token (``Request.cancelled``)
        and is recorded and saved like one stopped by Ctrl+C; then the chat leaves. At the prompt:
        leave now."""
        first = self.terminating is None
        self.terminating = signum
        if first and not self._busy:
            raise KeyboardInterrupt

    def _loop(self, prompt_session) -> int:
        while True:
            try:
                line = prompt_session.prompt()
            except KeyboardInterrupt:
                if self.terminating:
                    break
                self.note("(the line was cleared; /exit or Ctrl+D quits)")
                continue
            except EOFError:
                if self._may_quit():
                    break
                continue
            if not line.strip():
                continue
            stripped = line.strip()
            if stripped.startswith("/") and not stripped.startswith("//"):
                if not run_command(self, stripped) and self._may_quit():
                    break
                continue
            if stripped.startswith("//"):
                line = line.lstrip()[1:]
            self._reply_or_hint(line)
            if self.terminating:
                break
        if self.terminating:
            with contextlib.suppress(OSError):
                self.note(f"terminated ({signal.Signals(self.terminating).name}); the conversation is saved"
                          + (f": phimoe chat --resume {self.saver.path}" if self.saver.path else ""))
            return 128 + self.terminating
        if self.saver.error is not None and self.conv.turns:
            self.hint(f"this conversation was not saved (autosave failed: {self.saver.error})")
        elif self.saver.path is not None:
            self.note(f"conversation saved: phimoe chat --resume {self.saver.path}")
        return 0

    def _may_quit(self) -> bool:
        """False once when the autosave failed: say so, and how to keep the conversation."""
        if self.saver.error is None or not self.conv.turns or self._warned_unsaved:
            return True
        self._warned_unsaved = True
        self.hint(f"this conversation is not saved (autosave failed: {' '.join(self.saver.error.split())}): "
                  "/save FILE keeps it; quit again to leave without it")
        return False


def replay(session: ChatSession) -> None:
    """Print a loaded conversation as the chat showed it."""
    for m in session.conv.messages:
        if m["role"] == "system":
            session.note(f"system: {m['content']}")
        elif m["role"] == "user":
            session.out(Text(PROMPT, style="bold") + Text(m["content"]))
        else:
            stream = PlainStream(session.console.file) if session.plain else MarkdownStream(session.console, live=False)
            stream.feed(m["content"])
            stream.finish()
            if m.get("interrupted"):
                session.note("[interrupted]", "yellow")


def stats_line(session: ChatSession, t: TurnStats) -> str:
    """The line under a reply: tokens, speed, first token, context."""
    used = session.context_used()
    parts = [
        f"{t.completion_tokens} tokens",
        f"{t.decode_tokens_per_s:.1f} tok/s",
        f"first token {t.time_to_first_token_s:.2f} s",
        f"context {used}/{session.context_length or '?'}",
    ]
    if session.tok is None and t.prompt_tokens > t.prefill_tokens:
        parts.append(f"{t.prompt_tokens - t.prefill_tokens} cached")
    if t.finish_reason == "length":
        full = session.context_length and used >= session.context_length
        parts.append("context full" if full else "max_new_tokens reached")
    return " · ".join(parts)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
