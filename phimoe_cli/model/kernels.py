"""Kernels for decoding one token on the CPU at memory bandwidth.

Decoding one token multiplies a single row by every weight matrix: the work is reading the
weights, so speed is memory bandwidth. PyTorch's CPU GEMV for bfloat16 reads about 14 GB/s on a
machine whose memory delivers about 30 (``phimoe bench`` measures both), and every small op costs
microseconds of dispatch. Written as float32 multiply-and-sum reductions and compiled by inductor,
one token's expert block (router, sparsemixer, the two chosen experts, read in place through
indirect loads) becomes one call that reads at nearly the full bandwidth. Prefill (many rows)
keeps ``F.linear``: the oneDNN GEMM is compute-bound there and fast.

Every compiled function has an eager twin with the same meaning. The compiled one is used only
when enabled on the model (``PhimoeForCausalLM.use_decode_kernel``); if compiling is impossible
(no C++ compiler, an unsupported platform) the eager twin takes over for good, with a warning.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def mv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as a reduction: x [..., in] times weight [..., out, in] -> [..., out], summed
    in float32 and rounded once to x's dtype. Meant to be compiled (eagerly it materialises the
    product)."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Compiled:
    """``fn`` compiled by inductor on first call; ``eager`` if that fails. ``dynamic=True``: every
    size may vary; ``False``: sizes are constants except those the caller marks
    (``torch._dynamo.maybe_mark_dynamic``), which gives inductor simpler, vectorisable indexing."""

    def __init__(self, fn, eager, dynamic: bool = True):
        self.fn, self.eager, self.dynamic, self.compiled = fn, eager, dynamic, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
        if self.compiled is not False:
            try:
                return self.compiled(*args)
            except Exception as exc:  # no compiler, or an inductor limitation: never fail a decode
                warnings.warn(f"compiled decode kernel unavailable, running eagerly ({type(exc).__name__}: {exc})")
                self.compiled = False
        return self.eager(*args)


matvec = Compiled(mv, F.linear)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fast: bool = False):
    """``F.linear``; with ``fast``, one row on the CPU goes through the compiled ``matvec``."""
    if fast and x.numel() == x.shape[-1] and x.device.type == "cpu":
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)
