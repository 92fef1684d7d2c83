"""Showing a reply while it streams: raw text, or Markdown that never outgrows the screen.

``MarkdownStream`` prints each finished Markdown block (a paragraph, a list, a fenced code block,
a heading) to the scrollback once, rendered by Rich, and keeps only the block in progress in a
small ``Live`` area. A block that grows taller than the screen (a long code block, a long list) is
printed in pieces, so nothing is ever cut off or drawn twice, however long the reply.
"""

from __future__ import annotations

import re
import time

from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.syntax import Syntax
from rich.text import Text

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")
_ITEM = re.compile(r"^ {0,3}([-*+]|\d{1,9}[.)])(\s|$)")
CODE_THEME = "monokai"


class PlainStream:
    """Raw text, exactly as generated."""

    def __init__(self, out):
        self.out = out
        self.last = "\n"

    def feed(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()
            self.last = piece[-1]

    def finish(self) -> None:
        if self.last != "\n":
            self.out.write("\n")
        self.out.flush()


class _Fence:
    def __init__(self, marker: str, lang: str):
        self.marker = marker
        self.lang = lang or "text"
        self.split = False  # some of its lines were already printed

    def closes(self, line: str) -> bool:
        s = line.strip()
        indent = len(line) - len(line.lstrip())
        return s.startswith(self.marker[0] * len(self.marker)) and set(s) <= {self.marker[0]} and indent <= 3


class MarkdownStream:
    """Feed text pieces; finished blocks go to the scrollback, the block in progress stays live."""

    def __init__(self, console: Console, refresh_s: float = 0.08, live: bool = True):
        self.console = console
        self.use_live = live
        self.refresh_s = refresh_s
        self.pending = ""  # source of the block in progress (complete lines, then a partial one)
        self.fence: _Fence | None = None
        self.printed_blocks = 0
        self.live: Live | None = None
        self._shown = 0.0
        self._status: str | None = None  # a dim line under the block in progress, until the next piece

    # -- public --------------------------------------------------------------------------------

    def feed(self, piece: str) -> None:
        if not piece:
            return
        self.pending += piece
        self._commit_finished()
        if self._status is not None:
            self._status, self._shown = None, 0.0  # (drawn at once: the status goes)
        self._show()

    def status(self, text: str) -> None:
        """Show ``text`` under the reply so far until the next piece comes (a long pause)."""
        self._status, self._shown = text, 0.0
        self._show(force=True)

    def finish(self) -> None:
        """Print what is left and close the live area."""
        if self.live is not None:
            self.live.update(Text(""), refresh=True)
            self.live.stop()
            self.live = None
        rest, self.pending = self.pending, ""
        if self.fence is not None and self.fence.split:
            self._print_code(rest, last=True)
        elif rest.strip():
            self._print_block(rest)
        self.fence = None

    # -- splitting -----------------------------------------------------------------------------

    def _commit_finished(self) -> None:
        while True:
            lines = self.pending.split("\n")
            complete = lines[:-1]  # the last element is the line in progress
            cut, fence = self._finished_upto(complete)
            if cut is None:
                self.fence = fence
                break
            block = "\n".join(complete[:cut])
            self.pending = "\n".join(lines[cut:])
            if self.fence is not None and self.fence.split:
                self._print_code(_strip_fence_close(block), last=True)
            elif block.strip():
                self._print_block(block)
            self.fence = None
        self._split_tall()

    def _finished_upto(self, lines: list[str]) -> tuple[int | None, _Fence | None]:
        """(number of leading complete lines that form a finished block, or None; the fence open
        at the end of the lines when no block is finished)."""
        fence = self.fence
        content = False
        for i, line in enumerate(lines):
            if fence is not None:
                if fence.closes(line):
                    return i + 1, None  # the closing line ends the code block
                continue
            m = _FENCE.match(line)
            if m:
                if content:
                    return i, None  # a fence interrupts the paragraph in progress
                fence = _Fence(m.group(1), m.group(2))
                continue
            if not line.strip():
                if content:
                    return i + 1, None
                continue
            if _HEADING.match(line):
                return (i if content else i + 1), None
            content = True
        return None, fence

    def _split_tall(self) -> None:
        """Keep the live area shorter than the screen: print the first lines of a tall block, or
        the first rows of one long line (a paragraph without line breaks)."""
        limit = max(4, self.console.height - 6)
        width = self.console.width
        lines = self.pending.split("\n")
        complete = lines[:-1]
        if _height(lines, width) <= limit:
            return
        keep = max(1, limit // 2)
        if _height(complete, width) <= limit:
            if self.fence is None and _height(lines[-1:], width) > limit:
                self._split_line(lines, keep, width)
            return
        if self.fence is not None:
            if not self.fence.split:  # the opening line holds the language: drop it
                opening = next(i for i, line in enumerate(complete) if _FENCE.match(line))
                body = complete[opening + 1 :]
                self.fence.split = True
                first = True
            else:
                body, first = complete, False
            out, rest = body[: len(body) - keep], body[len(body) - keep :]
            if out or first:
                self._print_code("\n".join(out), first=first)
            self.pending = "\n".join([*rest, lines[-1]])
            return
        # a tall paragraph or list: cut before a list item if there is one, else at a line
        cut = len(complete) - keep
        for j in range(cut, 0, -1):
            if _ITEM.match(complete[j]):
                cut = j
                break
        if cut <= 0:
            return
        self._print_block("\n".join(complete[:cut]), separate=True, continued=True)
        self.pending = "\n".join([*complete[cut:], lines[-1]])

    def _split_line(self, lines: list[str], keep: int, width: int) -> None:
        """The line in progress is taller than the live area may be: print the lines before it and
        the line up to a space about ``keep`` rows before its end; the rest stays live."""
        line = lines[-1]
        room, cut = keep * max(20, width - 2), len(line)
        while cut > 0 and room > 0:  # back from the end by ``keep`` rows of cells
            cut -= 1
            room -= cell_len(line[cut])
        space = line.rfind(" ", 0, cut)
        if space <= 0:  # no space to cut at: one word taller than the screen stays whole
            return
        self._print_block("\n".join([*lines[:-1], line[:space]]), separate=True, continued=True)
        self.pending = line[space:].lstrip(" ")

    # -- output --------------------------------------------------------------------------------

    def _print(self, renderable) -> None:
        (self.live.console if self.live is not None else self.console).print(renderable)

    def _print_block(self, source: str, separate: bool = True, continued: bool = False) -> None:
        if separate and self.printed_blocks and not self._continuing:
            self._print(Text(""))
        self._print(_Trimmed(Markdown(source.strip("\n"), code_theme=CODE_THEME)))
        self.printed_blocks += 1
        self._continuing = continued

    _continuing = False

    def _print_code(self, code: str, first: bool = False, last: bool = False) -> None:
        if first and self.printed_blocks and not self._continuing:
            self._print(Text(""))
        top = 1 if first else 0
        bottom = 1 if last else 0
        self._print(Syntax(code, self.fence.lang if self.fence else "text", theme=CODE_THEME,
                           word_wrap=True, padding=(top, 1, bottom, 1)))
        self.printed_blocks += 1
        self._continuing = not last

    def _show(self, force: bool = False) -> None:
        if not self.use_live:
            return
        if not self.pending and not (force and self._status):
            if self.live is not None:
                self.live.update(Text(""), refresh=True)
            return
        now = time.monotonic()
        if self.live is None:
            self.live = Live(console=self.console, auto_refresh=False, transient=True,
                             vertical_overflow="crop")
            self.live.start()
        elif now - self._shown < self.refresh_s:
            return
        self._shown = now
        if self.fence is not None and self.fence.split:
            view = Syntax(self.pending, self.fence.lang, theme=CODE_THEME, word_wrap=True, padding=(0, 1))
        else:
            view = _Trimmed(Markdown(self.pending, code_theme=CODE_THEME))
        if self._status is not None:
            view = Group(view, Text(self._status, style="dim")) if self.pending else Text(self._status, style="dim")
        self.live.update(view, refresh=True)


class _Trimmed:
    """A renderable without the blank lines Rich puts around some Markdown blocks (lists)."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        blank = [
            not "".join(seg.text for seg in line).strip()
            and not any(seg.style is not None and seg.style.bgcolor is not None for seg in line)
            for line in lines
        ]
        start = blank.index(False) if False in blank else len(lines)
        end = len(lines) - (blank[::-1].index(False) if False in blank else 0)
        new_line = Segment.line()
        for line in lines[start:end]:
            yield from line
            yield new_line


def _strip_fence_close(block: str) -> str:
    lines = block.split("\n")
    return "\n".join(lines[:-1]) if lines else ""


def _height(lines: list[str], width: int) -> int:
    """Rows the lines take at ``width`` (about: the renderer wraps at words), in cells (a CJK
    character takes two)."""
    width = max(20, width - 2)
    return sum(max(1, -(-cell_len(line) // width)) for line in lines)
