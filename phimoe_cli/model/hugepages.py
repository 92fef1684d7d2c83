"""Weights in transparent huge pages (Linux).

Decoding streams every active weight from memory once per token. With ordinary 4 KiB pages that
stream takes a TLB miss every 4 KiB and the hardware prefetchers restart at every page; in 2 MiB
pages the same bfloat16 matrix-vector product read 50 GB/s instead of 40 here (benchmarks/README.md).
Most Linux systems set transparent huge pages to ``madvise``: memory gets them only when asked,
which PyTorch's allocator does not do. ``empty`` asks: an anonymous mapping, aligned to 2 MiB,
marked ``MADV_HUGEPAGE`` before anything touches it. Elsewhere (no madvise, other systems) it is
ordinary memory, and small tensors always are. ``PHIMOE_HUGEPAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys

import torch

HUGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    # MADV_HUGEPAGE (14) is Linux's; elsewhere the same number means something else, or nothing
    if not sys.platform.startswith("linux") or os.environ.get("PHIMOE_HUGEPAGES", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; from 2 MiB on, backed by huge pages where the system allows."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if nbytes < HUGE or madvise is None:
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // HUGE) * HUGE
    buf = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -address % HUGE
    madvise(address + offset, size, MADV_HUGEPAGE)  # advice only: a failure leaves ordinary pages
    # the tensor keeps the mapping alive; it is unmapped when the last view of it is freed
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def empty_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``torch.empty_like(t, device=device)``, in huge pages on the CPU."""
    if torch.device(device).type != "cpu":
        return torch.empty_like(t, device=device)
    return empty(tuple(t.shape), t.dtype)
