"""Products of many rows (prefill) in the compute dtype the CPU multiplies fastest.

Prefill multiplies many rows by each weight, so it is bound by arithmetic, not by reading
weights. CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX, Arm's BF16) multiply
bfloat16 several times faster than float32; on the others (AVX2, plain AVX-512) PyTorch's
bfloat16 GEMM converts as it goes and runs at half the float32 speed or worse. There, weights
are multiplied by a C kernel that widens each 16 weights in registers (native.bf16_matmul, AVX2
builds), else widened to float32 a block at a time (the block stays in cache) and multiplied by
the float32 GEMM: either way the same products, summed in float32 and rounded once, as the
bfloat16 GEMM does.
One-token decoding is decode.py's concern.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F

from . import native
from .native import cpuinfo

UPCAST_BLOCK_BYTES = 4 << 20  # float32 bytes of weight widened at a time


def native_low_precision(flags: set[str], capability: str, dtype: torch.dtype) -> bool:
    """Whether a CPU with these /proc/cpuinfo ``flags`` (x86 "flags" or Arm "Features") and this
    PyTorch kernel ``capability`` (``torch.backends.cpu.get_cpu_capability()``, which honours
    ``ATEN_CPU_CAPABILITY``) multiplies ``dtype`` natively."""
    if dtype == torch.bfloat16:
        x86, arm = {"avx512_bf16", "amx_bf16"}, {"bf16"}
    elif dtype == torch.float16:
        x86, arm = {"avx512_fp16", "amx_fp16"}, {"fphp", "asimdhp"}
    else:
        return True
    if capability.upper().startswith("AVX"):
        return capability.upper().startswith("AVX512") and bool(flags & x86)
    return bool(flags & arm) or not flags  # Arm (or unknown): trust PyTorch's kernels


def _cpu_flags() -> frozenset[str]:
    info = cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def sdpa_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype in which attention (torch SDPA) is computed for q/k/v of ``dtype``: ``dtype``,
    except bfloat16 on a CPU with AMX whose PyTorch kernels are held below AVX-512
    (``ATEN_CPU_CAPABILITY=avx2`` or ``default``), where torch 2.13's flash attention takes its AMX
    path for 64+ queries and fails ("pack_vnni2 is only supported when avx512 is supported"):
    there float32, rounded back to bfloat16 after."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return dtype
    return _cpu_sdpa_dtype_now()


@torch.compiler.assume_constant_result  # (a constant to dynamo, which cannot trace the query)
def _cpu_sdpa_dtype_now() -> torch.dtype:
    return _cpu_sdpa_dtype(torch.backends.cpu.get_cpu_capability())


@functools.cache
def _cpu_sdpa_dtype(capability: str) -> torch.dtype:
    held = not capability.upper().startswith("AVX512")
    return torch.float32 if held and "amx_bf16" in _cpu_flags() else torch.bfloat16


def prefill_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype in which prefill multiplies weights of ``dtype``. ``PHIMOE_PREFILL_DTYPE``
    (``auto``, ``float32`` or ``native``) overrides the choice for the CPU."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    return _cpu_prefill_dtype(dtype, os.environ.get("PHIMOE_PREFILL_DTYPE", "auto"))


@functools.cache
def _cpu_prefill_dtype(dtype: torch.dtype, choice: str) -> torch.dtype:
    if choice in ("float32", "native"):
        return torch.float32 if choice == "float32" else dtype
    native = native_low_precision(set(_cpu_flags()), torch.backends.cpu.get_cpu_capability(), dtype)
    return dtype if native else torch.float32


def prefill_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in ``prefill_dtype``; the result has x's dtype."""
    rows = x.numel() // x.shape[-1]
    if rows == 1 or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    natively = prefill_dtype(weight.dtype) == weight.dtype
    if x.dtype == weight.dtype == torch.bfloat16 and weight.is_contiguous() and not torch.is_grad_enabled():
        lib = native.library()
        if lib is not None and natively and rows <= native.AMX_MAX_ROWS:
            y = native.amx_matmul(lib, x, weight, 0, bias)  # None without AMX
            if y is None and rows <= native.DPBF16_MAX_ROWS:
                y = native.dpbf16_matmul(lib, x, weight, bias)  # None without AVX512-BF16
            if y is not None:  # AMX: 1.15x torch's GEMM at 8 rows of a 6400x4096 expert; AVX512-BF16: ~1.2x
                return y
        elif lib is not None and not natively:
            y = native.bf16_matmul(lib, x, weight, bias)
            if y is not None:  # widened in registers by C: 3-4x the float32 GEMM on widened blocks at 16 rows
                return y
    return F.linear(x, weight, bias) if natively else upcast_linear(x, weight, bias)


def upcast_linear(x, weight, bias=None, block_bytes: int = UPCAST_BLOCK_BYTES) -> torch.Tensor:
    """``F.linear`` with ``weight`` widened to float32 a block of rows at a time."""
    return blocked_linear(x, weight.shape, lambda start, end, out: out.copy_(weight[start:end]), bias,
                          block_bytes=block_bytes)


def blocked_linear(x, shape, fill, bias=None, dtype=torch.float32, block_bytes: int = UPCAST_BLOCK_BYTES,
                   block_dtype=torch.float32):
    """``F.linear`` by a weight of ``shape`` [n, k] that exists only a block of rows at a time:
    ``fill(start, end, out)`` writes rows start..end into the block ``out`` (``block_dtype``:
    float32, or ``dtype`` itself), which is then multiplied in ``dtype`` (float32, or rounded to
    bfloat16 / float16 first)."""
    n, k = shape
    rows = max(1, min(n, block_bytes // (block_dtype.itemsize * k)))
    xc = x.reshape(-1, k).to(dtype)
    out = torch.empty(xc.shape[0], n, dtype=dtype, device=x.device)
    words = -(-rows * k * block_dtype.itemsize // 4)  # the scratch space is counted in float32
    block = _scratch(words, x.device).view(block_dtype)[: rows * k].view(rows, k)
    for start in range(0, n, rows):
        w = block[: min(rows, n - start)]
        end = start + w.shape[0]
        fill(start, end, w)
        wc = w if dtype == block_dtype else w.to(dtype)
        if bias is None:
            out[:, start:end] = xc @ wc.t()
        else:
            out[:, start:end] = torch.addmm(bias[start:end].to(dtype), xc, wc.t())
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


_scratch_space = threading.local()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements, kept for the next call: allocating a
    fresh block per product costs page faults that took longer than the product itself."""
    buf = getattr(_scratch_space, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != device:
        # An ordinary tensor even when first made under torch.inference_mode(): an inference
        # tensor could not be written by a later product outside that mode (no_grad, plain use).
        with torch.inference_mode(False):
            buf = _scratch_space.buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]
