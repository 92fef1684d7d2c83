"""Loading: bad checkpoints fail with one clear line naming the file or tensor; memory stays low."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoints import make_config, random_state_dict, write_checkpoint

from phimoe_cli.model import CheckpointError, load_model

SMALL = dict(num_hidden_layers=1, vocab_size=512)


def small(path: Path, shards: int = 2, **changes) -> Path:
    return write_checkpoint(path, make_config(**SMALL), shards=shards)


def error_of(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_loads_single_file_and_shards(tmp_path):
    a = load_model(small(tmp_path / "one", shards=1))
    b = load_model(small(tmp_path / "three", shards=3))
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # same seed, same weights, whatever the sharding


def test_loaded_weights_are_the_files(tmp_path):
    cfg = make_config(**SMALL)
    sd = random_state_dict(cfg, seed=3)
    model = load_model(write_checkpoint(tmp_path, cfg, sd, shards=2))
    experts = model.model.layers[0].block_sparse_moe.experts
    assert torch.equal(experts.w2[3], sd["model.layers.0.block_sparse_moe.experts.3.w2.weight"])
    assert torch.equal(model.lm_head.bias, sd["lm_head.bias"])


def test_missing_directory(tmp_path):
    assert "no such model directory" in error_of(tmp_path / "nope")


def test_missing_config(tmp_path):
    path = small(tmp_path)
    (path / "config.json").unlink()
    assert "config.json" in error_of(path)


def test_invalid_config_json(tmp_path):
    path = small(tmp_path)
    (path / "config.json").write_text("{not json")
    assert "config.json" in error_of(path) and "JSON" in error_of(path)


def test_missing_shard(tmp_path):
    path = small(tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    msg = error_of(path)
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


def test_truncated_shard(tmp_path):
    path = small(tmp_path)
    shard = path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = error_of(path)
    assert "model-00001-of-00002.safetensors" in msg


def test_corrupt_header(tmp_path):
    path = small(tmp_path, shards=1)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage")
    assert "model.safetensors" in error_of(path)


def test_missing_tensor(tmp_path):
    cfg = make_config(**SMALL)
    sd = random_state_dict(cfg)
    del sd["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    msg = error_of(write_checkpoint(tmp_path, cfg, sd))
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in msg and "missing" in msg


def test_unexpected_tensor(tmp_path):
    cfg = make_config(**SMALL)
    sd = random_state_dict(cfg)
    sd["model.layers.0.mystery.weight"] = torch.zeros(3)
    assert "unexpected tensor model.layers.0.mystery.weight" in error_of(write_checkpoint(tmp_path, cfg, sd))


def test_wrong_shape(tmp_path):
    cfg = make_config(**SMALL)
    sd = random_state_dict(cfg)
    name = "model.layers.0.self_attn.k_proj.weight"
    sd[name] = sd[name].t().contiguous()
    msg = error_of(write_checkpoint(tmp_path, cfg, sd))
    assert name in msg and "shape" in msg


def test_config_contradicts_weights(tmp_path):
    path = small(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the files hold 96
    (path / "config.json").write_text(json.dumps(cfg))
    msg = error_of(path)
    assert "expected" in msg and "config.json" in msg and "experts" in msg


def test_index_lists_a_tensor_the_file_lacks(tmp_path):
    path = small(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model.layers.0.extra" in error_of(path)


def test_index_path_traversal_rejected(tmp_path):
    path = small(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "invalid file name" in error_of(path)


class _Boom:
    """Unpickling this would create a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_are_never_unpickled(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(make_config(**SMALL)))
    marker = tmp_path / "pwned"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    msg = error_of(path)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg
    assert not marker.exists()


def test_bad_dtype_and_device(tmp_path):
    path = small(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(path, device="cuda")


# VmHWM (not ru_maxrss, which a child inherits from its parent across exec) is this process's peak.
PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys, time
    import torch
    from phimoe_cli.model import load_model
    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024
    path, dtype = sys.argv[1], sys.argv[2]
    # warm up: torch's first model build costs ~75 MB once, whatever the model's size
    from phimoe_cli.model.loading import PhimoeForCausalLM, build_empty, load_config
    cfg = load_config(path)
    cfg.num_hidden_layers, cfg.vocab_size = 1, 8
    build_empty(PhimoeForCausalLM, cfg, torch.float32, torch.device("cpu"))
    base = status("VmRSS")
    t = time.perf_counter()
    model = load_model(path, dtype=dtype)
    load_s = time.perf_counter() - t
    peak = status("VmHWM")
    weights = sum(p.nbytes for p in model.parameters())
    print(base, peak, weights, load_s)
    """
)


def measure_load(path: Path, dtype: str):
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), dtype],
                         capture_output=True, text=True, check=True).stdout.split()
    base, peak, weights, load_s = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    return peak - base, weights, load_s


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~190 MB of float32 weights in 4 shards: big enough that a second copy would show."""
    cfg = make_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, num_local_experts=8)
    return write_checkpoint(tmp_path_factory.mktemp("big"), cfg, shards=4)


def test_peak_memory_of_loading_is_about_the_weights(big_checkpoint):
    growth, weights, _ = measure_load(big_checkpoint, "float32")
    assert weights > 150e6
    assert growth < 1.15 * weights, (growth, weights)  # a second full copy would be >= 2x


def test_loading_to_bfloat16_never_holds_the_float32_model(big_checkpoint):
    growth, weights, _ = measure_load(big_checkpoint, "bfloat16")
    # the float32 files are twice the bf16 weights; holding them would double the growth
    assert growth < 1.3 * weights, (growth, weights)
