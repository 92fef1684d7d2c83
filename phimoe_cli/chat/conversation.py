"""The conversation of a chat: its messages, the ids the model saw, fitting it into the context.

One model, one KV cache and one conversation per session. Every turn sends the whole conversation,
but the cache already holds everything before the new user message (the prompt, and the reply
exactly as it was generated), so only the new tokens are computed. The conversation is kept as
the ids the model saw: a reply is never re-tokenized (a different tokenization of the same text
would defeat the cache), it is followed by the chat format's closing tokens, and the next user
message is encoded on its own by the chat format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phimoe_cli.errors import UsageError
from phimoe_cli.options import sampling
from phimoe_cli.params import MAX_NEW_TOKENS, GenerationError, SamplingParams
from phimoe_cli.transcript import Transcript, data_dir

OVERFLOW_POLICIES = ("drop-oldest", "error")


class ContextOverflow(UsageError):
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

    def drop_oldest_turn(self) -> list[dict]:
        """Drop the oldest whole turn (the system prompt stays); the messages dropped."""
        system, turns = group_turns(self.messages)
        if len(turns) <= 1:
            return []
        dropped = turns.pop(0)
        self.dropped += dropped
        self.messages = system + [m for t in turns for m in t]
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
    recomputed_in_prompt: bool = False  # the prompt itself crossed it

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

    def add(self, turn: TurnStats, prefill_s: float, decode_s: float) -> None:
        self.turns += 1
        self.prompt_tokens += turn.prompt_tokens
        self.prefill_tokens += turn.prefill_tokens
        self.completion_tokens += turn.completion_tokens
        self.prefill_s += prefill_s
        self.decode_s += decode_s
        self.last = turn
        self.history.append(turn)


@dataclass
class Settings:
    params: SamplingParams
    max_new_tokens: int


def resolve_settings(cli: dict, transcript: Transcript | None) -> Settings:
    """Sampling settings: the command line's, else the transcript's, else the defaults."""
    try:
        sampling(cli).validate()  # the command line's own values first: an error names no transcript
    except GenerationError as exc:
        raise UsageError(str(exc)) from None
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
