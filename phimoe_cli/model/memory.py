"""What a model costs in bytes, from its config alone: parameters by part, weight memory per
storage choice, KV cache per token, what one decode step reads. One home for this arithmetic:
``phimoe info``, ``--device auto`` planning, expert offload and ``phimoe bench`` all use it."""

from __future__ import annotations

import os

from .config import PhimoeConfig

BLOCKSIZE = 64  # weights per absmax of the 4-bit formats
#: Stored bytes per weight, scales included (int8's one float32 per row is ~0.1%: left out here,
#: counted by weight_bytes).
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / BLOCKSIZE, "fp4": 0.5 + 4 / BLOCKSIZE}
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, **QUANT_BYTES}


def parameter_counts(c: PhimoeConfig) -> dict[str, int]:
    """Parameters by part; ``active`` is what one token reads (top-k experts, not all)."""
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    bias = c.attention_bias
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if bias else 0)
    norms = 2 * 2 * h
    router = h * c.num_local_experts
    expert = 3 * h * c.intermediate_size
    layers = c.num_hidden_layers
    embed = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    head += c.vocab_size if c.lm_head_bias else 0
    dense = layers * (attention + norms + router) + embed + head + 2 * h
    experts_total = layers * c.num_local_experts * expert
    experts_active = layers * c.num_experts_per_tok * expert
    return {
        "total": dense + experts_total,
        "active": dense + experts_active,
        "experts": experts_total,
        "dense": dense,
        "attention": layers * attention,
        "embedding": embed,
        "lm_head": head,
    }


def kv_bytes_per_token(c: PhimoeConfig, dtype_bytes: int = 2) -> int:
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes


def quantized_matrix_bytes(rows: int, cols: int, fmt: str) -> float:
    """One [rows, cols] matrix stored in ``fmt``: int8 a byte a weight and a float32 scale a row,
    4-bit half a byte a weight and a float32 absmax per 64."""
    return rows * cols + 4 * rows if fmt == "int8" else rows * cols * QUANT_BYTES[fmt]


def weight_bytes(c: PhimoeConfig, dtype_bytes: float, quantize: str = "none", quantize_attention: bool = False,
                 quantize_head: bool = False) -> int:
    """Every weight: the experts in ``quantize``'s format (or the dtype), the attention's projections
    too with ``quantize_attention``, the output head as row-wise int8 with ``quantize_head``; the
    rest in the dtype. The scales count: int8 a float32 a row, 4-bit a float32 absmax per 64."""
    n = parameter_counts(c)
    if quantize == "none":
        return int(n["total"] * dtype_bytes)
    h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    layers = c.num_hidden_layers
    stored = quantized_matrix_bytes
    expert = 2 * stored(f, h, quantize) + stored(h, f, quantize)
    total = n["dense"] * dtype_bytes + layers * c.num_local_experts * expert
    if quantize_attention:
        projections = [(q, h), (kv, h), (kv, h), (h, q)]
        total += layers * sum(stored(r, k, quantize) - r * k * dtype_bytes for r, k in projections)
    if quantize_head and not c.tie_word_embeddings:
        total += stored(c.vocab_size, h, "int8") - c.vocab_size * h * dtype_bytes
    return int(total)


#: The quantized choices ``phimoe info`` lists: -q alone, and with --quantize-attention --quantize-head.
QUANTIZED_CHOICES = {
    **{name: (name, False, False) for name in QUANT_BYTES},
    **{f"{name} + attention + head": (name, True, True) for name in ("int8", "nf4")},
}


def memory_estimates(c: PhimoeConfig, compute_dtype_bytes: int = 2) -> dict[str, int]:
    """Weight bytes for each choice: dtypes store everything so; quantizations store the experts
    quantized (and the attention and head, in the choices that say so) and the rest (router, norms,
    embeddings) in the compute dtype."""
    out = {name: weight_bytes(c, BYTES_PER_WEIGHT[name]) for name in ("float32", "bfloat16", "float16")}
    out.update({name: weight_bytes(c, compute_dtype_bytes, *how) for name, how in QUANTIZED_CHOICES.items()})
    return out


def expert_bytes(c: PhimoeConfig, dtype_bytes: int) -> int:
    """One expert's three matrices."""
    return 3 * c.hidden_size * c.intermediate_size * dtype_bytes


def active_bytes(c: PhimoeConfig, dtype_bytes: int, context: float, quantize: str = "none",
                 quantize_attention: bool = False, quantize_head: bool = False) -> int:
    """Bytes one decode step must read: every dense weight, top_k of the experts, one embedding
    row, and the KV cache of ``context`` tokens (an int8 head: a byte a weight, a float32 scale a row)."""
    h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    projections = h * (q + 2 * kv) + q * h
    attention = (q + 2 * kv + h) * c.attention_bias + (0 if quantize_attention else projections)
    norms = 2 * 2 * h
    router = c.num_local_experts * h
    experts = c.num_experts_per_tok * 3 * h * f
    kv_cache = 2 * kv * context
    per_layer = attention + norms + router + kv_cache
    head = (0 if quantize_head else c.vocab_size * h) + c.vocab_size * c.lm_head_bias
    head += 2 * h + h  # the final norm, one embedding row
    quantized = experts + (projections if quantize_attention else 0)
    return int((c.num_hidden_layers * per_layer + head) * dtype_bytes
               + c.num_hidden_layers * quantized * QUANT_BYTES.get(quantize, dtype_bytes)
               + (quantized_matrix_bytes(c.vocab_size, h, "int8") if quantize_head else 0))


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
