"""The chat's input line: prompt-toolkit with history, /command completion and Esc Enter for a
new line."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from phimoe_cli.chat.commands import ALIASES, COMMANDS, PROMPT, SETTING_NAMES

CONTINUATION = "... "


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


@contextlib.contextmanager
def no_echo(stream=None):
    """While a reply streams: the terminal does not echo what is typed (nor ^C), and Ctrl+C does not
    flush its queues (NOFLSH). An echoed "^C" at the end of a full line wraps it, and the live
    reply area, erased by counting lines, would then leave its first line behind; a flush throws
    away what was written but not yet shown (a slow terminal, or ssh), often the escape codes that
    erase the live area, so lines came twice or the "[interrupted]" note was lost. Typed keys stay
    buffered for the next prompt."""
    stream = stream or sys.stdin
    try:
        import termios
    except ImportError:
        yield
        return
    try:
        fd = stream.fileno()
        old = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal
        yield
        return
    new = list(old)
    new[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    new[3] |= termios.NOFLSH
    try:
        termios.tcsetattr(fd, termios.TCSANOW, new)
    except (termios.error, OSError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSANOW, old)
