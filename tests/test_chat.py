"""`phimoe chat`: the real REPL driven through a pseudo-terminal (pexpect) on the tiny fixture
checkpoint, plus unit tests of transcripts, the overflow policy and the Markdown streamer."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import struct
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from conftest import PHIMOE, default_sigint, run_phimoe  # noqa: E402

from phimoe_cli import transcript as tr  # noqa: E402
from phimoe_cli.chat.conversation import (  # noqa: E402
    ContextOverflow,
    Conversation,
    closing_ids,
    drop_oldest_turns,
    group_turns,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[=>()][0-9A-Za-z]?|\x1b\][^\x07]*\x07|\r|\x07")
STATS = r"(\d+) tokens · [\d.]+ tok/s · first token [\d.]+ s · context (\d+)/(\d+)"
PROMPT = ">>>"


class Chat:
    """One `phimoe chat` in a pseudo-terminal; ``expect`` searches the output with the terminal
    escape codes removed, always forward from the last match."""

    def __init__(self, model_dir, home, *args, env=None, history=False):
        full_env = dict(os.environ, PHIMOE_HOME=str(home), TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1",
                        COLUMNS="120", LINES="40")
        full_env.pop("PHIMOE_NO_HISTORY", None)
        if not history:
            full_env["PHIMOE_NO_HISTORY"] = "1"
        full_env.update(env or {})
        self.child = pexpect.spawn(PHIMOE[0], [*PHIMOE[1:], "chat", "-m", str(model_dir), *map(str, args)],
                                   env=full_env, dimensions=(40, 120), encoding="utf-8", timeout=120,
                                   preexec_fn=default_sigint)
        self.raw = ""
        self.pos = 0
        self.expect(PROMPT)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or (not self.child.isalive() and not self._read(0)):
                raise AssertionError(f"{pattern!r} never came; output since the last match:\n{self.text[self.pos:]}")
            self._read(0.2)

    def _read(self, timeout: float) -> bool:
        try:
            self.raw += self.child.read_nonblocking(65536, timeout=timeout)
            return True
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def ask(self, text: str) -> re.Match:
        """Send a message; wait for the reply's stats line and the next prompt."""
        self.line(text)
        m = self.expect(STATS)
        self.expect(PROMPT)
        return m

    def command(self, text: str, *patterns: str) -> list[re.Match]:
        self.line(text)
        found = [self.expect(p) for p in patterns]
        self.expect(PROMPT)
        return found

    def quit(self) -> int:
        self.child.sendcontrol("d")
        deadline = time.monotonic() + 60
        while self.child.isalive() and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0.05):
            pass
        self.child.close()
        return self.child.exitstatus


def last_stats(chat: Chat) -> dict:
    (m,) = chat.command("/stats", r"prompt (\d+) tokens: prefilled (\d+), reused (\d+) from the cache([^\n]*\n[^\n]*?)"
                                  r"\s+reply (\d+) tokens \((\w+)\)")
    return {"prompt": int(m.group(1)), "prefill": int(m.group(2)), "reused": int(m.group(3)),
            "recomputed": "recomputed" in m.group(4), "reply": int(m.group(5)), "finish": m.group(6)}


def generate_text(model_dir, prompt, *args):
    r = run_phimoe("generate", "-m", model_dir, *args, prompt)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


# ------------------------------------------------------------------------------------------------
# The REPL in a terminal
# ------------------------------------------------------------------------------------------------


def test_reply_streams_like_generate(model_dir, tmp_path):
    expected = generate_text(model_dir, "Hello there", "-t", "0", "-n", "12", "--ignore-eos").rstrip("\n")
    assert expected.strip()
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "12", "--ignore-eos")
    chat.line("Hello there")
    start = chat.pos
    m = chat.expect(STATS)
    assert expected in chat.text[start : m.start()]
    assert m.group(1) == "12" and m.group(3) == "1024"
    chat.expect(PROMPT)
    # Markdown mode (the default) shows the same conversation going on
    assert chat.quit() == 0


def test_markdown_reply_and_context_line(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "-t", "0", "-n", "30", "--ignore-eos")
    m = chat.ask("Write some code")
    assert int(m.group(1)) == 30
    used = int(m.group(2))
    m2 = chat.ask("More")
    assert int(m2.group(2)) > used + 30  # the context grows with both turns
    assert chat.quit() == 0


