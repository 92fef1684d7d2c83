"""The chat's slash commands: the table users see (/help), and one function per command, each
taking the session."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text

from phimoe_cli.options import SAMPLING_NAMES
from phimoe_cli.params import GenerationError, SamplingParams
from phimoe_cli.transcript import Transcript, TranscriptError, data_dir

PROMPT = ">>> "

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
SETTING_NAMES = (*SAMPLING_NAMES, "max_new_tokens")  # /set takes every sampling parameter

COMMANDS = {
    "/help": "show this help",
    "/exit": "leave (also /quit, /bye, Ctrl+D)",
    "/clear": "start a new conversation (keeps the system prompt)",
    "/system": "/system TEXT sets the system prompt; /system alone shows it",
    "/set": "/set NAME VALUE: temperature, top_k, top_p, min_p, repetition_penalty, seed (none = random), "
            "max_new_tokens; /set alone lists them",
    "/show": "model, settings, context, history and autosave files",
    "/save": "/save [FILE]: write the conversation as JSON (default ./chat-DATE-TIME.json; never over a file)",
    "/save!": "/save! FILE: write it over an earlier transcript",
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



def run_command(s, line: str) -> bool:
    """Run a slash command in session ``s``; False means leave."""
    name, _, arg = line.strip().partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    arg = arg.strip()
    handler = HANDLERS.get(name)
    if handler is None:
        close = [c for c in COMMANDS if c.startswith(name[:3])] if len(name) > 1 else []
        extra = f" (did you mean {close[0]}?)" if close else ""
        s.hint(f"unknown command {name}{extra}: /help lists the commands; "
                  "start a line with // to send one beginning with /")
        return True
    try:
        return handler(s, arg) is not False
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. /save to a bad path: hint, go on
        s.hint(f"{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
        return True

def cmd_exit(s, arg: str):
    return False

def cmd_help(s, arg: str) -> None:
    s.out(Text("Commands", style="bold"))
    for name, text in COMMANDS.items():
        s.out(Text(f"  {name:<8} ", style="cyan") + Text(text))
    s.out(Text("Keys", style="bold"))
    for key, text in KEYS:
        s.out(Text(f"  {key:<22} ", style="cyan") + Text(text))
    s.out(Text("A line starting with // sends text that starts with /.", style="dim"))

def cmd_clear(s, arg: str) -> None:
    s.conv.clear()
    s.new_autosave()
    s.note("new conversation" + (" (the system prompt stays)" if s.conv.system else ""))

def cmd_system(s, arg: str) -> None:
    if not arg:
        s.note(f"system prompt: {s.conv.system}" if s.conv.system
                  else "no system prompt (/system TEXT sets one)")
        return
    s.conv.set_system(arg)
    s.note("system prompt set (the next reply recomputes the context)")

def cmd_set(s, arg: str) -> None:
    if not arg:
        _show_settings(s)
        return
    parts = arg.split(None, 1)
    key = SETTINGS.get(parts[0].lower())
    if key is None:
        s.hint(f"unknown setting {parts[0]!r}: one of {', '.join(SETTING_NAMES)}")
        return
    if len(parts) < 2:
        s.hint(f"/set {key} VALUE (now {_setting(s, key)})")
        return
    raw = parts[1].strip()
    try:
        value = _parse_setting(key, raw)
        if key == "max_new_tokens":
            s.settings.max_new_tokens = value
        else:
            params = SamplingParams(**{**s.settings.params.to_dict(), key: value}).validate()
            s.settings.params = params
    except (ValueError, GenerationError) as exc:
        s.hint(f"bad value for {key}: {exc}")
        return
    s.note(f"{key} = {_setting(s, key)}")

def _setting(s, key: str):
    if key == "max_new_tokens":
        return s.settings.max_new_tokens
    value = getattr(s.settings.params, key)
    return "none (random)" if key == "seed" and value is None else value

def _show_settings(s) -> None:
    s.out(Text("  " + "  ".join(f"{k}={_setting(s, k)}" for k in SETTING_NAMES)))

def cmd_show(s, arg: str) -> None:
    d = s.engine.describe()
    if "base_url" in d:
        model_rows = [("model", f"{d['id']} (served)"), ("server", d["base_url"])]
        cache = "counted by the server"
    else:
        model_rows = [("model", f"{d['id']}" + (f" @ {d['revision']}" if d["revision"] else "")),
                      ("path", d["path"]), ("dtype / device", f"{d['dtype']} / {d['device']}"),
                      ("quantization", d["quantization"] or "none")]
        cache = f"KV cache {s.engine.cache_bytes() / 2**20:.1f} MiB allocated"
    rows = [
        *model_rows,
        ("context", f"{s.context_used()} / {s.context_length or '?'} tokens ({cache})"),
        ("on overflow", s.on_overflow),
        ("system prompt", s.conv.system or "none"),
        ("settings", "  ".join(f"{k}={_setting(s, k)}" for k in SETTING_NAMES)),
        ("conversation", f"{s.conv.turns} turns, {len(s.conv.messages)} messages"
                         + (f" ({len(s.conv.dropped)} dropped to fit)" if s.conv.dropped else "")),
        ("history", str(s.history_path) if s.history_path else "off"),
        ("autosave", f"off: it failed ({' '.join(s.saver.error.split())})" if s.saver.error
         else "off" if not s.saver.enabled else str(s.saver.path) if s.saver.path
         else f"{data_dir() / 'chats'} (after the first reply)"),
    ]
    for k, v in rows:
        s.out(Text(f"  {k:<15}", style="cyan") + Text(v))

def cmd_save(s, arg: str, overwrite: bool = False) -> None:
    path = Path(arg).expanduser() if arg else Path.cwd() / time.strftime("chat-%Y%m%d-%H%M%S.json")
    if path.is_dir():
        path = path / time.strftime("chat-%Y%m%d-%H%M%S.json")
    if path.exists():
        try:
            Transcript.load(path)
        except TranscriptError:
            s.hint(f"{path} exists and is not a phimoe transcript: not overwritten; choose another name")
            return
        if not overwrite:
            s.hint(f"{path} holds a saved conversation: /save! {arg} overwrites it")
            return
    try:
        s.transcript().save(path)
    except TranscriptError as exc:
        s.hint(str(exc))
        return
    s.note(f"saved {len(s.conv.messages)} messages to {path}")
    s.saver.error = None  # kept by hand: quitting now loses nothing

def cmd_save_over(s, arg: str) -> None:
    if not arg:
        s.hint("/save! FILE")
        return
    cmd_save(s, arg, overwrite=True)

def cmd_load(s, arg: str) -> None:
    if not arg:
        s.hint("/load FILE")
        return
    try:
        t = Transcript.load(Path(arg))
    except TranscriptError as exc:
        s.hint(str(exc))
        return
    s.load_transcript(t, Path(arg))

def cmd_retry(s, arg: str) -> None:
    i = s.conv.last_user_index()
    if i is None:
        s.hint("nothing to retry yet")
        return
    text = s.conv.messages[i]["content"]
    s.conv.truncate(i)
    if s.settings.params.seed is not None and s.settings.params.temperature > 0:
        s.note(f"(seed is {s.settings.params.seed}: the same reply again; /set seed none for a new one)")
    elif s.settings.params.temperature == 0:
        s.note("(temperature is 0: the same reply again; /set temperature 0.7 for a new one)")
    s.out(Text(PROMPT, style="bold") + Text(text), style="dim")
    s._reply_or_hint(text)

def cmd_undo(s, arg: str) -> None:
    i = s.conv.last_user_index()
    if i is None:
        s.hint("nothing to undo")
        return
    s.conv.truncate(i)
    s.note(f"removed the last exchange; {s.conv.turns} turns left")
    s.autosave()

def cmd_stats(s, arg: str) -> None:
    st, t = s.stats, s.stats.last
    if t is None:
        s.note("no reply yet")
    else:
        s.out(Text("last turn", style="bold"))
        s.out(Text(
            f"  prompt {t.prompt_tokens} tokens: prefilled {t.prefill_tokens}, "
            f"reused {t.reused_tokens} from the cache"
            + (("\n  (the prompt crossed the LongRoPE boundary: recomputed whole, with the long factors)"
                if t.recomputed_in_prompt else
                "\n  (the reply crossed the LongRoPE boundary: everything cached was recomputed once, with the long"
                " factors)") if t.recomputed else "")
        ))
        s.out(Text(
            f"  reply {t.completion_tokens} tokens ({t.finish_reason}); "
            f"first token {t.time_to_first_token_s:.2f} s; "
            f"prefill {t.prefill_tokens_per_s:.1f} tok/s; decode {t.decode_tokens_per_s:.1f} tok/s"
        ))
    s.out(Text("session", style="bold"))
    decode = st.completion_tokens / st.decode_s if st.decode_s > 0 else 0.0
    s.out(Text(
        f"  {st.turns} replies; prompts {st.prompt_tokens} tokens, prefilled {st.prefill_tokens}, "
        f"reused {st.prompt_tokens - st.prefill_tokens}; "
        f"generated {st.completion_tokens} tokens ({decode:.1f} tok/s)"
    ))
    s.out(Text(f"  context {s.context_used()} / {s.context_length or '?'} tokens; "
                  f"model loaded in {s.engine.load_s:.1f} s"))


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


HANDLERS = {
    "/exit": cmd_exit, "/help": cmd_help, "/clear": cmd_clear, "/system": cmd_system, "/set": cmd_set,
    "/show": cmd_show, "/save": cmd_save, "/save!": cmd_save_over,
    "/load": cmd_load, "/retry": cmd_retry, "/undo": cmd_undo,
    "/stats": cmd_stats,
}
assert set(HANDLERS) == set(COMMANDS)
