"""The compiled one-token decode path (model/kernels.py) computes what the eager path computes."""

from __future__ import annotations

import pytest
import torch

from checkpoints import write_checkpoint
from phimoe_cli.model import kernels, layers, load_model

ATOL = 2e-4  # float32, as in test_model.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), shards=1, seed=0)


def ids(n, seed=0):
    return torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def decode(model, x, prefix):
    cache = model.new_cache(capacity=8)
    with torch.inference_mode():
        steps = [model(x[:, :prefix], cache=cache)]
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(prefix, x.shape[1])]
    return torch.cat(steps, dim=1)


def test_small_models_decode_eagerly_by_default(ckpt, monkeypatch):
    monkeypatch.delenv("PHIMOE_DECODE_KERNEL", raising=False)
    model = load_model(ckpt)
    with torch.inference_mode():
        model(ids(3))
    assert model.decode_kernel is False  # the compile would not pay off for a few MB of weights


def test_compiled_decode_matches_eager_and_full_forward(ckpt):
    fast, eager = load_model(ckpt), load_model(ckpt)
    fast.use_decode_kernel(True)
    eager.use_decode_kernel(False)
    x = ids(40, seed=1)  # below original_max_position_embeddings (64): short factors throughout
    a, b = decode(fast, x, 20), decode(eager, x, 20)
    with torch.inference_mode():
        full = eager(x)
    assert kernels.matvec.compiled not in (None, False)  # the compiled kernels really ran
    assert layers._one_token_layer.compiled not in (None, False)
    assert (a - b).abs().max().item() < ATOL
    assert (a - full).abs().max().item() < ATOL


def test_compiled_decode_across_the_longrope_boundary(ckpt):
    fast, eager = load_model(ckpt), load_model(ckpt)
    fast.use_decode_kernel(True)
    eager.use_decode_kernel(False)
    x = ids(80, seed=2)  # 58 + 22 steps: the cache is recomputed with the long factors on the way
    a, b = decode(fast, x, 58), decode(eager, x, 58)
    with torch.inference_mode():
        full = eager(x)  # every position with the long factors, as the last steps see them
    assert (a - b).abs().max().item() < ATOL
    assert (a[:, -1] - full[:, -1]).abs().max().item() < ATOL


def test_compiled_decode_long_context_variant(ckpt, monkeypatch):
    """Past LONG_CONTEXT cached tokens the layer step switches to its matmul attention."""
    monkeypatch.setattr(layers, "LONG_CONTEXT", 24)
    fast, eager = load_model(ckpt), load_model(ckpt)
    fast.use_decode_kernel(True)
    eager.use_decode_kernel(False)
    x = ids(40, seed=3)
    a, b = decode(fast, x, 16), decode(eager, x, 16)  # steps on both sides of the switch
    assert layers._one_token_layer_long.compiled not in (None, False)
    assert (a - b).abs().max().item() < ATOL


def test_partly_quantized_layers_use_the_per_part_kernels(ckpt):
    """With quantized experts the layer cannot run as one call: attention alone is compiled."""
    fast = load_model(ckpt, quantize="int8")
    eager = load_model(ckpt, quantize="int8")
    fast.use_decode_kernel(True)
    eager.use_decode_kernel(False)
    assert not any(layer.fast for layer in fast.model.layers)
    assert all(layer.self_attn.fast for layer in fast.model.layers)
    x = ids(30, seed=4)
    a, b = decode(fast, x, 20), decode(eager, x, 20)
    assert layers._one_token_qkv.compiled not in (None, False)
    assert (a - b).abs().max().item() < ATOL


def test_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    k = kernels.Compiled(kernels.mv, torch.nn.functional.linear)
    x, w, b = torch.randn(1, 1, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.warns(UserWarning, match="running eagerly"):
        y = k(x, w, b)
    assert k.compiled is False
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b))
    assert torch.allclose(k(x, w, b), y)  # and stays eager, silently
