"""The Phi-3.5 tokenizer and chat format, read from a checkpoint directory.

Two ways to load, chosen by what the directory holds:

* ``tokenizer.json`` (what the published checkpoint ships and what its publisher's code reads) is
  authoritative and is run by the ``tokenizers`` library itself, so its normalizer, pre-tokenizer,
  BPE model, added tokens (with their ``lstrip`` / ``rstrip``) and decoder behave exactly as in
  ``transformers``. The published file behaves like a *legacy* SentencePiece conversion (every text
  segment gets the ``▁`` dummy prefix) although ``tokenizer_config.json`` says ``legacy: false``:
  that is what the model was trained with, and what we reproduce.
* Without ``tokenizer.json``: ``tokenizer.model`` through ``sentencepiece`` plus
  ``tokenizer_config.json`` / ``added_tokens.json`` / ``special_tokens_map.json``, with the
  semantics that ``transformers`` gives such a directory (it converts ``tokenizer.model`` into a
  ``tokenizers`` pipeline): ``legacy: true`` -> every segment between added tokens is encoded as
  SentencePiece encodes it on its own; ``legacy: false`` -> only a segment at the very start of the
  input gets the dummy prefix; the added tokens' ``lstrip`` / ``rstrip`` swallow the whitespace
  next to them.

Message content is data: :meth:`Tokenizer.apply_chat` and :meth:`Tokenizer.encode` never turn
characters typed by a user (``<|end|>``, ``<|system|>``, ``</s>``...) into control tokens; the role
markers written by the chat format are the only special tokens of a prompt. (``transformers``
renders the template to a string and parses it, so it would.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phimoe_cli.errors import PhimoeError

__all__ = ["AddedToken", "StreamDecoder", "Tokenizer", "TokenizerError"]

# Rust's ``char::is_whitespace`` (the Unicode White_Space property), which ``tokenizers`` uses for
# the added tokens' lstrip / rstrip. Python's ``str.isspace`` also counts U+001C..U+001F.
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

# The Phi-3.5 chat format (chat_template.jinja of the Phi-3.5 family).
_SYSTEM, _USER, _ASSISTANT, _END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
_ROLE_MARKERS = {"system": _SYSTEM, "user": _USER, "assistant": _ASSISTANT}

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(PhimoeError, ValueError):
    """The tokenizer files are missing or unreadable, or an input cannot be tokenized.

    ``str(err)`` is one line that names the file concerned.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {_one_line(exc)}") from None


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# ------------------------------------------------------------------------------------------------
# Backends: encode one text segment (no added-token parsing) and decode a list of known ids.
# ------------------------------------------------------------------------------------------------


