"""The static one-token step (decode.StaticStep), the CUDA decode path, through its CPU-runnable
seams: it computes what the model's own layers compute, and reads nothing back to the host (the
property that lets CUDA capture it as one graph). Its CUDA capture is tested in test_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checkpoints import write_checkpoint
from conftest import assert_same_clear_choices

from phimoe_cli.model import decode, load_model
from phimoe_cli.model.layers import ExpertGroup, combine_chosen


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), shards=1, seed=3)  # LongRoPE boundary at 64


def decode_steps(model, kind: str, prompt: int, steps: int, tokens: list[int] | None = None):
    """Each step's logits from a cache that has to grow on the way, the tokens fed (greedy ones,
    or ``tokens``: teacher-forced) and each step's routing: every layer's chosen experts and their
    weights (recorded around the router, which runs as it is)."""
    decode.choose(model, kind)
    cache = model.new_cache(capacity=8)
    x = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(0))
    fed, logits, routes, step = [], [], [], []
    moes = [layer.block_sparse_moe for layer in model.model.layers]
    for moe in moes:
        def route(h, _route=moe.route):
            weights, chosen = _route(h)
            step.append((chosen.tolist(), weights.float().tolist()))
            return weights, chosen
        moe.route = route
    try:
        with torch.inference_mode():
            out = model(x, cache=cache, logits_to_keep=1)
            for i in range(steps):
                tok = out[0, -1].argmax().view(1, 1) if tokens is None else torch.tensor([[tokens[i]]])
                fed.append(int(tok))
                logits.append(out[0, -1].float())
                routes.append(list(step))
                step.clear()
                out = model(tok, cache=cache, logits_to_keep=1)
    finally:
        for moe in moes:
            del moe.route
    return fed, torch.stack(logits), routes


def test_grouped_experts_of_one_token_equal_the_chosen_experts_summed(ckpt):
    model = load_model(ckpt, dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for layer in model.model.layers:
            moe = layer.block_sparse_moe
            for _ in range(20):
                h = torch.randn(1, model.config.hidden_size, generator=g).bfloat16()
                weights, chosen = moe.route(h)
                want = combine_chosen(moe.experts.expert, h, weights, chosen)
                assert torch.equal(moe.experts.grouped(h, weights, chosen), want)


@pytest.mark.parametrize("tokens", [2, 37])
def test_grouped_experts_of_a_prompt_equal_the_expert_by_expert_loop(ckpt, tokens):
    """The CUDA prefill's grouped products against ExpertGroup.forward (one product per expert),
    in float32, on the CPU (torch._grouped_mm runs here too)."""
    model = load_model(ckpt, dtype="float32")
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        moe = model.model.layers[0].block_sparse_moe
        weights, chosen = moe.route(x)
        want = ExpertGroup.forward(moe.experts, x, weights, chosen)
        got = moe.experts.grouped(x, weights, chosen)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def alike(a, b) -> bool:
    """The same experts chosen in every layer, with weights within 0.05."""
    return all(ca == cb and torch.allclose(torch.tensor(wa), torch.tensor(wb), rtol=0, atol=0.05)
               for (ca, wa), (cb, wb) in zip(a, b, strict=True))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_static_step_decodes_the_tokens_of_the_models_own_layers(ckpt, quant):
    model = load_model(ckpt, dtype="bfloat16", quantize=quant)
    # 50 + 30 tokens: the cache grows from 8 rows, and is recomputed with the long factors at 64
    tokens, want, want_routes = decode_steps(model, "eager", 50, 30)
    _, got, got_routes = decode_steps(model, "static", 50, 30, tokens)  # the eager path's greedy tokens, fed
    assert decode.kind(model) == "static"
    if quant == "none":  # the same greedy tokens (int8: the eager products round the weights to bf16 first)
        assert_same_clear_choices(got, want, tokens)
    # Where a layer's router decided differently (sparsemixer's mask is a threshold: a rounding can
    # tip a near tie, and then an expert's weight jumps from 0.5 to 1) the logits may differ by
    # more; the step's earlier layers still decided alike. Such steps must be rare.
    same = [i for i in range(len(tokens)) if alike(got_routes[i], want_routes[i])]
    assert len(same) >= len(tokens) * 3 // 4, len(same)
    err = (got[same] - want[same]).abs().max().item()
    assert err <= 0.02 * want.abs().max().item(), err  # bf16: attention over masked rows sums differently


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_one_token_is_the_float64_product_of_the_dequantized_weights(ckpt, quant):
    """decode.quantized_one_token (the static step's quantized experts) against float64 products
    of the same dequantized weights, rounded to bf16 where the eager path rounds."""
    model = load_model(ckpt, dtype="bfloat16", quantize=quant)
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for layer in model.model.layers:
            moe = layer.block_sparse_moe
            e = moe.experts
            for _ in range(10):
                h = torch.randn(1, model.config.hidden_size, generator=g).bfloat16()
                weights, chosen = moe.route(h)
                want = 0
                for k, i in sorted(enumerate(chosen[0].tolist()), key=lambda ki: ki[1]):
                    w1, w3, w2 = (getattr(e, n).dequantize(i, torch.float32).double() for n in ("w1", "w3", "w2"))
                    x = h.double()
                    act = F.silu((x @ w1.T).bfloat16()) * (x @ w3.T).bfloat16()
                    want = want + ((act.double() @ w2.T).bfloat16() * weights[:, k, None]).bfloat16()
                got = decode.quantized_one_token(e, h, weights, chosen)
                assert got.dtype == torch.bfloat16
                # within a bf16 rounding of the largest value (an intermediate rounding that flips)
                assert (got.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_static_step_reads_nothing_back_to_the_host(ckpt, quant):
    """dynamo traces it as one graph: a .item(), .tolist() or a branch on a tensor's value (a
    host-device sync on CUDA, and what a CUDA graph cannot hold) would break the graph and fail."""
    model = load_model(ckpt, dtype="bfloat16", quantize=quant)
    cache = model.new_cache(capacity=16)
    traced = torch.compile(decode.static_step, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        x = model.model.embed_tokens(torch.tensor([[5]]))
        row = position = torch.tensor([3])
        got = traced(model.model, x, row, position, cache, False)
        want = decode.static_step(model.model, x, row, position, cache, False)
    assert torch.equal(got, want)


def test_static_step_is_only_chosen_where_it_runs(ckpt, monkeypatch):
    monkeypatch.delenv("PHIMOE_DECODE_KERNEL", raising=False)
    model = load_model(ckpt, dtype="bfloat16")
    assert decode.choose(model) != "static"  # the CPU default is the C step (or compiled / eager)
    assert decode.choose(model, "static") == "static"
    assert decode.choose(load_model(ckpt, dtype="float32"), "static") == "eager"  # bf16 only
    assert decode.choose(load_model(ckpt, dtype="bfloat16", quantize="nf4"), "static") == "static"
    assert decode.choose(load_model(ckpt, dtype="bfloat16", offload="experts"), "static") == "eager"
