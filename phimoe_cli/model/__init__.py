"""A self-contained PyTorch PhiMoE (Phi-3.5-MoE) model."""

from .cache import KVCache
from .config import ConfigError, PhimoeConfig
from .layers import sparsemixer
from .loading import CheckpointError, load_classifier, load_model
from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel

__all__ = [
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "PhimoeConfig",
    "PhimoeForCausalLM",
    "PhimoeForSequenceClassification",
    "PhimoeModel",
    "load_classifier",
    "load_model",
    "sparsemixer",
]
