"""Tokenizer fixture directories in the Hugging Face Hub layout of microsoft/Phi-3.5-MoE-instruct.

Built as ``shared/reference/README.md`` describes: ``tokenizer.model`` plus a
``tokenizer_config.json`` with the published flags and ``"legacy": true`` are loaded with
``transformers.AutoTokenizer`` and saved, the resulting ``tokenizer.json`` is kept, and the
``tokenizer_config.json`` that is shipped says ``"legacy": false``, as the hub's does.

The published ``tokenizer.model`` / ``added_tokens.json`` / chat template / generation config come
from ``../shared/reference`` when it exists (next to the repository, as in CI). Without it (or with
``PHIMOE_TEST_TRAIN_SPM=1``) a small SentencePiece BPE model with byte fallback, trained here in the
Llama configuration, stands in for ``tokenizer.model``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

# The Phi-3.5 family's chat template; only used when ../shared/reference is absent.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI35_ADDED = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)


@dataclass
class Source:
    """The published files a fixture is made of."""

    spm: bytes
    added_tokens: dict[str, int]
    chat_template: str
    generation_config: dict
    config: dict = field(default_factory=dict)
    published: bool = True  # False: a small SentencePiece model trained here


def use_reference() -> bool:
    return (REFERENCE / "tokenizer.model").is_file() and os.environ.get("PHIMOE_TEST_TRAIN_SPM") != "1"


def load_source(train: bool | None = None) -> Source:
    """The published files (``train=False``), or a trained stand-in (``train=True``).

    ``None``: the published files when ../shared/reference exists, else the stand-in.
    """
    if train is None:
        train = not use_reference()
    if not train:
        config = json.loads((REFERENCE / "config.partial.json").read_text(encoding="utf-8"))
        return Source(
            spm=(REFERENCE / "tokenizer.model").read_bytes(),
            added_tokens=json.loads((REFERENCE / "added_tokens.json").read_text(encoding="utf-8")),
            chat_template=(REFERENCE / "chat_template.jinja").read_text(encoding="utf-8"),
            generation_config=json.loads((REFERENCE / "generation_config.json").read_text(encoding="utf-8")),
            config={k: v for k, v in config.items() if k != "rope_scaling"},
        )
    spm = train_small_spm()
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spm)
    n = sp.get_piece_size()
    added = {content: n + i for i, content in enumerate(PHI35_ADDED)}
    return Source(
        spm=spm,
        added_tokens=added,
        chat_template=PHI35_CHAT_TEMPLATE,
        generation_config={
            "bos_token_id": 1,
            "eos_token_id": [added["<|endoftext|>"], added["<|assistant|>"], added["<|end|>"]],
            "pad_token_id": added["<|endoftext|>"],
        },
        config={"model_type": "phimoe", "vocab_size": n + 64, "bos_token_id": 1, "eos_token_id": n},
        published=False,
    )


def _training_corpus() -> list[str]:
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world! How are you today? I am fine, thank you.",
        "def main():\n    print('hello')\n    return 0\n",
        "for (int i = 0; i < 10; i++) { x += i; }",
        "Numbers: 1234567890 3.14159 2718281828 42 100000",
        "中文文本测试，你好世界。日本語のテキストです。",
        "Ünïcödé àccents — em dash… quotes “like this”.",
        "مرحبا بالعالم שלום עולם",
        "emoji 😀 👍 🎉 ❤️ 👨‍👩‍👧",
        "\tindented\ttabs\n\nnew paragraphs   with   spaces",
    ]
    return [line for _ in range(30) for line in lines]


def train_small_spm() -> bytes:
    """A SentencePiece BPE model in the Llama configuration (byte fallback, no extra-space removal)."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=4096,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _added(content: str, rstrip: bool, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def tokenizer_config(source: Source, *, rstrip: bool, legacy: bool, add_bos: bool = False) -> dict:
    """The published tokenizer_config.json's flags (rstrip=False: every added token's rstrip off)."""
    decoder = {
        "0": _added("<unk>", False),
        "1": _added("<s>", False),
        "2": _added("</s>", rstrip, special=False),
    }
    for content, tid in sorted(source.added_tokens.items(), key=lambda kv: kv[1]):
        decoder[str(tid)] = _added(content, rstrip and content != "<|endoftext|>")
    return {
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": source.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": legacy,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict:
    def tok(content: str, rstrip: bool = False) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False}

    return {
        "bos_token": tok("<s>"),
        "eos_token": tok("<|endoftext|>"),
        "pad_token": tok("<|endoftext|>"),
        "unk_token": tok("<unk>"),
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer_dir(
    dst: Path,
    source: Source,
    *,
    with_json: bool = True,
    rstrip: bool = True,
    legacy: bool = False,
    add_bos: bool = False,
) -> Path:
    """A checkpoint directory's tokenizer files, as the hub ships them.

    ``with_json``: include the ``tokenizer.json`` that transformers makes from ``tokenizer.model``
    with ``legacy: true`` (the published file behaves that way). ``legacy``, ``add_bos``: the flags
    written in the shipped ``tokenizer_config.json`` (the hub's say false).
    """
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.model").write_bytes(source.spm)
    _write_json(dst / "config.json", {"model_type": "phimoe", **source.config})
    if with_json:
        from transformers import AutoTokenizer

        stage = dst.parent / f"{dst.name}.stage"
        saved = dst.parent / f"{dst.name}.saved"
        stage.mkdir()
        (stage / "tokenizer.model").write_bytes(source.spm)
        _write_json(stage / "config.json", {"model_type": "phimoe"})
        _write_json(stage / "tokenizer_config.json", tokenizer_config(source, rstrip=rstrip, legacy=True))
        AutoTokenizer.from_pretrained(str(stage)).save_pretrained(str(saved))
        shutil.copyfile(saved / "tokenizer.json", dst / "tokenizer.json")
        shutil.rmtree(stage)
        shutil.rmtree(saved)
    _write_json(
        dst / "tokenizer_config.json", tokenizer_config(source, rstrip=rstrip, legacy=legacy, add_bos=add_bos)
    )
    _write_json(dst / "special_tokens_map.json", special_tokens_map())
    _write_json(dst / "added_tokens.json", source.added_tokens)
    _write_json(dst / "generation_config.json", source.generation_config)
    return dst
