"""PhimoeConfig: the model's shape, read from a checkpoint's config.json and validated.

Two formats are accepted: the hub's (``rope_scaling`` with ``"type": "longrope"`` and a top-level
``rope_theta``), as published for microsoft/Phi-3.5-MoE-instruct, and transformers 5's saved format
(``rope_parameters`` with ``rope_type`` and ``rope_theta`` inside). Keys that are absent take the
published model's values (note ``rope_theta`` 10000, not transformers' 1e6).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from phimoe_cli.errors import PhimoeError, UsageError

#: The compute dtypes by name, with the short names people type.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: str) -> str:
    """``dtype`` as one of DTYPE_NAMES or "auto" (aliases resolved); a UsageError otherwise.
    Torch-free, so that the command line can refuse a bad --dtype before torch loads."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name != "auto" and name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}: choose auto, bfloat16, float16 or float32")
    return name


class ConfigError(PhimoeError, ValueError):
    """A config.json that cannot describe a PhiMoE model; the message is one line naming the field."""


@dataclass
class RopeScaling:
    """LongRoPE parameters. ``None`` on the config means plain RoPE."""

    short_factor: list[float]
    long_factor: list[float]
    short_mscale: float
    long_mscale: float
    original_max_position_embeddings: int


@dataclass
class PhimoeConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = 131072
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    attention_bias: bool = True
    lm_head_bias: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = None
    num_labels: int = 2
    model_type: str = "phimoe"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_file(cls, path: str | Path) -> PhimoeConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> PhimoeConfig:
        data = dict(data)
        model_type = data.get("model_type", "phimoe")
        if str(model_type).lower() != "phimoe":
            raise ConfigError(f"model_type is {model_type!r}, expected 'phimoe'")
        known = {f.name for f in fields(cls)} - {"rope_scaling", "extra"}
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]
        if data.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        if "id2label" in data and "num_labels" not in data:
            kwargs["num_labels"] = len(data["id2label"])

        rope = data.get("rope_scaling")
        if rope is None and isinstance(data.get("rope_parameters"), dict):
            rope = data["rope_parameters"]  # transformers 5's saved format
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        kwargs["rope_scaling"] = _parse_rope(rope, data)
        if kwargs["rope_scaling"] is not None:
            kwargs["original_max_position_embeddings"] = (
                kwargs["rope_scaling"].original_max_position_embeddings
            )
        for name in ("rope_theta", "rms_norm_eps", "router_jitter_noise"):
            if name in kwargs:
                kwargs[name] = _number(name, kwargs[name])
        for name in _INT_FIELDS:
            if name in kwargs:
                kwargs[name] = _integer(name, kwargs[name])
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not head_dim ({self.head_dim}) x "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.router_jitter_noise < 0:
            raise ConfigError(f"router_jitter_noise must be >= 0, got {self.router_jitter_noise}")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of bfloat16, float16, float32")
        if self.rope_scaling is not None:
            self._validate_rope()

    def _validate_rope(self) -> None:
        rope, half = self.rope_scaling, self.head_dim // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(rope, name)
            if len(factors) != half:
                raise ConfigError(f"rope_scaling.{name} has {len(factors)} entries, expected head_dim/2 = {half}")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in factors):
                raise ConfigError(f"rope_scaling.{name} must hold positive finite numbers")
        if rope.original_max_position_embeddings > self.max_position_embeddings:
            raise ConfigError("rope_scaling.original_max_position_embeddings exceeds max_position_embeddings")

    # ------------------------------------------------------------------ helpers
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        """The hub's config.json format (what ``from_dict`` reads back)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        out["architectures"] = ["PhiMoEForCausalLM"]
        if self.rope_scaling is not None:
            r = self.rope_scaling
            out["rope_scaling"] = {
                "type": "longrope",
                "short_factor": list(r.short_factor),
                "long_factor": list(r.long_factor),
                "short_mscale": r.short_mscale,
                "long_mscale": r.long_mscale,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            }
        else:
            out["rope_scaling"] = None
        return out


_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
    "sliding_window",
)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _parse_rope(rope, data: dict) -> RopeScaling | None:
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_scaling must be an object, got {type(rope).__name__}")
    kind = rope.get("type", rope.get("rope_type"))
    if kind in (None, "default") and "long_factor" not in rope:
        return None
    if kind not in ("longrope", "su"):
        raise ConfigError(f"rope_scaling.type {kind!r} is not supported (expected 'longrope')")
    for name in ("short_factor", "long_factor"):
        if not isinstance(rope.get(name), list):
            raise ConfigError(f"rope_scaling.{name} is missing or not a list")
    original = rope.get(
        "original_max_position_embeddings", data.get("original_max_position_embeddings", 4096)
    )
    max_pos = data.get("max_position_embeddings", 131072)
    default_mscale = _default_mscale(max_pos, original) if isinstance(original, int) else 1.0
    short_mscale = rope.get("short_mscale", rope.get("attention_factor", default_mscale))
    long_mscale = rope.get("long_mscale", rope.get("attention_factor", default_mscale))
    return RopeScaling(
        short_factor=[float(x) if isinstance(x, (int, float)) else x for x in rope["short_factor"]],
        long_factor=[float(x) if isinstance(x, (int, float)) else x for x in rope["long_factor"]],
        short_mscale=_number("rope_scaling.short_mscale", short_mscale),
        long_mscale=_number("rope_scaling.long_mscale", long_mscale),
        original_max_position_embeddings=_integer(
            "rope_scaling.original_max_position_embeddings", original
        ),
    )


def _default_mscale(max_pos: int, original: int) -> float:
    """LongRoPE's attention factor when the config gives none (as Phi-3 computes it)."""
    factor = max_pos / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))
