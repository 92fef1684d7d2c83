"""Expert offload (host memory + per-layer LRU device cache), exercised CPU-to-CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_phimoe

from phimoe_cli.errors import UsageError
from phimoe_cli.model import PhimoeConfig, load_model
from phimoe_cli.model.offload import (
    HOST_ROWS,
    OffloadedExperts,
    _page_locked_stacks,
    offload_stats,
    plan_placement,
)


def ids(n, seed=0):
    return torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_offloaded_model_equals_the_resident_one(model_dir):
    ref = load_model(model_dir)
    x = ids(30)
    with torch.no_grad():
        full = ref(x)
    for budget in (0, 10**9):  # top-k experts per layer only, and all of them
        m = load_model(model_dir, offload="experts", gpu_memory=budget)
        with torch.no_grad():
            cache = m.new_cache()
            inc = torch.cat([m(x[:, :18], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(18, 30)], 1)
        assert (inc - full).abs().max().item() < 1e-4
        stats = offload_stats(m)
        assert stats["hits"] + stats["misses"] > 0
    assert offload_stats(ref) == {}


def stored_experts():
    """4 offloaded experts (capacity 2) holding random float32 weights, and those weights."""
    torch.manual_seed(0)
    experts = OffloadedExperts(4, 8, 12, capacity=2, dtype=torch.float32, device="cpu")
    dense = {w: torch.randn(4, *experts.host[w].shape[1:]) for w in ("w1", "w2", "w3")}
    for w, t in dense.items():
        for e in range(4):
            experts.store(w, e, t[e])
    return experts, dense


def expert_reference(dense, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, dense["w1"][e])) * F.linear(x, dense["w3"][e]), dense["w2"][e])


def test_lru_hits_and_evictions():
    experts, dense = stored_experts()
    x = torch.randn(3, 8)
    for e in (0, 1, 0, 2, 1, 1):
        got = experts.expert(e, x)
        want = expert_reference(dense, e, x)
        assert torch.allclose(got, want, atol=1e-6), e  # right weights after every eviction
    # 0 miss, 1 miss, 0 hit, 2 miss (evicts 1), 1 miss (evicts 0), 1 hit
    assert (experts.hits, experts.misses) == (2, 4)
    assert list(experts.slot_of) == [2, 1]


def test_misses_computed_on_the_host_leave_the_cache_alone(monkeypatch):
    """PHIMOE_OFFLOAD_MISS=host: a miss of a few rows is computed from host memory and not cached;
    more rows than HOST_ROWS are copied in as before."""
    monkeypatch.setenv("PHIMOE_OFFLOAD_MISS", "host")
    experts, dense = stored_experts()
    few, many = torch.randn(1, 8), torch.randn(HOST_ROWS + 1, 8)
    for e, x in ((0, few), (1, many), (1, few), (2, few), (0, many), (2, few)):
        got = experts.expert(e, x)
        want = expert_reference(dense, e, x)
        assert torch.allclose(got, want, atol=1e-6), e
    # 0 few: host; 1 many: copied; 1 few: hit; 2 few: host; 0 many: copied; 2 few: host
    assert (experts.hits, experts.misses, experts.host_computed) == (1, 5, 3)
    assert list(experts.slot_of) == [1, 0]


def test_an_unknown_offload_miss_mode_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("PHIMOE_OFFLOAD_MISS", "gpu")
    with pytest.raises(UsageError, match="PHIMOE_OFFLOAD_MISS"):
        OffloadedExperts(2, 4, 4, capacity=2, dtype=torch.float32, device="cpu")


def test_page_locked_stacks_are_separate_views_of_one_aligned_block():
    """What CUDA offload locks: one page-aligned block of whole pages (locking itself needs a GPU:
    here it fails quietly and says so with None)."""
    shapes = {"w1": (6, 8), "w3": (6, 8), "w2": (8, 6)}
    host, address = _page_locked_stacks(3, shapes, torch.bfloat16)
    assert address is None or address % 4096 == 0
    assert host["w1"].data_ptr() % 4096 == 0
    for i, (name, shape) in enumerate(shapes.items()):
        assert host[name].shape == (3, *shape) and host[name].dtype == torch.bfloat16
        host[name].fill_(i + 1)
    assert [int(host[n].float().mean()) for n in shapes] == [1, 2, 3]  # no two views overlap


def test_store_invalidates_a_cached_copy():
    experts = OffloadedExperts(2, 4, 4, capacity=2, dtype=torch.float32, device="cpu")
    for w in ("w1", "w2", "w3"):
        for e in range(2):
            experts.store(w, e, torch.ones(4, 4))
    x = torch.ones(1, 4)
    before = experts.expert(0, x)
    experts.store("w2", 0, torch.zeros(4, 4))
    assert torch.count_nonzero(experts.expert(0, x)) == 0 and torch.count_nonzero(before) > 0


def test_placement_plan(tmp_path):
    from checkpoints import published_config

    cfg = published_config()
    cfg["rope_scaling"].update(short_factor=[1.0] * 64, long_factor=[1.0] * 64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = PhimoeConfig.from_file(tmp_path)
    gib = 1 << 30
    big_ram = 256 * gib
    assert plan_placement(c, 2, gpu_memory=0, host_ram=big_ram)["device"] == "cpu"
    assert plan_placement(c, 2, gpu_memory=100 * gib)["offload"] == "none"  # 78 GiB of weights fit
    p = plan_placement(c, 2, gpu_memory=24 * gib, host_ram=big_ram)
    assert (p["device"], p["offload"]) == ("cuda", "experts") and 2 <= p["experts_per_layer_on_gpu"] < 16
    assert plan_placement(c, 2, "nf4", gpu_memory=40 * gib)["offload"] == "none"  # nf4 fits 40 GiB
    assert plan_placement(c, 2, gpu_memory=1 * gib, host_ram=big_ram)["device"] == "cpu"
    # what fits neither the GPU nor RAM stays memory-mapped from the files
    p = plan_placement(c, 2, gpu_memory=24 * gib, host_ram=32 * gib)
    assert (p["device"], p["offload"]) == ("cuda", "disk")
    p = plan_placement(c, 2, gpu_memory=0, host_ram=32 * gib)
    assert (p["device"], p["offload"]) == ("cpu", "disk")
    r = run_phimoe("info", tmp_path, "--plan", "--gpu-memory", "24GiB", "--json")
    assert json.loads(r.stdout)["plan"]["offload"] in ("experts", "disk")


def test_generate_with_offload(model_dir):
    a = run_phimoe("generate", "-m", model_dir, "--json", "-t", "0", "-n", "8", "Hi")
    b = run_phimoe("generate", "-m", model_dir, "--json", "-t", "0", "-n", "8", "--offload", "experts",
                   "--gpu-memory", "1MB", "-v", "Hi")
    assert a.returncode == 0 and b.returncode == 0, b.stderr.decode()
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    assert b"expert cache: 2 per layer" in b.stderr and b"hit rate" in b.stderr
    r = run_phimoe("generate", "-m", model_dir, "--offload", "experts", "-q", "int8", "Hi")
    assert r.returncode == 2 and r.stderr.decode().startswith("error:")


def test_disk_offload_keeps_experts_memory_mapped(model_dir):
    ref = load_model(model_dir)
    m = load_model(model_dir, offload="disk", gpu_memory=0)
    x = ids(20, seed=3)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max().item() < 1e-5
    assert m.mapped_files  # the checkpoint files stay open: their pages are the expert weights
    assert offload_stats(m)["memory_mapped"] is True
    # a dtype the files are not in cannot be mapped: copies are made instead, still correct
    bf16 = load_model(model_dir, dtype="bfloat16", offload="disk")
    assert not bf16.mapped_files


PEAK = """
import re, sys, torch
from phimoe_cli.model.loading import PhimoeForCausalLM, build_empty, load_config, load_model
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
cfg = load_config(sys.argv[1]); cfg.num_hidden_layers, cfg.vocab_size = 1, 8
build_empty(PhimoeForCausalLM, cfg, torch.float32, torch.device("cpu"))
base = status("VmRSS")
m = load_model(sys.argv[1], offload=sys.argv[2], gpu_memory=0)
print(status("VmHWM") - base)
"""


def test_disk_offload_does_not_read_the_experts_into_ram(tmp_path):
    import subprocess
    import sys

    from checkpoints import make_config, write_checkpoint

    cfg = make_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_local_experts=8, vocab_size=2048)
    path = write_checkpoint(tmp_path, cfg, shards=2)
    experts = 4 * 8 * 3 * 256 * 1024 * 4
    growth = {mode: int(subprocess.run([sys.executable, "-c", PEAK, str(path), mode], capture_output=True,
                                       text=True, check=True).stdout) for mode in ("experts", "disk")}
    assert growth["experts"] > 0.9 * experts  # RAM offload holds a copy of every expert
    assert growth["disk"] < 0.2 * experts, growth  # disk offload reads none of them while loading
