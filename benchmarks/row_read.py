"""How fast the decode step's row loops read their weights, against a plain read of the memory:
one bfloat16 row times a 256 MiB matrix of each format (bf16, int8, 4-bit) by the C kernel
(native.qlinear, the loop the decode step runs for every matrix), interleaved with a float32 sum
of 512 MiB, medians of the rounds, GB/s of weight bytes (scales included).

    python3 benchmarks/row_read.py                       # this CPU's build, 1 and 2 threads
    python3 benchmarks/row_read.py "-mavx2 -mfma"        # another build of native.c
    python3 benchmarks/row_read.py /tmp/old.so /tmp/new.so   # two builds, interleaved (A/B)

Arguments: compiler flags for native.c, or paths of built libraries (``.so``); each is measured
in every round.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

from phimoe_cli.model import hugepages, native
from phimoe_cli.model.quant import QuantizedMatrices

K, MIB = 4096, 256
libs = {arg: native.load(Path(arg)) if arg.endswith(".so") else native.library(arg)
        for arg in (sys.argv[1:] or [native.DEFAULT_FLAGS])}
for arg, lib in libs.items():
    print(f"{arg}: C kernels {native.isa(lib)}")
g = torch.Generator().manual_seed(0)


def bf16():
    w = hugepages.empty(((MIB << 20) // (2 * K), K), torch.bfloat16)
    return w.copy_(torch.randn(w.shape, generator=g, dtype=torch.bfloat16) / 64), w.nbytes


def quantized(kind, n):
    m = QuantizedMatrices(1, n, K, kind, torch.bfloat16)
    m.qweight = hugepages.empty(tuple(m.qweight.shape), m.qweight.dtype)
    m.qweight.copy_(torch.randint(-128 if kind == "int8" else 0, 128 if kind == "int8" else 256,
                                  m.qweight.shape, generator=g, dtype=torch.int16).to(m.qweight.dtype))
    m.scale.uniform_(0.01, 0.02, generator=g)
    return m, m.qweight.nbytes + m.scale.nbytes


mats = {"bf16": bf16(), "int8": quantized("int8", (MIB << 20) // K), "nf4": quantized("nf4", (MIB << 21) // K)}
x = torch.randn(1, K, generator=g).to(torch.bfloat16)
big = hugepages.empty((128 << 20,), torch.float32).fill_(1)
rounds = 9
for threads in (1, 2):
    torch.set_num_threads(threads)
    speeds = {"read": [], **{(name, arg): [] for name in mats for arg in libs}}
    for _ in range(rounds):
        for key in speeds:
            t = time.perf_counter()
            if key == "read":
                big.sum()
                nbytes = big.nbytes
            else:
                w, nbytes = mats[key[0]]
                native.qlinear(libs[key[1]], x, w)
            speeds[key].append(nbytes / (time.perf_counter() - t) / 1e9)
    read = statistics.median(speeds["read"])
    print(f"{threads} thread{'s' if threads > 1 else ''}: plain read {read:.1f} GB/s; "
          + ", ".join(f"{name}{f' [{arg}]' if len(libs) > 1 else ''} {statistics.median(s):.1f} "
                      f"({statistics.median(s) / read:.0%})" for (name, arg), s in list(speeds.items())[1:]))
