"""8- and 4-bit experts (bitsandbytes formats), quantized while loading.

94% of Phi-3.5-MoE's weights are experts, so only they are quantized (``--quantize-attention``
also does q/k/v/o, ``--quantize-head`` stores the output head as int8 whatever the experts' format,
as llama.cpp keeps its head at 6-8 bits); the router, norms and embeddings stay in the compute dtype.

* ``int8``: bitsandbytes' row-wise absmax int8 (``int8_vectorwise_quant``, LLM.int8 without
  outlier columns): ``w ≈ q * absmax_row / 127``.
* ``nf4`` / ``fp4``: bitsandbytes' 4-bit formats, two weights a byte (weight 2j in the high
  nibble of byte j, 2j + 1 in the low one) plus one float32 absmax per 64-weight block. A code
  stands for ``CODEBOOK[code] / 127 * absmax``: bitsandbytes' NF4 / FP4 value rounded to a
  multiple of 1/127 (within 0.4% of the block's absmax; the 4-bit steps are ~25 times larger), so
  that the C kernels multiply the codes as int8.

Compute: quantized layers of a bfloat16 model decode in the C step (native.py), which reads the
int8 or 4-bit weights directly and multiplies them as integers by the activations quantized to
int16 in blocks of 64 (within 1/65278 of each block's largest value). Elsewhere int8 on CPU uses
torch's weight-only int8 kernel (``_weight_int8pack_mm``); 4-bit weights, and int8 elsewhere, are
dequantized per expert and multiplied in the compute dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from phimoe_cli.errors import UsageError

from . import native
from .kernels import blocked_linear, prefill_dtype, prefill_linear
from .layers import ExpertGroup

QUANT_TYPES = ("int8", "nf4", "fp4")
HEAD_FORMAT = "int8"  # --quantize-head: 4 bits would cost the next-token distribution itself
BLOCKSIZE = 64
#: Where bfloat16 is multiplied natively (without AMX), prompt rows up to this many an expert are
#: multiplied as integers (native.qmatmul); more go to the bfloat16 GEMM of widened weight blocks
INTEGER_ROWS = 128
#: The 4-bit code values as int8: round(127 * bitsandbytes' get_4bit_type(...)) (tests check it).
CODEBOOK = {
    "nf4": (-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127),
    "fp4": (0, 1, 85, 127, 42, 64, 21, 32, 0, -1, -85, -127, -42, -64, -21, -32),
}


def _bnb():
    import logging

    # bitsandbytes logs a warning on CPUs with AVX512-BF16 when the optional `kernels` package
    # (which would download code from a hub) is absent; we never want that code path anyway
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ValueError(f"quantization needs bitsandbytes ({exc})") from None
    return bnbf


class QuantizedMatrices(nn.Module):
    """``n`` matrices of shape [out, in], stored quantized; ``linear(i, x)`` = x @ W_i^T."""

    def __init__(self, n: int, out_features: int, in_features: int, quant_type: str,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise UsageError(f"unknown quantization {quant_type!r}: choose none, {', '.join(QUANT_TYPES)}")
        if quant_type != "int8" and (out_features * in_features) % BLOCKSIZE:
            raise ValueError(f"{quant_type} needs matrices whose size is a multiple of {BLOCKSIZE}")
        self.quant_type, self.dtype = quant_type, dtype
        self.shape = (out_features, in_features)
        size = out_features * in_features
        if quant_type == "int8":
            self.register_buffer("qweight", torch.zeros(n, out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.zeros(n, out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(n, size // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.zeros(n, size // BLOCKSIZE, dtype=torch.float32, device=device))
            self.lut = codebook(quant_type)  # the codes as int8, as the C step reads them

    def store(self, i: int, weight: torch.Tensor) -> None:
        """Quantize one [out, in] matrix into slot ``i`` (the float matrix is not kept)."""
        bnbf = _bnb()
        w = weight.to(device=self.qweight.device)
        if self.quant_type == "int8":
            q, absmax, _ = bnbf.int8_vectorwise_quant(w.float())
            self.qweight[i].copy_(q)
            self.scale[i].copy_(absmax.float() / 127.0)
        else:
            q, state = bnbf.quantize_4bit(w.to(self.dtype).contiguous(), blocksize=BLOCKSIZE,
                                          quant_type=self.quant_type, compress_statistics=False)
            self.qweight[i].copy_(q.reshape(-1))
            self.scale[i].copy_(state.absmax.float())

    def dequantize(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.quant_type == "int8":
            return (self.qweight[i].to(dtype) * self.scale[i, :, None].to(dtype))
        out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device).view(-1, BLOCKSIZE)
        packed, absmax = self.qweight[i].view(-1, BLOCKSIZE // 2), self.scale[i]
        table = _byte_values(self.quant_type, self.qweight.device)
        step = 1 << 14  # blocks at a time: the byte indices are int64
        for b in range(0, packed.shape[0], step):
            values = table[packed[b : b + step].long()].view(-1, BLOCKSIZE)  # float32
            out[b : b + step] = values * absmax[b : b + step, None]
        return out.view(self.shape)

    def linear(self, i: int, x: torch.Tensor) -> torch.Tensor:
        lib = native.library() if self.qweight.device.type == "cpu" and x.dtype != torch.float64 else None
        compute, rows = prefill_dtype(x.dtype), x.numel() // x.shape[-1]
        if (lib is not None and x.dtype == compute == torch.bfloat16 and rows <= native.AMX_MAX_ROWS_QUANTIZED
                and not (self.quant_type == "int8" and rows <= 4)):
            # AMX tiles on weights widened in L1 (None without AMX). Measured (benchmarks/quant_matmul.py,
            # a 6400x4096 expert, 2 threads): 8 rows 3.3 ms (int8) / 3.0 ms (nf4), against 4.9 ms for
            # torch's int8 kernel, 7.5 ms for the integer kernel and 10 ms for the blocked path;
            # torch's int8 kernel is faster up to 4 rows (1.4 ms at 1), which read 2x fewer bytes
            y = native.amx_matmul(lib, x, self, i)
            if y is not None:
                return y
        readable = lib is not None and native.matrix(self) is not None  # by the C kernels
        if readable and x.dtype == torch.bfloat16 and rows <= 2:
            # one or two rows (an expert's share of a short prompt, an eager decode step): the decode
            # step's kernel a row at a time, which reads the stored codes straight; the integer kernel
            # below widens each weight row first. A 6400x4096 expert, one row: 0.30 ms against 0.60
            # (nf4), 0.47 against 0.86 for torch's int8 kernel (AVX2 build, Zen 5, 2 threads)
            flat = x.reshape(rows, x.shape[-1])
            y = torch.stack([native.qlinear(lib, flat[r], self, i) for r in range(rows)])
            return y.reshape(*x.shape[:-1], self.shape[0])
        # torch's int8 kernel where the C kernels do not take the rows (no compiler, float16 rows, a
        # layout they cannot read): at 4 / 8 rows of a 6400x4096 expert the integer kernel below took
        # 1.3 / 2.0 ms against 1.6 / 3.2 (AVX2), 1.1 / 1.5 against 1.0 / 1.7 (AVX-512;
        # benchmarks/quant_matmul.py, Zen 5, 2 threads)
        if self.quant_type == "int8" and _int8_kernel_applies(x) and not (readable and x.dtype == torch.bfloat16):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight[i], self.scale[i].to(x.dtype))
            return y.reshape(*x.shape[:-1], self.shape[0])
        if lib is not None and x.dtype == torch.bfloat16 and (compute != torch.bfloat16 or rows <= INTEGER_ROWS):
            # bfloat16 rows (prefill) on a CPU without bfloat16 dot products, or up to 128 of them:
            # integer products in C, as the decode step computes one row. Measured
            # (benchmarks/quant_matmul.py, a 6400x4096 expert, Zen 5, 2 threads): 2x the float32 GEMM
            # of widened weights with an expert's ~17 rows (AVX2); with native bfloat16 (AVX512-BF16,
            # VNNI), 1.5-2.2x the bfloat16 GEMM of widened weights at 16-32 rows, 1.1x at 128, 0.96x
            # at 256 (int8 and nf4)
            y = native.qmatmul(lib, x, self, i)
            if y is not None:
                return y
        if readable:
            # more rows where the CPU multiplies bfloat16 natively, or float32 rows: the C kernels
            # widen a block of weight rows at a time, multiplied in the prefill dtype. Widened
            # straight to bfloat16 (not float32, then rounded by torch): 1.5-2.3x at 16-128 rows of
            # a 6400x4096 expert (AVX512-BF16 with AMX, int8 and nf4)
            def fill(start, end, out):
                native.dequantize_rows(lib, self, i, start, end, out)

            block = torch.bfloat16 if compute == torch.bfloat16 else torch.float32
            return blocked_linear(x, self.shape, fill, dtype=compute, block_dtype=block)
        return prefill_linear(x, self.dequantize(i, x.dtype))


@functools.cache
def codebook(quant_type: str) -> torch.Tensor:
    """The 16 code values of a 4-bit type as int8 (value * 127), on the CPU."""
    return torch.tensor(CODEBOOK[quant_type], dtype=torch.int8, device="cpu")  # never the meta device of a build


@functools.cache
def _byte_values(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: what a byte of 4-bit codes stands for, its high nibble then its low one."""
    code = codebook(quant_type).float() / 127
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), -1).to(device=device)


