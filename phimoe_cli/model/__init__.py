"""A self-contained PyTorch PhiMoE (Phi-3.5-MoE) model.

The names below are imported on first use (PEP 562), so that ``phimoe_cli.model.config`` and
``phimoe_cli.model.memory`` (config.json and size arithmetic: ``phimoe info``) load without torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "CheckpointError": "loading",
    "ConfigError": "config",
    "KVCache": "cache",
    "PhimoeConfig": "config",
    "PhimoeForCausalLM": "phimoe",
    "PhimoeForSequenceClassification": "phimoe",
    "PhimoeModel": "phimoe",
    "load_classifier": "loading",
    "load_model": "loading",
    "sparsemixer": "layers",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
