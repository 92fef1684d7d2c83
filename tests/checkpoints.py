"""Fixture factory: small random PhiMoE checkpoints in the exact layout of the hub repository.

config.json in the hub's format (``rope_scaling`` with ``"type": "longrope"``, top-level
``rope_theta``, the published scalars), ``model-0000X-of-0000N.safetensors`` shards with
per-expert tensors named as published plus ``model.safetensors.index.json``, and
``generation_config.json``. When ``../shared/reference`` exists its published facts are used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def published_config() -> dict:
    """The published config.json's scalars (from shared/reference when present)."""
    partial = REFERENCE / "config.partial.json"
    if partial.exists():
        cfg = json.loads(partial.read_text())
        rope = cfg["rope_scaling"]
        rope.pop("long_factor_first_36_of_64", None)
        rope.pop("short_factor_first_8_of_64", None)
        return cfg
    return {
        "architectures": ["PhiMoEForCausalLM"],
        "attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096, "initializer_range": 0.02,
        "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
        "max_position_embeddings": 131072, "model_type": "phimoe", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 16, "original_max_position_embeddings": 4096,
        "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096,
                         "short_mscale": 1.243163121016122, "type": "longrope"},
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01,
        "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32064,
    }


def generation_config() -> dict:
    path = REFERENCE / "generation_config.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [32000, 32001, 32007],
            "transformers_version": "4.43.3", "pad_token_id": 32000}


TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=32064,
    max_position_embeddings=1024, original_max_position_embeddings=64, sliding_window=1024,
)


def make_config(seed: int = 0, **overrides) -> dict:
    """A hub-format config.json dict for a small model (TINY unless overridden)."""
    cfg = published_config()
    cfg.update(TINY)
    cfg.update(overrides)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed + 1000)
    half = head_dim // 2
    # shaped like the published factors: short near 1, long growing to ~40 on low frequencies
    short = (1.0 + 0.05 * torch.rand(half, generator=g)).tolist()
    long = (1.0 + torch.linspace(0, 40, half) * (0.5 + torch.rand(half, generator=g))).tolist()
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(
        type="longrope", short_factor=short, long_factor=long,
        original_max_position_embeddings=cfg["original_max_position_embeddings"],
        short_mscale=1.1, long_mscale=1.243163121016122,
    )
    cfg["rope_scaling"] = rope
    for key, value in overrides.items():
        if key == "rope_scaling":
            cfg["rope_scaling"] = value
    return cfg


def random_state_dict(cfg: dict, seed: int = 0, classifier_labels: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published tensor names (per-expert w1/w2/w3)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh

    def w(*shape, scale=None):
        fan_in = shape[-1]
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(fan_in))

    def norm(prefix: str, sd: dict):
        sd[f"{prefix}.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(h, generator=g)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(v, h, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", nh * d), ("k_proj", kvh * d), ("v_proj", kvh * d), ("o_proj", h)):
            sd[f"{p}.self_attn.{name}.weight"] = w(rows, h if name != "o_proj" else nh * d)
            sd[f"{p}.self_attn.{name}.bias"] = 0.1 * torch.randn(rows, generator=g)
        sd[f"{p}.block_sparse_moe.gate.weight"] = w(cfg["num_local_experts"], h)
        for e in range(cfg["num_local_experts"]):
            sd[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = w(f, h)
            sd[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = w(f, h)
            sd[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = w(h, f)
        norm(f"{p}.input_layernorm", sd)
        norm(f"{p}.post_attention_layernorm", sd)
    norm("model.norm", sd)
    if classifier_labels:
        sd["score.weight"] = w(classifier_labels, h)
    else:
        sd["lm_head.weight"] = w(v, h)
        if cfg.get("lm_head_bias", True):
            sd["lm_head.bias"] = 0.1 * torch.randn(v, generator=g)
    return sd


def write_checkpoint(
    path: str | Path,
    cfg: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    shards: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Write a checkpoint directory in the hub's layout; returns its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = cfg if cfg is not None else make_config(seed)
    cfg = dict(cfg, torch_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                 torch.float16: "float16"}[dtype])
    sd = state_dict if state_dict is not None else random_state_dict(cfg, seed)
    sd = {k: t.to(dtype).contiguous() for k, t in sd.items()}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps(generation_config(), indent=2))
    names = list(sd)
    if shards <= 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.nbytes for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path