class _JsonBackend:
    """``tokenizer.json`` run by the ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        import tokenizers

        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self.full = tokenizers.Tokenizer.from_str(text)
            if not isinstance(spec, dict):
                raise ValueError("not a JSON object")
            # The same pipeline without added tokens: what plain text (message content) goes through.
            content = dict(spec, added_tokens=[], truncation=None, padding=None)
            self.first = tokenizers.Tokenizer.from_str(json.dumps(content))
            # A segment that does not start the input: a Metaspace with prepend_scheme "first" only
            # prefixes the segment at offset 0 of the whole input.
            rest_pre = _never_prepend(spec.get("pre_tokenizer"))
            if rest_pre != spec.get("pre_tokenizer"):
                self.rest = tokenizers.Tokenizer.from_str(json.dumps(dict(content, pre_tokenizer=rest_pre)))
            else:
                self.rest = self.first
        except TokenizerError:
            raise
        except Exception as exc:
            raise TokenizerError(f"cannot load {path}: {_one_line(exc)}") from None
        self.base_size = self.full.get_vocab_size(with_added_tokens=False)
        try:
            self.added = [
                AddedToken(
                    id=int(t["id"]),
                    content=str(t["content"]),
                    special=bool(t.get("special", False)),
                    lstrip=bool(t.get("lstrip", False)),
                    rstrip=bool(t.get("rstrip", False)),
                )
                for t in spec.get("added_tokens") or []
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TokenizerError(f"cannot load {path}: an added token is malformed ({_one_line(exc)})") from None
        # BOS / EOS that the post-processor adds around a plain input.
        bare = self.full.encode("a", add_special_tokens=False).ids
        framed = self.full.encode("a", add_special_tokens=True).ids
        self.prefix_ids: list[int] = []
        self.suffix_ids: list[int] = []
        if bare and len(framed) >= len(bare):
            for start in range(len(framed) - len(bare) + 1):
                if framed[start : start + len(bare)] == bare:
                    self.prefix_ids = framed[:start]
                    self.suffix_ids = framed[start + len(bare) :]
                    break

    def encode_segment(self, text: str, first: bool) -> list[int]:
        return (self.first if first else self.rest).encode(text, add_special_tokens=False).ids

    def piece(self, token_id: int) -> str | None:
        return self.full.id_to_token(token_id)

    def token_to_id(self, content: str) -> int | None:
        return self.full.token_to_id(content)

    def decode(self, ids: list[int]) -> str:
        return self.full.decode(ids, skip_special_tokens=False)


def _never_prepend(pre: Any) -> Any:
    if isinstance(pre, dict):
        if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
            return dict(pre, prepend_scheme="never")
        if pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list):
            return dict(pre, pretokenizers=[_never_prepend(p) for p in pre["pretokenizers"]])
    return pre


class _SentencePieceBackend:
    """``tokenizer.model`` through ``sentencepiece``, as transformers' conversion of it behaves."""

    # NormalizerSpec (field 3 of ModelProto) with add_dummy_prefix (its field 3) = false. Protobuf
    # merges a repeated embedded message, so appending this overrides the flag, as transformers'
    # non-legacy LlamaTokenizer does through the protobuf library.
    _NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"

    def __init__(self, path: Path, legacy: bool) -> None:
        import sentencepiece as spm

        self.legacy = legacy
        try:
            data = path.read_bytes()
            self.sp = spm.SentencePieceProcessor()
            self.sp.LoadFromSerializedProto(data)
            self.sp_bare = spm.SentencePieceProcessor()
            self.sp_bare.LoadFromSerializedProto(data + self._NO_DUMMY_PREFIX)
        except Exception as exc:
            raise TokenizerError(f"cannot load {path}: {_one_line(exc)}") from None
        self.base_size = self.sp.get_piece_size()
        self.added_by_id: dict[int, AddedToken] = {}
        self.prefix_ids: list[int] = []
        self.suffix_ids: list[int] = []

    def encode_segment(self, text: str, first: bool) -> list[int]:
        if self.legacy:
            return list(self.sp.encode(text))
        if first and not text.startswith((" ", "\u2581")):
            text = " " + text
        return list(self.sp_bare.encode(text))

    def piece(self, token_id: int) -> str | None:
        tok = self.added_by_id.get(token_id)
        if tok is not None:
            return tok.content
        if 0 <= token_id < self.base_size:
            return self.sp.id_to_piece(token_id)
        return None

    def token_to_id(self, content: str) -> int | None:
        for tok in self.added_by_id.values():
            if tok.content == content:
                return tok.id
        tid = self.sp.piece_to_id(content)
        return tid if self.sp.id_to_piece(tid) == content else None

    def decode(self, ids: list[int]) -> str:
        # The decoder transformers builds for this model: Replace("▁", " "), ByteFallback, Fuse,
        # Strip(" ", 1, 0).
        out: list[str] = []
        pending = bytearray()
        count = 0

        def flush_bytes() -> None:
            nonlocal count
            if count:
                try:
                    out.append(bytes(pending).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * count)
                pending.clear()
                count = 0

        for token_id in ids:
            piece = (self.piece(token_id) or "").replace("\u2581", " ")
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                pending.append(int(m.group(1), 16))
                count += 1
                continue
            flush_bytes()
            out.append(piece)
        flush_bytes()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------


