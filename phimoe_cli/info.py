"""What a model costs, from its config.json alone: parameters, memory per dtype or quantization,
KV-cache bytes per token, and whether it fits this machine."""

from __future__ import annotations

import os
import sys

from phimoe_cli.model.config import PhimoeConfig
from phimoe_cli.model.memory import available_ram, kv_bytes_per_token, memory_estimates, parameter_counts


def _no_gpu_here() -> bool:
    """Linux without NVIDIA's (or ROCm's, or WSL's) device nodes has no GPU torch could use: then
    ``phimoe info`` need not import torch (2-3 s) to find none."""
    return sys.platform == "linux" and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def gpu_memory() -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) per CUDA device; empty without CUDA."""
    if _no_gpu_here():
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append((torch.cuda.get_device_name(i), free, total))
        return out
    except Exception:
        return []


def report(c: PhimoeConfig, context: int = 4096) -> dict:
    """Everything ``phimoe info`` shows, as plain data (also its ``--json`` output)."""
    n = parameter_counts(c)
    mem = memory_estimates(c)
    kv = kv_bytes_per_token(c)
    ram, gpus = available_ram(), gpu_memory()
    fits = {}
    for name, weights in mem.items():
        need = weights + kv * context
        fits[name] = {
            "bytes": weights,
            "with_kv_cache_bytes": need,
            "fits_ram": None if ram is None else need <= ram,
            "fits_gpu": [need <= free for _, free, _ in gpus],
        }
    rope = c.rope_scaling
    return {
        "architecture": {
            "model_type": c.model_type,
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "attention_heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "experts": c.num_local_experts,
            "experts_per_token": c.num_experts_per_tok,
            "vocab_size": c.vocab_size,
            "context_length": c.max_position_embeddings,
            "rope": "longrope" if rope else "rope",
            "original_context_length": c.original_max_position_embeddings,
            "dtype": c.torch_dtype,
        },
        "parameters": {"total": n["total"], "active_per_token": n["active"], "experts": n["experts"]},
        "kv_cache_bytes_per_token": {"bfloat16": kv, "float32": kv * 2},
        "context_for_estimates": context,
        "memory": fits,
        "machine": {
            "ram_available_bytes": ram,
            "gpus": [{"name": name, "free_bytes": free, "total_bytes": total} for name, free, total in gpus],
        },
        "note": ("On CPU every quantized choice decodes faster than bfloat16 (fewer bytes to read): "
                 "bfloat16 when it fits (exact), else int8, else nf4; --quantize-attention --quantize-head save more."),
    }
