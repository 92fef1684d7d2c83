"""Chat transcripts on disk: the user data directory, atomic JSON writes, and loading with one-line
errors.

A transcript is one JSON object::

    {"format": "phimoe-chat", "version": 1,
     "model": {"id": ..., "revision": ..., "path": ..., "dtype": ..., "quantization": ...},
     "sampling": {"temperature": ..., "top_k": ..., "top_p": ..., "min_p": ...,
                  "repetition_penalty": ..., "seed": ...},
     "max_new_tokens": 1024,
     "messages": [{"role": "system" | "user" | "assistant", "content": "...",
                   "interrupted": true (only on a reply stopped by Ctrl+C)}, ...],
     "dropped": [messages dropped to fit the context, kept for the record],
     "created": "2024-...", "updated": "2024-..."}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phimoe_cli.errors import PhimoeError

FORMAT = "phimoe-chat"
VERSION = 1
ROLES = ("system", "user", "assistant")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


class TranscriptError(PhimoeError, ValueError):
    """A transcript that cannot be read or written; ``str()`` is one line."""


def data_dir() -> Path:
    """Where phimoe keeps the chat history and autosaves: ``$PHIMOE_HOME``, else
    ``$XDG_DATA_HOME/phimoe``, else ``~/.local/share/phimoe``."""
    home = os.environ.get("PHIMOE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: relative values are ignored
        return Path(xdg) / "phimoe"
    return Path.home() / ".local" / "share" / "phimoe"


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700 for what we create) and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` if needed, with mode 0600 (and make an existing one 0600)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers (and a crash) see the old file or the new one,
    never half of one: a temporary file in the same directory, fsync, then ``os.replace``.
    The file is private (0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Transcript:
    messages: list[dict] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    model: dict = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)
    created: str = field(default_factory=now_iso)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "sampling": {k: self.sampling.get(k) for k in SAMPLING_KEYS if k in self.sampling},
            "max_new_tokens": self.max_new_tokens,
            "messages": [_clean(m) for m in self.messages],
            "dropped": [_clean(m) for m in self.dropped],
            "created": self.created,
            "updated": now_iso(),
        }

    def save(self, path: Path) -> Path:
        path = Path(path).expanduser()
        try:
            atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n")
        except OSError as exc:
            raise TranscriptError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, path: Path) -> Transcript:
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
        except IsADirectoryError:
            raise TranscriptError(f"cannot read {path}: it is a directory") from None
        except OSError as exc:
            raise TranscriptError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            detail = " ".join(str(exc).split())
            raise TranscriptError(f"{path} is not a phimoe chat transcript (invalid JSON: {detail})") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, path: Path | str = "transcript") -> Transcript:
        def bad(why: str) -> TranscriptError:
            return TranscriptError(f"{path} is not a phimoe chat transcript ({why})")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad("no \"format\": \"phimoe-chat\"")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise bad("no version")
        if version > VERSION:
            raise TranscriptError(f"{path} is a transcript of version {version}; "
                                  f"this phimoe reads version {VERSION}: upgrade phimoe")
        messages = _messages(data.get("messages"), "messages", bad)
        dropped = _messages(data.get("dropped", []), "dropped", bad)
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise bad("\"sampling\" is not an object")
        sampling = {k: sampling[k] for k in SAMPLING_KEYS if k in sampling}
        max_new = data.get("max_new_tokens")
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise bad("\"max_new_tokens\" is not a positive integer")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise bad("\"model\" is not an object")
        created = data.get("created") if isinstance(data.get("created"), str) else now_iso()
        return cls(messages, sampling, max_new, model, dropped, created)


def _messages(value: Any, name: str, bad) -> list[dict]:
    """Checked whole before any of it is used: roles, the one system prompt only first (and never
    among the dropped), user and assistant taking turns, text content that is valid Unicode."""
    if not isinstance(value, list):
        raise bad(f"\"{name}\" is not a list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise bad(f"{name}[{i}] is not a message with a role (system, user, assistant) and text content")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise bad(f"{name}[{i}] holds text that is not valid Unicode (a lone surrogate)") from None
        if m["role"] == "system" and (i > 0 or name != "messages"):
            raise bad(f"{name}[{i}] is a system message; only the first message may be one")
        out.append(_clean(m))
    turns = [m["role"] for m in out if m["role"] != "system"]
    for k, role in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            where = k + (len(out) - len(turns))
            want = "a user" if k % 2 == 0 else "an assistant"
            raise bad(f"{name}[{where}] is {'a user' if role == 'user' else 'an assistant'} message where {want} "
                      "one must come: user and assistant take turns")
    return out


def _clean(message: dict) -> dict:
    out = {"role": message["role"], "content": message["content"]}
    if message.get("interrupted"):
        out["interrupted"] = True
    return out
