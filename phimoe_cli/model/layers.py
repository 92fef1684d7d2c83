"""The PhiMoE building blocks: LongRoPE, attention, the sparsemixer router and the experts.

Every formula here follows the reference (microsoft/Phi-3.5-MoE-instruct's modeling code, as ported
to transformers) in eval mode, operation for operation, so that logits agree to float rounding.
Products go through ``kernels.prefill_linear`` (the compute dtype the CPU multiplies fastest);
the fast one-token paths live in decode.py, outside the model.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import PhimoeConfig
from .kernels import prefill_linear, sdpa_dtype

# torch >= 2.5 lets SDPA share K/V heads across query heads without copying them.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


# ----------------------------------------------------------------------------------------- RoPE
class LongRoPE(nn.Module):
    """Rotary embedding with LongRoPE scaling.

    ``inv_freq_i = 1 / (factor_i * theta^(2i/d))``: the short factors while the whole sequence fits
    in ``original_max_position_embeddings``, the long factors for *every* position once it does not.
    cos and sin are scaled by the matching mscale. Without ``rope_scaling`` it is plain RoPE.
    """

    def __init__(self, config: PhimoeConfig):
        super().__init__()
        dim = config.head_dim
        # the tables are computed on the CPU even when the model is built on the meta device:
        # arithmetic on meta tensors imports torch._dynamo (2+ s of every start)
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        rope = config.rope_scaling
        if rope is None:
            short = long = torch.ones(dim // 2, device="cpu")
            self.short_mscale = self.long_mscale = 1.0
            self.original_max_position_embeddings = config.max_position_embeddings
        else:
            short = torch.tensor(rope.short_factor, dtype=torch.float32, device="cpu")
            long = torch.tensor(rope.long_factor, dtype=torch.float32, device="cpu")
            self.short_mscale, self.long_mscale = rope.short_mscale, rope.long_mscale
            self.original_max_position_embeddings = rope.original_max_position_embeddings
        self.register_buffer("short_inv_freq", 1.0 / (short * config.rope_theta**exponent), persistent=False)
        self.register_buffer("long_inv_freq", 1.0 / (long * config.rope_theta**exponent), persistent=False)

    def is_long(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` tokens in total is rotated with the long factors."""
        return seq_len > self.original_max_position_embeddings

    def forward(self, position_ids: torch.Tensor, long: bool, dtype: torch.dtype):
        inv_freq = self.long_inv_freq if long else self.short_inv_freq
        mscale = self.long_mscale if long else self.short_mscale
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Linear(nn.Linear):
    """``nn.Linear`` computed in the prefill dtype (kernels.prefill_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prefill_linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Grouped-query attention with q/k/v/o biases, LongRoPE, torch SDPA and a KV cache."""

    def __init__(self, config: PhimoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None, start: int = 0):
        """x: [batch, seq, hidden]. ``mask``: None (causal, or everything for one query) or a
        boolean [batch, 1, seq, keys] where True means "may attend"."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)
        out = attend(q, k, v, mask, is_causal=mask is None and s > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

def attend(q, k, v, mask=None, is_causal: bool = False):
    """SDPA with K/V heads shared by groups of query heads."""
    dtype = sdpa_dtype(q.dtype, q.device)
    if dtype != q.dtype:  # (a PyTorch bug on some CPUs: kernels.sdpa_dtype)
        return attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, is_causal).to(q.dtype)
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]  # torch < 2.5
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


# ------------------------------------------------------------------------------- mixture of experts
def sparsemixer(scores: torch.Tensor, jitter_eps: float, top_k: int = 2):
    """The reference's sparsemixer routing in eval mode.

    For each pick: the expert with the highest remaining score is chosen; every expert whose
    relative gap ``(best - s) / max(|s|, best)`` to that score exceeds ``2 * jitter_eps`` is masked;
    the weight is the softmax probability of the chosen expert among the unmasked ones. Experts
    already chosen are masked before the next pick; gaps are always measured on the original
    scores. The weights are *not* renormalised. The reference defines two picks; ``top_k`` > 2
    repeats the second step.

    scores: [tokens, experts] -> (weights [tokens, top_k], experts [tokens, top_k])
    """
    weights, chosen = [], []
    remaining = scores
    for _ in range(top_k):
        best, idx = remaining.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=best)
        too_far = ((best - scores) / factor) > (2 * jitter_eps)
        probs = torch.softmax(remaining.masked_fill(too_far, float("-inf")), dim=-1)
        weights.append(probs.gather(-1, idx))
        chosen.append(idx)
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


class ExpertGroup(nn.Module):
    """What every way of storing the experts shares: given each token's chosen experts and their
    weights, run ``expert(e, x)`` once per expert on its tokens. Subclasses store the weights
    (here as float stacks, in quant.py quantized, in offload.py in host memory)."""

    num_experts: int

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden]; weights, chosen: [tokens, top_k]. Tokens are grouped by expert so
        each expert's weights are read once per call."""
        if x.shape[0] == 1:
            return self.one_token(x, weights, chosen)
        top_k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // top_k
        flat_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start : start + n]
            y = self.expert(e, x[rows]) * flat_weights[start : start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out

    def one_token(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Decoding: only the chosen experts' weights are read (views into the stacks, no gather
        copy, no sort). Summed in expert order, as the grouped path does."""
        return combine_chosen(self.expert, x, weights, chosen)


class Experts(ExpertGroup):
    """``num_local_experts`` SwiGLU feed-forward networks, stacked: w1 (gate) and w3 (up) are
    [experts, ffn, hidden], w2 (down) is [experts, hidden, ffn]."""

    def __init__(self, config: PhimoeConfig):
        super().__init__()
        e, h, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.w1 = nn.Parameter(torch.empty(e, f, h))
        self.w3 = nn.Parameter(torch.empty(e, f, h))
        self.w2 = nn.Parameter(torch.empty(e, h, f))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return prefill_linear(F.silu(prefill_linear(x, self.w1[e])) * prefill_linear(x, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and self.w1.dtype == torch.bfloat16 and _GROUPED_ON_CUDA[0]:
            try:
                return self.grouped(x, weights, chosen)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # a GPU this torch has no grouped kernel for: per expert from now on
                _GROUPED_ON_CUDA[0] = False
                warnings.warn(f"grouped expert products unavailable ({exc}); computing them expert by expert",
                              stacklevel=2)
        return super().forward(x, weights, chosen)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The same sums with the routing left on the device (CUDA): the tokens sorted by expert,
        each stack one grouped product whose groups' sizes are a device tensor, so only the chosen
        experts' weights are read and nothing is read back to the host. A token's products are
        added in expert order (exactly so for two, the published top-k)."""
        top_k = chosen.shape[-1]
        ids, order = chosen.reshape(-1).sort(stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        offs = counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        token_of = order // top_k
        rows = x[token_of]
        h = F.silu(grouped_mm(rows, self.w1, ids, offs)) * grouped_mm(rows, self.w3, ids, offs)
        y = grouped_mm(h, self.w2, ids, offs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))


_GROUPED_ON_CUDA = [hasattr(torch, "_grouped_mm")]  # torch >= 2.8, until a GPU turns it down


def grouped_mm(rows: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows [n, in] times the stacked w [experts, out, in] of expert ids[r] for row r (ids sorted;
    offs: the cumulative row count per expert, on the device)."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(rows, w.transpose(-2, -1), offs=offs)
    return torch.bmm(rows[:, None], w[ids].transpose(-2, -1))[:, 0]  # torch < 2.8: copies each row's expert


def combine_chosen(expert, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """One token [1, hidden]: ``expert(e, x)`` for each chosen expert, weighted, rounded to x's dtype
    and summed in expert order (the order in which the grouped path adds them)."""
    out = None
    for k, e in sorted(enumerate(chosen[0].tolist()), key=lambda ke: ke[1]):
        y = (expert(e, x) * weights[:, k, None]).to(x.dtype)
        out = y if out is None else out + y
    return out


class SparseMoE(nn.Module):
    """Router (``gate``) + experts. Named as in the checkpoint: ``block_sparse_moe``."""

    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.jitter_eps = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config)

    def route(self, x: torch.Tensor):
        return sparsemixer(self.gate(x), self.jitter_eps, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        return self.experts(x, weights, chosen).reshape(shape)


# ---------------------------------------------------------------------------------- decoder layer
class DecoderLayer(nn.Module):
    def __init__(self, config: PhimoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(config)

    def forward(self, x, cos, sin, mask, cache=None, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))