def _int8_kernel_applies(x: torch.Tensor) -> bool:
    # weight-only int8 kernel: CPU, half-precision activations, few rows (decode); for long
    # prefills a dequantized matmul is faster. Its inner dimension must be a multiple of 16:
    # torch 2.13's kernel returned garbage for 8, 100, 200 and 600 (measured; 16..1600 in steps of
    # 16 were right), which the published shapes (4096, 6400) never hit
    return (
        x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        and x.numel() // x.shape[-1] <= 8 and x.shape[-1] % 16 == 0 and hasattr(torch, "_weight_int8pack_mm")
    )


class QuantizedExperts(ExpertGroup):
    """The experts (same routing and dispatch as ``layers.Experts``) with quantized w1 (gate),
    w3 (up) and w2 (down)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, quant_type: str, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = QuantizedMatrices(num_experts, ffn, hidden, quant_type, dtype, device)
        self.w3 = QuantizedMatrices(num_experts, ffn, hidden, quant_type, dtype, device)
        self.w2 = QuantizedMatrices(num_experts, hidden, ffn, quant_type, dtype, device)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.w2.linear(e, F.silu(self.w1.linear(e, x)) * self.w3.linear(e, x))


def check_head(config, head: bool) -> None:
    """A head tied to the embeddings cannot be stored quantized (the embeddings read it as floats)."""
    if head and config.tie_word_embeddings:
        raise UsageError("--quantize-head: this model ties its output head to its embeddings")


def swap_in_quantized(model, quant_type: str, attention: bool, dtype: torch.dtype, head: bool = False) -> None:
    """Give a model built on the meta device (no storage yet) quantized experts (with ``attention``
    quantized q/k/v/o, with ``head`` an int8 output head), empty: loading fills them tensor by
    tensor, so the float weights are never allocated."""
    c = model.config
    check_head(c, head)
    if head:
        model.lm_head = QuantizedLinear.like(model.lm_head, HEAD_FORMAT, dtype)
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        moe.experts = QuantizedExperts(c.num_local_experts, c.hidden_size, c.intermediate_size, quant_type, dtype)
        if attention:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, QuantizedLinear.like(getattr(layer.self_attn, name), quant_type, dtype))


def quantize_in_place(model, quant_type: str, attention: bool = False, head: bool = False) -> None:
    """Replace a float model's experts (with ``attention`` its q/k/v/o, with ``head`` its output
    head, as int8) by quantized copies, one layer at a time (the float weights of a layer are
    freed as soon as it is done)."""
    check_head(model.config, head)
    if head:
        model.lm_head = _quantized_copy(model.lm_head, HEAD_FORMAT)
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        dense = moe.experts
        e, f, h = dense.w1.shape
        q = QuantizedExperts(e, h, f, quant_type, dense.w1.dtype, dense.w1.device)
        for name in ("w1", "w2", "w3"):
            for i in range(e):
                getattr(q, name).store(i, getattr(dense, name)[i])
        moe.experts = q
        if attention:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, _quantized_copy(getattr(layer.self_attn, name), quant_type))


def _quantized_copy(old: nn.Linear, quant_type: str) -> QuantizedLinear:
    new = QuantizedLinear.like(old, quant_type, old.weight.dtype, old.weight.device)
    new.weight_q.store(0, old.weight)
    if old.bias is not None:
        new.bias.data.copy_(old.bias)
    return new


class QuantizedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` (with optional bias) whose weight is stored quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant_type: str,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.weight_q = QuantizedMatrices(1, out_features, in_features, quant_type, dtype, device)
        zeros = torch.zeros(out_features, dtype=dtype, device=device)
        self.bias = nn.Parameter(zeros, requires_grad=False) if bias else None

    @classmethod
    def like(cls, old: nn.Linear, quant_type: str, dtype: torch.dtype, device=None) -> QuantizedLinear:
        """An empty one of ``old``'s shape (``old`` may be on the meta device)."""
        return cls(old.in_features, old.out_features, old.bias is not None, quant_type, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_q.linear(0, x)
        return y + self.bias if self.bias is not None else y
