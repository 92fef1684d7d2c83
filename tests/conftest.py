"""Shared fixtures: a small random PhiMoE checkpoint with the Phi-3.5 tokenizer files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on as many workers as cores (pytest -n auto): one thread each, set before torch
    # starts, or the workers' OpenMP threads spin against each other (measured 15x slower decode tests
    # with two 2-thread workers on 2 cores). Tests of thread counts set them themselves.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from checkpoints import make_config, write_checkpoint
from tokenizer_fixtures import build_tokenizer_dir, load_source


def make_model_dir(path, shards: int = 2, **config):
    """Tokenizer files as the hub ships them, then the model's config and weights."""
    build_tokenizer_dir(path, load_source())
    return write_checkpoint(path, make_config(**config), shards=shards)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A complete tiny checkpoint: hub-layout config, 2 shards + index, tokenizer, generation config."""
    return make_model_dir(tmp_path_factory.mktemp("model") / "phimoe-tiny")


def default_sigint() -> None:
    """preexec_fn for children that are sent Ctrl+C: a shell that starts the tests in the
    background (``cmd &``) hands them SIGINT ignored, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_SCRIPT = Path(sys.executable).parent / "phimoe"
#: The installed console script (pip install -e .), or the module when it is not on this Python's bin.
PHIMOE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phimoe_cli.cli"]


def run_phimoe(*args, input: bytes | str | None = b"", env: dict | None = None, timeout: float = 120):
    """Run the installed `phimoe` command; stdin is a pipe (empty unless ``input`` is given)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PHIMOE_NO_HISTORY", "1")
    if isinstance(input, str):
        input = input.encode("utf-8")
    return subprocess.run(
        [*PHIMOE, *map(str, args)],
        input=input, capture_output=True, timeout=timeout, env=full_env,
    )


def assert_same_clear_choices(got: torch.Tensor, want: torch.Tensor, tokens: list[int]) -> None:
    """Where the reference logits' best token (``tokens``) leads the runner-up by more than two
    bf16 roundings, ``got`` picks it too; near-ties may go either way (the two paths sum attention
    in different orders), and most steps must be clear ones."""
    top2 = want.float().topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * 2**-8 * top2[:, 0].abs()
    assert int(clear.sum()) >= len(tokens) // 2, int(clear.sum())
    picked = got.float().argmax(-1).cpu()
    assert torch.equal(picked[clear.cpu()], torch.tensor(tokens)[clear.cpu()])