def test_second_turn_prefills_only_the_new_tokens(model_dir, tmp_path):
    from phimoe_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    first, second = "Hello there", "And how are you?"
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "64", "--ignore-eos")
    chat.ask(first)
    s1 = last_stats(chat)
    p1 = len(tok.apply_chat([{"role": "user", "content": first}]))
    # turn 1 crossed LongRoPE's boundary (64 tokens in the fixture) while decoding: one recompute
    assert s1 == {"prompt": p1, "prefill": p1, "reused": 0, "recomputed": True, "reply": 64, "finish": "length"}
    chat.ask(second)
    s2 = last_stats(chat)
    # The new tokens: the last reply token (sampled, not yet fed to the model), <|end|> closing
    # the reply (the markers swallow the newline after them), then the new user turn.
    end = tok.token_to_id("<|end|>")
    assert closing_ids(tok) == [end]
    new_turn = len(tok.apply_chat([{"role": "user", "content": second}]))
    assert s2["prompt"] == p1 + 64 + 1 + new_turn
    assert s2["prefill"] == 1 + 1 + new_turn
    assert s2["reused"] == p1 + 64 - 1
    assert not s2["recomputed"]  # turn 2 stayed past the boundary: nothing computed again
    chat.command("/stats", rf"2 replies; prompts {p1 + s2['prompt']} tokens, prefilled {p1 + s2['prefill']}")
    assert chat.quit() == 0


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "-n", "100000", "--ignore-eos", "--seed", "3")
    # Ctrl+C at the prompt clears the line and says how to quit
    chat.child.send("half a thought")
    chat.expect("half a thought")
    chat.child.sendintr()
    chat.expect(r"cleared; /exit or Ctrl\+D quits")
    chat.expect(PROMPT)
    chat.command("/help", "Commands")  # the line was empty again: /help ran as a command
    # Ctrl+C in the middle of a long reply (the Markdown view is live)
    chat.line("Tell me a long story")
    chat.expect(r"long story\n")
    chat.expect(r"\S\S")  # the reply has started to stream
    chat.child.sendintr()
    chat.expect("interrupted")
    m = chat.expect(STATS)
    chat.expect(PROMPT)
    reply_tokens = int(m.group(1))
    assert 0 < reply_tokens < 1000
    s = last_stats(chat)
    assert s["finish"] == "interrupted" and s["reply"] == reply_tokens
    # the conversation goes on, with the partial reply in it
    chat.line("/set max_new_tokens 3")
    chat.expect("max_new_tokens = 3")
    chat.expect(PROMPT)
    m = chat.ask("Go on")
    assert m.group(1) == "3"
    (show,) = chat.command("/show", r"autosave\s+(\S+\.json)")
    saved = json.loads(Path(show.group(1)).read_text())
    roles = [(x["role"], x.get("interrupted", False)) for x in saved["messages"]]
    assert roles == [("user", False), ("assistant", True), ("user", False), ("assistant", False)]
    assert saved["messages"][0]["content"] == "Tell me a long story"
    assert saved["max_new_tokens"] == 3
    assert stat.S_IMODE(os.stat(show.group(1)).st_mode) == 0o600
    assert chat.quit() == 0
    assert f"phimoe chat --resume {show.group(1)}" in chat.text


def test_history_is_kept_across_runs(model_dir, tmp_path):
    history = tmp_path / "history"
    chat = Chat(model_dir, tmp_path, "-n", "2", history=True)
    chat.ask("remember this line")
    chat.command("/show", rf"history\s+{re.escape(str(history))}")
    assert chat.quit() == 0
    assert stat.S_IMODE(os.stat(history).st_mode) == 0o600
    assert "remember this line" in history.read_text()

    chat = Chat(model_dir, tmp_path, "-n", "2", history=True)
    chat.child.send("\x1b[A")  # Up: the previous run's lines come back, newest first
    chat.expect("/show")
    chat.child.send("\x1b[A")
    chat.expect("remember this line")
    chat.child.sendintr()
    chat.expect("cleared")
    chat.expect(PROMPT)
    chat.child.send("\x12remem")  # Ctrl+R: search the history
    chat.expect("remember this line")
    chat.child.send("\r")  # accept the search, then send the line
    chat.child.send("\r")
    chat.expect(STATS)
    chat.expect(PROMPT)
    assert chat.quit() == 0
    before = history.read_text()

    for args, env in ((["--no-history"], {}), ([], {"PHIMOE_NO_HISTORY": "1"})):
        chat = Chat(model_dir, tmp_path, "-n", "2", *args, env=env, history=True)
        chat.command("/show", r"history\s+off")
        chat.child.send("\x1b[A")
        chat.child.send("\r")  # nothing came back: an empty line is ignored
        chat.command("/stats", "no reply yet")
        assert chat.quit() == 0
        assert history.read_text() == before