class Tokenizer:
    """A Phi-3.5 tokenizer loaded from a checkpoint directory (see :meth:`from_dir`)."""

    def __init__(
        self,
        backend: _JsonBackend | _SentencePieceBackend,
        added: Iterable[AddedToken],
        *,
        bos_token: str | None,
        eos_token: str | None,
        generation_eos: Iterable[int] = (),
        source: Path | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.added_tokens: dict[int, AddedToken] = {t.id: t for t in added}
        self._added_by_content = {t.content: t for t in self.added_tokens.values()}
        # Longest first, so that the leftmost match is also the longest (as tokenizers matches).
        contents = sorted(self._added_by_content, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self.base_vocab_size = backend.base_size
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.eos_token = eos_token if self.eos_id is not None else None
        self.stop_ids: set[int] = set(generation_eos)
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        self._real_ids = set(range(self.base_vocab_size)) | set(self.added_tokens)
        #: One more than the largest real token id (32011 for Phi-3.5): ids from here up to the
        #: model's vocabulary size (32064) are padding rows with no token.
        self.num_real_tokens = max(self._real_ids) + 1 if self._real_ids else 0

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the checkpoint directory ``path``.

        Raises:
            TokenizerError: the directory or its tokenizer files are missing or unreadable.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            raise TokenizerError(f"tokenizer directory {root} does not exist or is not a directory")
        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise TokenizerError(f"cannot read {config_path}: not a JSON object")
        special_map_path = root / "special_tokens_map.json"
        special_map = _read_json(special_map_path) if special_map_path.is_file() else {}
        if not isinstance(special_map, dict):
            raise TokenizerError(f"cannot read {special_map_path}: not a JSON object")

        def named(key: str, default: str | None) -> str | None:
            for source in (config, special_map):
                content = _token_content(source.get(key))
                if content is not None:
                    return content
            return default

        generation_eos: list[int] = []
        gen_path = root / "generation_config.json"
        if gen_path.is_file():
            gen = _read_json(gen_path)
            eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
            items = eos if isinstance(eos, list) else [eos] if eos is not None else []
            for item in items:
                if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                    raise TokenizerError(f"cannot read {gen_path}: eos_token_id must be an id or a list of ids")
                generation_eos.append(item)

        json_path = root / "tokenizer.json"
        model_path = root / "tokenizer.model"
        if json_path.is_file():
            backend: _JsonBackend | _SentencePieceBackend = _JsonBackend(json_path)
            added = backend.added
        elif model_path.is_file():
            legacy = config.get("legacy", True)
            backend = _SentencePieceBackend(model_path, legacy=bool(legacy) if legacy is not None else True)
            added = _added_from_configs(root, config, special_map, backend)
            backend.added_by_id = {t.id: t for t in added}
            bos = named("bos_token", "<s>")
            eos = named("eos_token", "</s>")
            if config.get("add_bos_token", False) and bos is not None:
                bid = backend.token_to_id(bos)
                backend.prefix_ids = [bid] if bid is not None else []
            if config.get("add_eos_token", False) and eos is not None:
                eid = backend.token_to_id(eos)
                backend.suffix_ids = [eid] if eid is not None else []
        else:
            raise TokenizerError(f"{root} has neither tokenizer.json nor tokenizer.model")
        return cls(
            backend,
            added,
            bos_token=named("bos_token", "<s>"),
            eos_token=named("eos_token", "</s>"),
            generation_eos=generation_eos,
            source=root,
        )

    # -- vocabulary --------------------------------------------------------------------------------

    def token_to_id(self, content: str) -> int | None:
        tok = self._added_by_content.get(content)
        return tok.id if tok is not None else self._backend.token_to_id(content)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.piece(token_id) if self.is_real(token_id) else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own: its piece with the word boundary as a space,
        a byte-fallback token's one byte, an added token's content (b"" for a padding id)."""
        if not self.is_real(token_id):
            return b""
        added = self.added_tokens.get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        piece = self._backend.piece(token_id) or ""
        if _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def is_real(self, token_id: int) -> bool:
        """True for an id that is a token (not a padding row of the embedding)."""
        return token_id in self._real_ids

    def is_special(self, token_id: int) -> bool:
        tok = self.added_tokens.get(token_id)
        return tok is not None and tok.special

    def valid_token_mask(self, vocab_size: int):
        """A ``torch.BoolTensor`` of ``vocab_size`` entries: True where the id is a real token."""
        import torch

        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[: min(self.base_vocab_size, vocab_size)] = True
        extra = [i for i in self.added_tokens if 0 <= i < vocab_size]
        if extra:
            mask[torch.tensor(extra, dtype=torch.long)] = True
        return mask

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """The ids of ``text`` as plain text: no chat format; BOS/EOS only if the config adds them.

        ``parse_special=False`` (the default) encodes every character as text, so ``"<|end|>"``
        typed by a user is never a control token. ``parse_special=True`` matches added tokens in
        the text as ``transformers``' ``encode`` does.
        """
        _check_text(text)
        parts: list[str | AddedToken] = self._split(text) if parse_special else [text]
        ids = self._encode_parts(parts)
        if add_special_tokens:
            ids = list(self._backend.prefix_ids) + ids + list(self._backend.suffix_ids)
        return ids

    def apply_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for ``messages`` (dicts with ``role`` and ``content``) in the Phi-3.5 format.

        ``<|system|>\\n{content}<|end|>\\n`` (only when the system content is not empty),
        ``<|user|>\\n{content}<|end|>\\n``, ``<|assistant|>\\n{content}<|end|>\\n``, then
        ``<|assistant|>\\n`` (``add_generation_prompt``) or the eos token. The content is encoded
        as text; the role markers are the only special tokens.
        """
        if not messages:
            raise TokenizerError("cannot format an empty conversation: give at least one message")
        markers = {role: self._marker(m) for role, m in _ROLE_MARKERS.items()}
        end = self._marker(_END)
        parts: list[str | AddedToken] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"message {i} is not a mapping with 'role' and 'content'")
            role, content = message.get("role"), message.get("content")
            if role not in markers:
                raise TokenizerError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
            if not isinstance(content, str):
                raise TokenizerError(f"message {i}: content must be a string")
            _check_text(content)
            if role == "system" and not content:
                continue
            parts += [markers[role], "\n" + content, end, "\n"]
        if add_generation_prompt:
            parts += [markers["assistant"], "\n"]
        elif self.eos_token is not None:
            # The template writes the eos token, which transformers then parses as that token.
            parts.append(self._added_by_content.get(self.eos_token) or self.eos_token)
        return self._encode_parts(parts)

    def _marker(self, content: str) -> AddedToken:
        tok = self._added_by_content.get(content)
        if tok is None:
            raise TokenizerError(f"the tokenizer in {self.source} has no {content} token: not a Phi-3.5 tokenizer")
        return tok

    def _split(self, text: str) -> list[str | AddedToken]:
        if self._split_re is None:
            return [text]
        parts: list[str | AddedToken] = []
        pos = 0
        for m in self._split_re.finditer(text):
            parts.append(text[pos : m.start()])
            parts.append(self._added_by_content[m.group()])
            pos = m.end()
        parts.append(text[pos:])
        return parts

    def _encode_parts(self, parts: list[str | AddedToken]) -> list[int]:
        # Merge adjacent texts, then let each added token swallow the whitespace its
        # lstrip / rstrip asks for, as tokenizers does.
        merged: list[str | AddedToken] = []
        for part in parts:
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        ids: list[int] = []
        for i, part in enumerate(merged):
            if isinstance(part, AddedToken):
                ids.append(part.id)
                continue
            before = merged[i - 1] if i > 0 else None
            after = merged[i + 1] if i + 1 < len(merged) else None
            text = part
            if isinstance(before, AddedToken) and before.rstrip:
                text = _lstrip_ws(text)
            if isinstance(after, AddedToken) and after.lstrip:
                text = _rstrip_ws(text)
            if text:
                ids += self._backend.encode_segment(text, first=i == 0)
        return ids

    # -- decoding ----------------------------------------------------------------------------------

    def _keep(self, token_id: int, skip_special_tokens: bool) -> bool:
        if not isinstance(token_id, int) or not self.is_real(token_id):
            return False
        return not (skip_special_tokens and self.is_special(token_id))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``. Ids that are not tokens (padding rows) are ignored."""
        kept = [int(i) for i in ids if self._keep(int(i), skip_special_tokens)]
        return self._backend.decode(kept)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _is_byte_token(self, token_id: int) -> bool:
        piece = self._backend.piece(token_id)
        return piece is not None and _BYTE_PIECE.fullmatch(piece) is not None


class StreamDecoder:
    """Incremental decoding: ``push`` ids one at a time, then ``flush``.

    The concatenation of everything returned equals ``tokenizer.decode(all ids)``. A run of
    byte-fallback tokens is held back until it ends (its bytes are decoded together, and an
    invalid sequence turns every byte of the run into U+FFFD), so half a UTF-8 character is never
    emitted; special tokens are not printed when ``skip_special_tokens``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is decoded again for context
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if not self._tok._keep(token_id, self._skip):
            return ""
        self._ids.append(token_id)
        if self._tok._is_byte_token(token_id):
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tok._backend.decode
        old = decode(self._ids[self._prefix : self._read])
        new = decode(self._ids[self._prefix :])
        if not final and (len(new) <= len(old) or new.endswith("\ufffd")):
            return ""
        if not new.startswith(old):  # cannot happen with the decoders of this model family
            old = decode(self._ids[: self._read])
            new = decode(self._ids)
            self._prefix = 0
        text = new[len(old) :]
        self._prefix, self._read = self._read, len(self._ids)
        return text


def _lstrip_ws(text: str) -> str:
    i = 0
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return text[i:]


def _rstrip_ws(text: str) -> str:
    j = len(text)
    while j > 0 and text[j - 1] in _WHITESPACE:
        j -= 1
    return text[:j]


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError("the text is not valid Unicode (it contains a lone surrogate)") from None


def _added_from_configs(
    root: Path, config: Mapping[str, Any], special_map: Mapping[str, Any], backend: _SentencePieceBackend
) -> list[AddedToken]:
    """Added tokens as transformers assembles them without tokenizer.json."""
    specials: dict[str, Mapping[str, Any]] = {}
    for key, value in special_map.items():
        values = value if key == "additional_special_tokens" and isinstance(value, list) else [value]
        for v in values:
            content = _token_content(v)
            if content is not None:
                specials[content] = v if isinstance(v, Mapping) else {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(key))
        if content is not None and content not in specials:
            specials[content] = config[key] if isinstance(config[key], Mapping) else {}

    tokens: dict[int, AddedToken] = {}
    added_path = root / "added_tokens.json"
    if added_path.is_file():
        added_json = _read_json(added_path)
        if not isinstance(added_json, dict):
            raise TokenizerError(f"cannot read {added_path}: not a JSON object of token -> id")
        for content, tid in added_json.items():
            if not isinstance(tid, int) or tid < 0:
                raise TokenizerError(f"cannot read {added_path}: the id of {content!r} is not an id")
            flags = specials.get(content, {})
            tokens[tid] = AddedToken(
                tid,
                content,
                special=content in specials,
                lstrip=bool(flags.get("lstrip", False)),
                rstrip=bool(flags.get("rstrip", False)),
            )
    # Special tokens already in the SentencePiece vocabulary (<unk>, <s>, </s>).
    for content, flags in specials.items():
        tid = backend.sp.piece_to_id(content)
        if tid < backend.base_size and backend.sp.id_to_piece(tid) == content and tid not in tokens:
            tokens[tid] = AddedToken(
                tid, content, True, bool(flags.get("lstrip", False)), bool(flags.get("rstrip", False))
            )
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"cannot read {root / 'tokenizer_config.json'}: added_tokens_decoder is not an object")
    for key, spec in decoder.items():
        try:
            tid = int(key)
            content = str(spec["content"])
        except (TypeError, ValueError, KeyError):
            raise TokenizerError(
                f"cannot read {root / 'tokenizer_config.json'}: bad added_tokens_decoder entry {key!r}"
            ) from None
        tokens[tid] = AddedToken(
            tid,
            content,
            special=bool(spec.get("special", False)),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
        )
    return sorted(tokens.values(), key=lambda t: t.id)
