"""`phimoe chat`: the interactive conversation (see conversation.py for how the cache is kept)."""

from phimoe_cli.chat.main import run_chat

__all__ = ["run_chat"]