def test_save_then_resume_reproduces_the_conversation(model_dir, tmp_path):
    file = tmp_path / "talk.json"
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0.5", "--top-k", "7", "--seed", "11", "-n", "6",
                "--system", "Be brief.")
    replies = []
    for q in ("first question", "second question"):
        chat.line(q)
        chat.expect(re.escape(q) + "\n")
        start = chat.pos
        m = chat.expect(STATS)
        replies.append(chat.text[start : m.start()].strip())
        chat.expect(PROMPT)
    chat.command(f"/save {file}", "saved 5 messages")
    assert chat.quit() == 0

    data = json.loads(file.read_text())
    assert data["format"] == "phimoe-chat" and data["version"] == 1
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][0]["content"] == "Be brief."
    assert [m["content"] for m in data["messages"][1::2]] == ["first question", "second question"]
    assert [m["content"].strip() for m in data["messages"][2::2]] == replies
    assert data["sampling"] == {"temperature": 0.5, "top_k": 7, "top_p": 0.95, "min_p": 0.0,
                                "repetition_penalty": 1.0, "seed": 11}
    assert data["max_new_tokens"] == 6
    assert data["model"]["id"] == str(model_dir) and data["model"]["dtype"] == "float32"
    assert data["model"]["revision"] is None and data["model"]["quantization"] is None

    chat = Chat(model_dir, tmp_path, "--plain", "--resume", file, "--top-k", "3")
    chat.expect(r"loaded .*talk\.json: 2 turns, 5 messages")
    chat.expect(PROMPT)
    text = chat.text
    for q, a in zip(("first question", "second question"), replies, strict=True):
        assert f">>> {q}" in text and a in text
    chat.command("/show", r"Be brief\.", r"temperature=0\.5  top_k=3 .*seed=11  max_new_tokens=6",
                 r"2 turns, 5 messages")
    m = chat.ask("third question")
    assert 1 <= int(m.group(1)) <= 6
    s = last_stats(chat)
    assert s["prompt"] == s["prefill"]  # a new process: the first turn computes the whole conversation
    assert chat.quit() == 0


def test_slash_commands(model_dir, tmp_path):
    saved = tmp_path / "saved.json"
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "4", "--ignore-eos", "--no-history")
    found = chat.command("/help", *[re.escape(c) for c in
                                    ("/help", "/exit", "/clear", "/system", "/set", "/show", "/save", "/save!",
                                     "/load", "/retry", "/undo", "/stats", "Esc Enter", "Ctrl+R")])
    assert len(found) == 14
    chat.command("/nope", r"unknown command /nope.*/help")
    chat.command("/set temperature hot", r"bad value for temperature: 'hot' is not a number")
    chat.command("/set top_p 2", r"bad value for top_p: top_p must be in \(0, 1\]")
    chat.command("/set nonsense 1", r"unknown setting 'nonsense'")
    chat.command("/set top-k 5", r"top_k = 5")
    chat.command("/set min_p 0.05", r"min_p = 0.05")
    chat.command("/set repetition_penalty 1.1", r"repetition_penalty = 1.1")
    chat.command("/set seed 9", r"seed = 9")
    chat.command("/set seed none", r"seed = none")
    chat.command("/set temperature 0", r"temperature = 0.0")
    chat.command("/set max-new-tokens 0", r"bad value for max_new_tokens")
    chat.command("/set", r"top_k=5.*max_new_tokens=4")
    chat.command("/system", r"no system prompt")
    chat.command("/system Be terse.", r"system prompt set")
    chat.command("/system", r"system prompt: Be terse\.")
    chat.command("/undo", "nothing to undo")
    chat.command("/retry", "nothing to retry")
    chat.command("/stats", "no reply yet")
    chat.child.send("line one\x1b\rline two")  # Esc+Enter: a newline, not a send
    chat.expect(r"\.\.\. line two")
    m = chat.ask("")
    assert m.group(1) == "4"
    chat.child.send("\x1b[200~pasted\nlines\x1b[201~")  # bracketed paste keeps the newline
    chat.expect(r"\.\.\. lines")
    chat.ask("")
    first = last_stats(chat)
    chat.line("/retry")
    chat.expect(STATS)
    chat.expect(PROMPT)
    s = last_stats(chat)
    assert s["prompt"] == first["prompt"] and s["prefill"] == 1  # the same prompt: all but one token reused
    chat.command(f"/save {saved}", "saved 5 messages")
    data = json.loads(saved.read_text())
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == ["line one\nline two", "pasted\nlines"]
    assert data["sampling"]["top_k"] == 5 and data["sampling"]["seed"] is None
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    chat.command(f"/save {notes}", r"exists and is not a phimoe transcript: not overwritten")
    chat.command(f"/save! {notes}", r"exists and is not a phimoe transcript: not overwritten")
    assert notes.read_text() == "my notes\n"
    chat.command(f"/save {saved}", re.escape(f"holds a saved conversation: /save! {saved} overwrites it"))
    chat.command("/undo", r"removed the last exchange; 1 turns left")
    chat.command(f"/save! {saved}", "saved 3 messages")
    assert len(json.loads(saved.read_text())["messages"]) == 3
    chat.command("/show", r"1 turns, 3 messages")
    chat.command("/clear", r"new conversation \(the system prompt stays\)")
    chat.command("/show", r"0 turns, 1 messages")
    chat.command(f"/load {tmp_path / 'missing.json'}", r"cannot read .*missing\.json")
    chat.command(f"/load {bad}", r"bad\.json is not a phimoe chat transcript")
    chat.command(f"/load {saved}", r"line one", r"loaded .*saved\.json: 1 turns, 3 messages")
    chat.command(f"/save {tmp_path / ('x' * 300)}.json", r"/save: .*name too long")  # a hint; the chat goes on
    chat.command("/save ~nosuchuser-phimoe/x.json", r"/save: ")
    chat.command("/load ~nosuchuser-phimoe/x.json", r"/load: |cannot read")
    chat.command("/set seed 99999999999999999999999", r"bad value for seed")
    chat.command("/set temperature 1e-45", r"bad value for temperature")
    chat.command("//not a command", STATS)  # // sends a line that starts with /
    chat.child.send("/he\t")  # Tab completes a command
    chat.expect("/help")
    chat.command("", "Commands")
    chat.line("/exit")
    chat.expect("conversation saved")
    assert chat.quit() == 0


