"""`phimoe bench`: the command runs and its JSON has the documented schema (never timed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from phimoe_cli import bench

RESULT_KEYS = {
    "engine", "prefill_tok_s", "decode_tok_s", "ms_per_token", "peak_memory_bytes", "roofline_pct",
    "warmup_s", "decode_kernel", "prefill_s", "decode_s", "read_bytes_s",
}


def test_bench_tiny_json_schema():
    cmd = [sys.executable, "-m", "phimoe_cli.cli", "bench", "--shape", "tiny", "-p", "8", "-n", "4", "--json",
           "--repeat", "1", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # one JSON object, nothing else on stdout
    assert out["shape"] == "tiny" and out["dtype"] == "bfloat16" and out["device"] == "cpu"
    assert (out["prompt_tokens"], out["gen_tokens"], out["repeat"], out["threads"]) == (8, 4, 1, 1)
    assert out["config"]["num_hidden_layers"] == 2
    for key in ("bandwidth_bytes_s", "active_bytes_per_token", "roofline_tok_s", "weight_bytes"):
        assert out[key] > 0
    [ours] = out["results"]
    assert set(ours) == RESULT_KEYS and ours["engine"] == "phimoe"
    assert ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0 and ours["peak_memory_bytes"] > 0
    assert len(ours["prefill_s"]) == len(ours["decode_s"]) == len(ours["read_bytes_s"]) == 1
    # the roofline is judged per timed run, against the bandwidth read just before that run
    [decode_s], [read] = ours["decode_s"], ours["read_bytes_s"]
    assert out["bandwidth_bytes_s"] == read
    want = 100 * 4 / decode_s * out["active_bytes_per_token"] / read
    assert ours["roofline_pct"] == pytest.approx(want, rel=1e-9)
    assert "ratios" not in out


def test_bench_rejects_unknown_shape():
    cmd = [sys.executable, "-m", "phimoe_cli.cli", "bench", "--shape", "huge", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown shape" in r.stderr and r.stdout == ""


def test_active_bytes_counts_two_of_sixteen_experts():
    import torch

    from phimoe_cli.model import PhimoeForCausalLM, memory

    cfg = bench.shape_config("phi-3.5-moe")
    active = memory.active_bytes(cfg, 2, context=0)
    total = memory.weight_bytes(cfg, 2)
    assert 6.4e9 * 2 < active < 6.8e9 * 2  # 6.6B active parameters, 2 bytes each
    assert 41e9 * 2 < total < 42.5e9 * 2
    with torch.device("meta"):  # the arithmetic counts what the model really holds
        real = sum(p.numel() for p in PhimoeForCausalLM(cfg).parameters())
    assert memory.parameter_counts(cfg)["total"] == real


def test_an_int8_head_is_counted_as_a_byte_a_weight_and_a_scale_a_row():
    from phimoe_cli.model import memory

    cfg = bench.shape_config("mid")
    bf16_head = memory.active_bytes(cfg, 2, context=10, quantize="nf4", quantize_attention=True)
    int8_head = memory.active_bytes(cfg, 2, context=10, quantize="nf4", quantize_attention=True, quantize_head=True)
    v, h = cfg.vocab_size, cfg.hidden_size
    assert bf16_head - int8_head == 2 * v * h - (v * h + 4 * v)


def test_compare_transformers_runs_the_same_weights():
    pytest.importorskip("transformers")
    out = bench.run(shape="tiny", prompt_tokens=6, gen_tokens=2, dtype="float32", repeat=1, compare="transformers")
    assert [r["engine"] for r in out["results"]] == ["phimoe", "transformers"]
    assert out["max_abs_logit_diff"] < 1e-3  # the weight mapping is right
    assert out["ratios"]["prefill"] > 0 and out["ratios"]["decode"] > 0


def test_bench_with_offloaded_experts_reports_the_cache():
    cmd = [sys.executable, "-m", "phimoe_cli.cli", "bench", "--shape", "tiny", "-p", "8", "-n", "4", "--json",
           "--repeat", "1", "--threads", "1", "--offload", "experts", "--gpu-memory", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cache = out["expert_cache"]
    assert out["offload"] == "experts" and cache["capacity_per_layer"] == 2  # the top-2 at least
    # 2 runs (warm-up and timed) of 8 prompt tokens and 4 steps, 2 layers, top-2 of 4 experts each
    assert 0 < cache["hits"] + cache["misses"] <= 2 * 2 * (4 + 4 * 2) and cache["misses"] >= 2 * 2
    bad = subprocess.run([*cmd[:-4], "--offload", "disk"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "none or experts" in bad.stderr


def test_a_shape_too_big_for_the_memory_is_one_line_naming_the_dtype():
    cmd = [sys.executable, "-m", "phimoe_cli.cli", "bench", "--shape", "phi-3.5-moe", "--layers", "1024", "-p", "4",
           "-n", "1", "--repeat", "1"]  # ~5 TB of bf16 weights
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "of weights in bfloat16" in r.stderr and "use --layers N" in r.stderr
