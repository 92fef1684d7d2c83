"""The prompt's pass on quantized weights, per expert matrix: our integer kernel (native.qmatmul),
the weights dequantized by torch then multiplied by prefill_linear, and the unquantized bf16
matrix by prefill_linear; GMAC/s over 16 matrices (each expert of a layer), best of 3.

    python3 benchmarks/quant_matmul.py                 # this CPU
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
      MKL_ENABLE_INSTRUCTIONS=AVX2 python3 benchmarks/quant_matmul.py "-mavx2 -mfma"   # AVX2 simulated
"""

import sys
import time

import torch

from phimoe_cli.model import native
from phimoe_cli.model.kernels import prefill_linear
from phimoe_cli.model.quant import QuantizedMatrices

torch.set_num_threads(2)
lib = native.library(sys.argv[1] if len(sys.argv) > 1 else None)
print(f"C kernels: {native.isa(lib)}; torch: {torch.backends.cpu.get_cpu_capability()}")
def gmacs(m, x, w) -> list[str]:
    def integer():
        for i in range(16):
            native.qmatmul(lib, x, m, i)

    def dequantized():
        for i in range(16):
            prefill_linear(x, m.dequantize(i, torch.bfloat16))

    def unquantized():
        for _ in range(16):
            prefill_linear(x, w)

    line = []
    (n, k), rows = m.shape, x.shape[0]
    for f in (integer, dequantized, unquantized):
        f()
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        line.append(f"{f.__name__} {16 * n * k * rows / best / 1e9:.1f}")
    return line


for quant, n, k, rows in (("int8", 1600, 1024, 17), ("nf4", 1600, 1024, 17), ("int8", 1024, 1600, 17),
                          ("nf4", 1024, 1600, 17), ("int8", 1024, 1024, 128), ("nf4", 1024, 1024, 128)):
    m = QuantizedMatrices(16, n, k, quant, torch.bfloat16)
    for i in range(16):
        m.store(i, torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k).bfloat16()
    print(f"{quant} {n}x{k}, {rows} rows, GMAC/s:", ", ".join(gmacs(m, x, m.dequantize(0, torch.bfloat16))))