def test_overflow_drops_the_oldest_turns(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "20", "--ignore-eos", "--context", "100",
                "--system", "S")
    used = []
    while True:
        m = chat.ask("tell me more")
        used.append(int(m.group(2)))
        if "context full" in chat.text:
            break
        assert len(used) < 6
    assert re.search(r"context full: dropped the \d+ oldest turns? \(\d+ messages\) to fit 100 tokens; "
                     r"the system prompt stays", chat.text)
    assert used[-1] <= 100 and used[-1] < used[-2] + 20
    chat.command("/show", r"system prompt\s+S", r"\(\d+ dropped to fit\)")
    assert chat.quit() == 0


# ------------------------------------------------------------------------------------------------
# Piped stdin, command-line errors
# ------------------------------------------------------------------------------------------------


def test_piped_stdin_answers_once(model_dir, tmp_path):
    expected = generate_text(model_dir, "Hello there", "-t", "0", "-n", "10", "--ignore-eos")
    r = run_phimoe("chat", "-m", model_dir, "-t", "0", "-n", "10", "--ignore-eos", input="Hello there",
                   env={"PHIMOE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == expected
    assert not (tmp_path / "chats").exists() and not (tmp_path / "history").exists()

    r = run_phimoe("chat", "-m", model_dir, input="   ", env={"PHIMOE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.decode().strip() == "error: the prompt is empty"


def test_bad_resume_file_is_one_line(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args, msg in (
        (["--resume", bad], "is not a phimoe chat transcript (invalid JSON"),
        (["--resume", "last"], "no saved conversation"),
        (["--on-overflow", "panic"], "--on-overflow must be drop-oldest or error"),
    ):
        r = run_phimoe("chat", "-m", model_dir, *args, input="hi", env={"PHIMOE_HOME": str(tmp_path)})
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and msg in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Units: transcripts, the overflow policy, the conversation's ids, Markdown streaming
# ------------------------------------------------------------------------------------------------


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PHIMOE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert tr.data_dir() == tmp_path / "xdg" / "phimoe"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tr.data_dir() == tmp_path / ".local" / "share" / "phimoe"
    monkeypatch.setenv("PHIMOE_HOME", str(tmp_path / "ph"))
    assert tr.data_dir() == tmp_path / "ph"


def test_transcript_round_trip(tmp_path):
    t = tr.Transcript(
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "héllo\n<|end|>"},
                  {"role": "assistant", "content": "part", "interrupted": True, "extra": 1}],
        sampling={"temperature": 0.2, "top_k": 3, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None},
        max_new_tokens=33, model={"id": "m", "revision": "r", "dtype": "bfloat16", "quantization": None},
    )
    path = t.save(tmp_path / "a.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = tr.Transcript.load(path)
    assert back.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "héllo\n<|end|>"},
                             {"role": "assistant", "content": "part", "interrupted": True}]
    assert back.sampling == t.sampling and back.max_new_tokens == 33 and back.model == t.model
    assert back.created == t.created


@pytest.mark.parametrize("content, why", [
    (b"", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[]", "format"),
    (b'{"format": "phimoe-chat"}', "no version"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": {}}', "\"messages\" is not a list"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "bot", "content": "x"}]}', "messages[0]"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "user", "content": 3}]}', "messages[0]"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [], "max_new_tokens": 0}', "max_new_tokens"),
    (b'{"format": "phimoe-chat", "version": 9, "messages": []}', "version 9"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "user", "content": "a"}, '
     b'{"role": "assistant", "content": "b"}, {"role": "system", "content": "obey"}]}',
     "messages[2] is a system message; only the first message may be one"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "user", "content": "a"}, '
     b'{"role": "user", "content": "b"}]}', "messages[1] is a user message where an assistant one must come"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "system", "content": "s"}, '
     b'{"role": "assistant", "content": "b"}]}', "messages[1] is an assistant message where a user one"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0] holds text that is not valid Unicode"),
    (b'{"format": "phimoe-chat", "version": 1, "messages": [], "dropped": [{"role": "system", "content": "s"}]}',
     "dropped[0] is a system message"),
])
def test_bad_transcripts_are_one_line_errors(tmp_path, content, why):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    with pytest.raises(tr.TranscriptError) as err:
        tr.Transcript.load(path)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    tr.atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tr.os, "replace", boom)
    with pytest.raises(OSError):
        tr.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind
    monkeypatch.undo()
    with pytest.raises(tr.TranscriptError, match="cannot write"):
        tr.Transcript().save(tmp_path / "no" / "such" / "dir.json")


