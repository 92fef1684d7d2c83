"""The CUDA paths, against the CPU in float32 (``pytest -m cuda``; benchmarks/gpu_check.sh runs them).

Every test here is skipped where torch sees no CUDA device, so the default run on our CPU-only
machines only collects them. What they check: logits on the GPU (bf16, int8 and nf4 experts,
bitsandbytes' CUDA kernels) agree with the CPU's float32 ones within bfloat16 tolerance; greedy
tokens through the LongRoPE boundary equal the CPU's; offloaded experts (pinned host memory, the
per-layer LRU cache on the device) equal resident ones, and the cache's hits and misses follow a
scripted routing; `--device auto` picks what `phimoe info --plan` printed.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from conftest import assert_same_clear_choices, make_model_dir, run_phimoe

from phimoe_cli.model import decode, load_model
from phimoe_cli.model.offload import OffloadedExperts, offload_stats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """Bigger than the tiny checkpoint: hidden 256, 4 layers, 8 experts, 8K positions."""
    return make_model_dir(tmp_path_factory.mktemp("cuda") / "small", hidden_size=256, intermediate_size=384,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                          max_position_embeddings=8192, sliding_window=8192)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got.float().cpu() - want.float()).abs().max().item()
    assert err <= rel * want.abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_cuda_logits_agree_with_the_cpu(model_dir, small_dir, quant):
    x = ids(40)
    for path in (model_dir, small_dir):
        with torch.inference_mode():
            cpu = load_model(path, dtype="float32", quantize=quant)(x)
            gpu = load_model(path, dtype="bfloat16", device="cuda", quantize=quant)(x.cuda())
        assert gpu.device.type == "cuda"
        _close(gpu, cpu, 0.05)  # bf16 activations over a few layers; the quantization is the same on both


def test_greedy_tokens_through_the_longrope_boundary_equal_the_cpus(tmp_path):
    path = make_model_dir(tmp_path / "long", max_position_embeddings=16384, original_max_position_embeddings=64,
                          sliding_window=16384)

    def greedy(device: str) -> list[int]:
        m = load_model(path, dtype="float32", device=device)
        seq = ids(50).to(device)
        cache = m.new_cache(1, 128)
        out = []
        with torch.inference_mode():
            logits = m(seq, cache=cache, logits_to_keep=1)
            for _ in range(30):  # 50 + 30 tokens: past the 64 of the short factors
                tok = logits[0, -1].argmax().view(1, 1)
                out.append(int(tok))
                logits = m(tok, cache=cache, logits_to_keep=1)
        return out

    assert greedy("cuda") == greedy("cpu")


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_static_decode_is_captured_agrees_with_eager_and_never_syncs(small_dir, quant):
    """The default CUDA decode: one CUDA graph per cache, replayed per token with no host-device
    sync (set_sync_debug_mode raises on one), and the logits of the model's own layers (fed the
    eager path's greedy tokens; for bf16 experts the same greedy tokens)."""
    m = load_model(small_dir, dtype="bfloat16", device="cuda", quantize=quant)
    assert decode.kind(m) == "static"

    def steps(kind: str, tokens=None, n: int = 40):
        decode.choose(m, kind)
        cache = m.new_cache(1, 128)  # room for every token: no growth, so one capture
        fed, logits = [], []
        with torch.inference_mode():
            out = m(ids(20).cuda(), cache=cache, logits_to_keep=1)
            for i in range(n):
                tok = out[0, -1].argmax().view(1, 1) if tokens is None else tokens[i]
                fed.append(tok)
                logits.append(out[0, -1].float())
                if kind == "static" and i >= 2:  # captured by now
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    out = m(tok, cache=cache, logits_to_keep=1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        return fed, torch.stack(logits)

    tokens, want = steps("eager")
    _, got = steps("static", tokens)
    step = m.model.decode_step
    assert step.kind == "static" and len(step.graphs) == 1  # captured once, not fallen back
    if quant == "none":
        assert_same_clear_choices(got, want, [int(t) for t in tokens])
    _close(got, want.cpu(), 0.02)


def test_offloaded_experts_on_cuda_equal_resident_ones(small_dir):
    x = ids(30).cuda()
    with torch.inference_mode():
        ref = load_model(small_dir, dtype="bfloat16", device="cuda")(x)
        for budget in (0, 1 << 30):  # only the top-2 experts per layer on the GPU, and all of them
            m = load_model(small_dir, dtype="bfloat16", device="cuda", offload="experts", gpu_memory=budget)
            assert torch.equal(m(x), ref)
            stats = offload_stats(m)
            assert stats["hits"] + stats["misses"] > 0
            del m
    torch.cuda.synchronize()


def test_lru_cache_on_cuda_follows_a_scripted_routing():
    experts = OffloadedExperts(4, 16, 24, capacity=2, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(0)
    for w in ("w1", "w2", "w3"):
        for e in range(4):
            experts.store(w, e, torch.randn(experts.host[w].shape[1:], generator=g).bfloat16())
    x = torch.randn(3, 16, device="cuda").bfloat16()
    for e in (0, 1, 0, 2, 1, 3, 3):  # capacity 2: miss, miss, hit, miss (1 out), miss (0 out), miss (2 out), hit
        w1, w2, w3 = (experts.host[w][e].cuda() for w in ("w1", "w2", "w3"))
        linear = torch.nn.functional.linear
        want = linear(torch.nn.functional.silu(linear(x, w1)) * linear(x, w3), w2)
        assert torch.equal(experts.expert(e, x), want)
    assert (experts.hits, experts.misses) == (2, 5)
    assert list(experts.slot_of) == [1, 3]


def test_pinned_host_memory_is_released_with_the_experts():
    experts = OffloadedExperts(4, 256, 384, capacity=2, dtype=torch.bfloat16, device="cuda")
    host = dict(experts.host)  # the memory itself outlives the module here, so it can be asked about
    assert experts.pinned is not None and all(t.is_pinned() for t in host.values())
    del experts
    gc.collect()
    assert not any(t.is_pinned() for t in host.values())
    torch.zeros(1, device="cuda").add_(1)  # no CUDA error left behind for the next kernel to report
    torch.cuda.synchronize()


def test_misses_computed_on_the_host_equal_copied_ones(small_dir, monkeypatch):
    x = ids(1).cuda()
    with torch.inference_mode():
        ref = load_model(small_dir, dtype="bfloat16", device="cuda", offload="experts", gpu_memory=0)(x)
        monkeypatch.setenv("PHIMOE_OFFLOAD_MISS", "host")
        m = load_model(small_dir, dtype="bfloat16", device="cuda", offload="experts", gpu_memory=0)
        got = m(x)
    assert offload_stats(m)["computed_on_host"] > 0
    _close(got, ref.cpu(), 0.02)  # the CPU's bf16 products round differently from cuBLAS's


def test_device_auto_picks_what_info_plan_printed(small_dir):
    r = run_phimoe("info", small_dir, "--plan", "--json")
    assert r.returncode == 0, r.stderr.decode()
    plan = json.loads(r.stdout)["plan"]
    m = load_model(small_dir, dtype="bfloat16", device="auto")
    assert m.lm_head.weight.device.type == plan["device"]
    assert bool(offload_stats(m)) == (plan["offload"] == "experts")


def test_a_model_too_big_for_the_gpu_is_one_clear_line():
    """64 layers of the real dimensions in bf16 (~156 GB): more than an H200 holds."""
    r = run_phimoe("bench", "--device", "cuda", "--shape", "phi-3.5-moe", "--layers", "64", "-p", "4", "-n", "1",
                   "--repeat", "1", timeout=600)
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
