"""`phimoe chat`: the interactive conversation.

One model, one KV cache and one conversation per session. Every turn sends the whole conversation,
but the cache already holds everything before the new user message (the prompt, and the reply
exactly as it was generated), so only the new tokens are computed. The conversation is kept as
the ids the model saw: a reply is never re-tokenized (a different tokenization of the same text
would defeat the cache), it is followed by the chat format's closing tokens, and the next user
message is encoded on its own by the chat format.
"""

from phimoe_cli.chat.main import run_chat

__all__ = ["run_chat"]