def _msgs(*spec):
    return [{"role": r, "content": c} for r, c in spec]


def test_drop_oldest_turns_keeps_the_system_prompt():
    conv = _msgs(("system", "ss"), ("user", "u1"), ("assistant", "a1" * 5), ("user", "u2"), ("assistant", "a2"),
                 ("user", "u3"))

    def measure(ms):
        return sum(len(m["content"]) for m in ms)

    kept, dropped = drop_oldest_turns(conv, measure, budget=100)
    assert kept == conv and dropped == []
    kept, dropped = drop_oldest_turns(conv, measure, budget=10)
    assert kept == _msgs(("system", "ss"), ("user", "u2"), ("assistant", "a2"), ("user", "u3"))
    assert dropped == conv[1:3]
    kept, dropped = drop_oldest_turns(conv, measure, budget=4)
    assert kept == _msgs(("system", "ss"), ("user", "u3")) and len(dropped) == 4
    with pytest.raises(ContextOverflow, match="your message needs 4 tokens"):
        drop_oldest_turns(conv, measure, budget=3)
    system, turns = group_turns(conv)
    assert system == conv[:1] and [len(t) for t in turns] == [2, 2, 1]


def test_conversation_ids_follow_the_generated_reply(model_dir):
    from phimoe_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    conv = Conversation(tok, "sys")
    conv.add_user("hi")
    p1 = conv.prompt_ids()
    assert p1 == tok.apply_chat(conv.messages)
    odd = [tok.token_to_id("▁h"), tok.token_to_id("i")]  # not how "hi" would be re-tokenized
    conv.add_reply("hi", p1, odd, interrupted=False)
    conv.add_user("again")
    p2 = conv.prompt_ids()
    assert p2[: len(p1) + 2] == p1 + odd  # the reply's ids as generated, not re-tokenized
    assert p2[len(p1) + 2 :] == closing_ids(tok) + tok.apply_chat([{"role": "user", "content": "again"}])
    # /retry and /undo go back to the exact ids
    conv.truncate(conv.last_user_index())
    conv.add_user("again")
    assert conv.prompt_ids() == p2
    conv.truncate(conv.last_user_index())
    conv.truncate(conv.last_user_index())
    assert conv.messages == _msgs(("system", "sys")) and conv.prompt_ids() == tok.apply_chat(conv.messages)
    conv.set_system("other")
    conv.add_user("x")
    assert conv.prompt_ids() == tok.apply_chat(_msgs(("system", "other"), ("user", "x")))


def test_error_policy_keeps_the_conversation(model_dir):
    from rich.console import Console

    from phimoe_cli.chat.conversation import Settings
    from phimoe_cli.chat.session import ChatSession
    from phimoe_cli.engine import LocalEngine
    from phimoe_cli.generation import SamplingParams
    from phimoe_cli.runtime import load

    loaded = load(str(model_dir), progress=False)
    out = io.StringIO()
    session = ChatSession(LocalEngine(loaded, context_length=40), Settings(SamplingParams(temperature=0), 8),
                          system=None, stop=[], ignore_eos=True, plain=True, on_overflow="error",
                          console=Console(file=out, width=200))
    session.saver.enabled = False
    turn = session.reply("one", out=io.StringIO())
    assert turn.completion_tokens == 8 and len(session.conv.messages) == 2
    with pytest.raises(ContextOverflow, match="holds 40: /undo or /clear"):
        for _ in range(5):
            session.reply("a longer message that will not fit", out=io.StringIO())
    assert session.conv.messages[-1]["role"] == "assistant"  # the message that did not fit was not kept
    assert not session.conv.dropped


def test_markdown_stream_prints_every_block_once():
    from rich.console import Console

    from phimoe_cli.chat_render import MarkdownStream

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, height=20, color_system=None)
    stream = MarkdownStream(console, live=False)
    code = "\n".join(f"x{i} = {i}" for i in range(45))
    items = "\n".join(f"- item {i}" for i in range(45))
    text = f"# Title\nSome **bold** text.\n\n```python\n{code}\n```\nAfter the code.\n\n{items}\n\nThe end."
    for i in range(0, len(text), 3):  # pieces that cut lines, words and fences anywhere
        stream.feed(text[i : i + 3])
    stream.finish()
    out = buf.getvalue()
    lines = [line.strip() for line in out.splitlines()]
    for i in range(45):
        assert lines.count(f"x{i} = {i}") == 1
        assert lines.count(f"• item {i}") == 1
    assert lines.index("x44 = 44") < lines.index("After the code.") < lines.index("• item 0") < lines.index("The end.")
    assert "Some bold text." in lines and "**" not in out and "```" not in out


def test_plain_stream_is_raw_text():
    from phimoe_cli.chat_render import PlainStream

    out = io.StringIO()
    stream = PlainStream(out)
    for piece in ("# not ", "rendered", "\n**x**"):
        stream.feed(piece)
    stream.finish()
    assert out.getvalue() == "# not rendered\n**x**\n"


def test_resume_without_model_uses_the_transcripts(model_dir, tmp_path):
    """`--resume` with no --model continues with the model the conversation was with (its directory,
    else its id), not the default hub model; the same answer as naming it."""
    from phimoe_cli.transcript import Transcript

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    env = {"PHIMOE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    named = None
    for path in (str(model_dir), str(tmp_path / "moved-away")):
        file = Transcript(messages=messages, model={"id": str(model_dir), "path": path, "dtype": "float32"}).save(
            tmp_path / "t.json")
        resumed = run_phimoe("chat", "--resume", file, "-t", "0", "-n", 4, "--ignore-eos", input="More", env=env)
        if named is None:  # the model named: the same answer whichever path the transcript holds
            named = run_phimoe("chat", "--resume", file, "-m", model_dir, "-t", "0", "-n", 4, "--ignore-eos",
                               input="More", env=env)
        assert resumed.returncode == 0, resumed.stderr.decode()
        assert resumed.stdout == named.stdout and resumed.stdout.strip()
    chats = tmp_path / "home" / "chats"
    chats.mkdir(parents=True)
    Transcript(messages=messages, model={"id": str(model_dir)}).save(chats / "20990101-000000-1.json")
    last = run_phimoe("chat", "--resume", "last", "-t", "0", "-n", 4, "--ignore-eos", input="More",
                      env={"PHIMOE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    assert last.returncode == 0 and last.stdout == named.stdout, last.stderr.decode()


def test_a_failing_autosave_is_not_forgotten(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "-t", "0", "-n", 3, "--ignore-eos", env={"PHIMOE_HOME": "/proc/phimoe-nope"})
    chat.line("hello")
    chat.expect("autosave failed")
    chat.expect(PROMPT)
    chat.command("/show", r"autosave\s+off: it failed")
    chat.child.sendcontrol("d")
    chat.expect(r"this conversation is not saved \(autosave failed: .*\): /save FILE keeps it")
    chat.expect(PROMPT)
    assert chat.child.isalive()
    chat.child.sendcontrol("d")
    chat.expect("this conversation was not saved")
    assert chat.quit() == 0


def test_save_by_hand_after_a_failing_autosave_lets_you_quit(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "-t", "0", "-n", 3, "--ignore-eos", env={"PHIMOE_HOME": "/proc/phimoe-nope"})
    chat.ask("hello")
    chat.command(f"/save {tmp_path / 'kept.json'}", "saved 2 messages")
    assert chat.quit() == 0
    assert "not saved" not in chat.text and (tmp_path / "kept.json").exists()


def test_a_context_beyond_the_model_is_refused_before_loading(model_dir, tmp_path):
    """config.json alone refutes --context: the weights are not read (here they are not even there)."""
    import shutil

    bare = tmp_path / "config-only"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, bare / f.name)
    out = run_phimoe("chat", "-m", bare, "--context", 5000, input="hi")
    assert out.returncode == 2 and out.stderr.decode() == "error: --context 5000 is more than the model's 1024 tokens\n"


@pytest.mark.parametrize("terminal", ["reading", "slow"])
def test_ctrl_c_leaves_each_line_of_the_reply_once(model_dir, tmp_path, terminal):
    """What the terminal shows (a real terminal emulator, pyte) after Ctrl+C in a reply taller than
    one line: the tty used to echo "^C" at the end of a full line, which wrapped it, and the live
    area, erased by counting lines, left its first line on screen twice. "slow": the terminal stops
    reading until the chat's writes block (a slow terminal, ssh, a loaded machine), then Ctrl+C.
    The tty used to flush what was written and not yet read, and Python's unbuffered stdout
    (PYTHONUNBUFFERED=1, common in containers) dropped the rest of the write that the signal cut
    short: either way the erasing went on counting lines that never reached the screen, which took
    the lines above the reply, or left lines twice."""
    import fcntl
    import termios

    import pexpect
    import pyte

    rows, cols = 40, 120
    screen = pyte.HistoryScreen(cols, rows, history=5000)
    feed = pyte.ByteStream(screen)
    env = dict(os.environ, PHIMOE_HOME=str(tmp_path), TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1",
               PHIMOE_NO_HISTORY="1", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(PHIMOE[0], [*PHIMOE[1:], "chat", "-m", str(model_dir), "--ignore-eos", "-n", "900",
                                      "-t", "0"], env=env, dimensions=(rows, cols), preexec_fn=default_sigint)

    def screen_lines():
        history = ["".join(line[j].data for j in range(cols)).rstrip() for line in screen.history.top]
        return [line for line in [*history, *(d.rstrip() for d in screen.display)] if line]

    def reply_lines():
        lines = screen_lines()
        asked = [i for i, x in enumerate(lines) if x.startswith(">>> Tell me")]
        return len(lines) - asked[0] - 1 if asked else 0

    def pump(seconds, until=None, enough=None):
        end = time.monotonic() + seconds
        seen = b""
        while time.monotonic() < end:
            try:
                data = child.read_nonblocking(65536, timeout=0.1)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                break
            seen += data
            feed.feed(data)
            if (until and until in seen) or (enough and enough()):
                return

    pump(60, until=b">>>")
    child.send("Tell me a long story\r")
    pump(60, enough=lambda: reply_lines() >= 4)  # however loaded the machine: several lines, then Ctrl+C
    if terminal == "slow":  # unread output piles up in the pty until the chat's write blocks
        waiting, end = [], time.monotonic() + 30
        while time.monotonic() < end and not (len(waiting) >= 4 and len(set(waiting[-4:])) == 1):
            time.sleep(0.1)
            waiting.append(struct.unpack("i", fcntl.ioctl(child.child_fd, termios.FIONREAD, b"\0" * 4))[0])
        assert waiting[-1] > 0, waiting
    child.sendcontrol("c")
    pump(30, until=b"context ")
    pump(1)
    lines = screen_lines()
    asked = [i for i, x in enumerate(lines) if x.startswith(">>> Tell me")]
    assert asked, lines
    reply = lines[asked[0] + 1 :]
    ended = [i for i, x in enumerate(reply) if x.startswith("[interrupted")]
    assert ended, lines
    body = reply[: ended[0]]
    assert len(body) >= 3, lines  # the reply filled several lines before Ctrl+C
    assert len(set(body)) == len(body), body  # no line twice
    child.sendcontrol("d")
    child.expect(pexpect.EOF, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_mid_reply_saves_the_turn(model_dir, tmp_path, sig):
    """The reply in flight ends as Ctrl+C would: the live display is torn down (the cursor shown
    again), the user's message and the partial reply (interrupted) are autosaved, then the chat exits."""
    chat = Chat(model_dir, tmp_path, "-t", "0", "-n", 900, "--ignore-eos")
    chat.line("Tell me a long story")
    time.sleep(1.5)
    chat.child.kill(sig)
    deadline = time.monotonic() + 30
    while chat.child.isalive() and time.monotonic() < deadline:
        chat._read(0.2)
    while chat._read(0.05):
        pass
    assert not chat.child.isalive()
    chat.child.close()
    assert chat.child.exitstatus == 128 + sig
    saved = list((tmp_path / "chats").glob("*.json"))
    assert len(saved) == 1
    messages = json.loads(saved[0].read_text())["messages"]
    assert messages[0] == {"role": "user", "content": "Tell me a long story"}
    assert messages[1]["role"] == "assistant" and messages[1]["interrupted"] and messages[1]["content"]
    assert chat.raw.rfind("\x1b[?25h") > chat.raw.rfind("\x1b[?25l")  # the cursor is visible again


def test_a_full_context_is_never_counted_past_its_size(model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "1000", "--ignore-eos", "--context", "40")
    m = chat.ask("hi")
    assert (int(m.group(2)), int(m.group(3))) == (40, 40) and "context full" in chat.text
    assert chat.quit() == 0


def test_stats_after_the_prompt_crosses_the_longrope_boundary(model_dir, tmp_path):
    """Turn 2's prompt crosses the fixture's 64-token boundary: all of it is computed with the long
    factors, and /stats says so instead of claiming tokens reused from the cache."""
    chat = Chat(model_dir, tmp_path, "--plain", "-t", "0", "-n", "10", "--ignore-eos")
    chat.ask("Hi")
    first = last_stats(chat)
    assert not first["recomputed"]
    chat.ask("word " * 60)
    second = last_stats(chat)
    assert second["prompt"] > 64 and second["recomputed"]
    assert second["prefill"] == second["prompt"] and second["reused"] == 0
    assert "the prompt crossed the LongRoPE boundary: recomputed whole" in chat.text
    assert chat.quit() == 0


class _Terminal(io.StringIO):
    """What Rich writes, fed to a terminal emulator (pyte), 120 columns by 40 rows; ``lines``: what
    it shows, the scrollback included."""

    cols = 120

    def __init__(self):
        import pyte

        super().__init__()
        self.screen = pyte.HistoryScreen(self.cols, 40, history=5000)
        self.emulator = pyte.Stream(self.screen)
        self.written: list[str] = []

    def write(self, s):
        self.written.append(s)
        self.emulator.feed(s.replace("\n", "\r\n"))
        return len(s)

    def console(self):
        from rich.console import Console

        return Console(file=self, force_terminal=True, width=self.cols, height=40, color_system=None)

    @property
    def lines(self) -> list[str]:
        history = ["".join(line[j].data for j in range(self.cols)).rstrip() for line in self.screen.history.top]
        return [line for line in [*history, *(d.rstrip() for d in self.screen.display)] if line]


def test_a_reply_without_line_breaks_taller_than_the_screen_is_printed_in_pieces():
    """One paragraph without a newline (as random tokens are), some of it two cells a character:
    the live area measured only finished lines, so it grew past the screen (Rich crops it there,
    and what scrolled off cannot be erased). Now it stays shorter than the screen, and every word
    is on the screen once, in order."""
    import random

    from phimoe_cli.chat_render import MarkdownStream

    terminal = _Terminal()
    terminal.write(">>> Tell me a long story\n")
    stream = MarkdownStream(terminal.console(), refresh_s=0)
    rnd = random.Random(0)
    words = ["".join(rnd.choice("abcdefghij" if i % 4 else "深表千文字") for _ in range(rnd.randint(1, 9)))
             for i in range(1500)]  # about 90 rows of 120 cells
    text = " ".join(words)
    for i in range(0, len(text), 7):
        stream.feed(text[i : i + 7])
    stream.finish()
    erased = [len(re.match(r"\r\x1b\[2K((\x1b\[1A\x1b\[2K)*)", w).group(1)) // 8 + 1
              for w in terminal.written if w.startswith("\r\x1b[2K")]
    assert erased and max(erased) < 40, max(erased)  # each frame erased was shorter than the screen
    lines = terminal.lines
    assert lines[0] == ">>> Tell me a long story"
    assert " ".join(lines[1:]).split() == words


def _rendered(text: str) -> list[str]:
    """``text`` as a reply printed without a live area shows it."""
    from phimoe_cli.chat_render import MarkdownStream

    terminal = _Terminal()
    still = MarkdownStream(terminal.console(), live=False)
    still.feed(text)
    still.finish()
    return terminal.lines


def _terminal_session(model_dir, terminal, max_new_tokens):
    from phimoe_cli.chat.conversation import Settings
    from phimoe_cli.chat.session import ChatSession
    from phimoe_cli.engine import LocalEngine
    from phimoe_cli.generation import SamplingParams
    from phimoe_cli.runtime import load

    engine = LocalEngine(load(str(model_dir), progress=False))
    session = ChatSession(engine, Settings(SamplingParams(temperature=0), max_new_tokens), system=None, stop=[],
                          ignore_eos=True, plain=False, on_overflow="error", console=terminal.console())
    session.saver.enabled = False
    return session


@pytest.mark.parametrize("growth", [1, 2, 3])
def test_ctrl_c_while_a_frame_is_drawn_leaves_each_line_once(model_dir, growth):
    """Ctrl+C (a real SIGINT) that lands while the live area writes a frame: KeyboardInterrupt in the
    flush, after the frame went out but before Rich cleared its buffer, so Rich wrote that frame again
    without erasing the first copy, and the reply's lines came out twice. Now Ctrl+C while drawing
    waits, and the reply stops before its next token."""

    class Terminal(_Terminal):
        height, grown, armed = 0, 0, False

        def write(self, s):
            if "\x1b[2K" in s:  # the live area redrawn: erase its lines, write the new frame
                if s.count("\n") > self.height > 0:  # one line taller than the frame on screen
                    self.grown += 1
                    self.armed = self.grown == growth
                self.height = s.count("\n")
            return super().write(s)

        def flush(self):  # the frame is out; Rich has yet to forget it
            if self.armed:
                self.armed = False
                os.kill(os.getpid(), signal.SIGINT)

    terminal = Terminal()
    session = _terminal_session(model_dir, terminal, 900)
    terminal.write(">>> Tell me a long story\n")
    turn = session.reply("Tell me a long story")
    assert turn.finish_reason == "interrupted" and terminal.grown >= growth
    assert 0 < turn.completion_tokens < 900 and turn.decode_tokens_per_s > 0
    lines = terminal.lines
    assert lines[0] == ">>> Tell me a long story", lines
    body = lines[1 : next(i for i, x in enumerate(lines) if x.startswith("[interrupted"))]
    assert len(set(body)) == len(body), body
    assert body == _rendered(session.conv.messages[-1]["content"])  # the whole reply on screen, once


def test_the_longrope_pause_is_shown_while_it_lasts(model_dir):
    """The reply that takes the context past LongRoPE's boundary (64 tokens here) pauses while every
    cached token is computed again: a dim line under the reply says so, and goes with the next piece."""
    terminal = _Terminal()
    session = _terminal_session(model_dir, terminal, 120)
    turn = session.reply("Tell me a long story")
    assert turn.recomputed
    shown_at = [i for i, s in enumerate(terminal.written) if "crossed LongRoPE's boundary" in s]
    assert len(shown_at) == 1, shown_at
    assert "computing its 65 tokens again" in terminal.written[shown_at[0]]
    lines = terminal.lines
    assert not any("LongRoPE" in line for line in lines), lines  # gone from the screen
    assert lines[: len(lines) - 1] == _rendered(session.conv.messages[-1]["content"])  # then the stats line
