"""The prompt's pass on quantized weights, per expert matrix: each kernel that can multiply a few
bfloat16 prompt rows by one expert, ms per matrix (GMAC/s) over 4 experts, best of 3, the kernels
interleaved. Kernels that decline here (no AMX, no C build) print "-".

    amx       native.amx_matmul: AMX tiles on weights widened to bf16 in L1 (AMX CPUs only)
    integer   native.qmatmul: integer products against int16 activations
    blocked   rows widened by C to bf16 a 4 MiB block at a time, then torch's GEMM
    int8pack  torch._weight_int8pack_mm (int8 only)
    bf16      the unquantized bf16 matrix by torch's GEMM (what the bytes would cost unquantized)

    python3 benchmarks/quant_matmul.py                      # the real expert shapes, this CPU
    python3 benchmarks/quant_matmul.py --shape mid
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
      MKL_ENABLE_INSTRUCTIONS=AVX2 python3 benchmarks/quant_matmul.py --cflags "-mavx2 -mfma"   # AVX2 simulated
"""

import argparse
import time

import torch

from phimoe_cli.model import native
from phimoe_cli.model.kernels import blocked_linear
from phimoe_cli.model.quant import QuantizedMatrices

SHAPES = {"phi-3.5-moe": ((6400, 4096), (4096, 6400)), "mid": ((1600, 1024), (1024, 1600))}
EXPERTS = 4


def kernels(lib, m: QuantizedMatrices, w: torch.Tensor, x: torch.Tensor) -> dict:
    def amx():
        return [native.amx_matmul(lib, x, m, i) for i in range(EXPERTS)]

    def integer():
        return [native.qmatmul(lib, x, m, i) for i in range(EXPERTS)]

    def blocked():
        return [blocked_linear(x, m.shape, lambda s, e, o, i=i: native.dequantize_rows(lib, m, i, s, e, o),
                               dtype=torch.bfloat16, block_dtype=torch.bfloat16) for i in range(EXPERTS)]

    def int8pack():
        return [torch._weight_int8pack_mm(x, m.qweight[i], m.scale[i].bfloat16()) for i in range(EXPERTS)]

    def bf16():
        return [x @ w[i].t() for i in range(EXPERTS)]

    found = {"amx": amx, "integer": integer, "blocked": blocked, "bf16": bf16}
    if m.quant_type == "int8":
        found["int8pack"] = int8pack
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="phi-3.5-moe")
    ap.add_argument("--rows", default="1,4,8,16,32,64,128")
    ap.add_argument("--quant", default="int8,nf4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cflags", default=None, help="build native.c with these flags instead of -march=native")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.library(args.cflags)
    if lib is None:
        raise SystemExit("no C build here")
    print(f"C kernels: {native.isa(lib)}; torch: {torch.backends.cpu.get_cpu_capability()}; {args.threads} threads")
    for quant in args.quant.split(","):
        for n, k in SHAPES[args.shape]:
            g = torch.Generator().manual_seed(n)
            w = torch.randn(EXPERTS, n, k, generator=g).mul_(0.05).bfloat16()
            m = QuantizedMatrices(EXPERTS, n, k, quant, torch.bfloat16)
            for i in range(EXPERTS):
                m.store(i, w[i])
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, k, generator=g).bfloat16()
                fns = kernels(lib, m, w, x)
                usable = {name: f for name, f in fns.items() if all(y is not None for y in f())}
                best = dict.fromkeys(usable, float("inf"))
                for _ in range(3):
                    for name, f in usable.items():
                        t = time.perf_counter()
                        f()
                        best[name] = min(best[name], time.perf_counter() - t)
                cells = []
                for name in fns:
                    if name in best:
                        s = best[name] / EXPERTS
                        cells.append(f"{name} {s * 1e3:.2f} ms ({n * k * rows / s / 1e9:.0f})")
                    else:
                        cells.append(f"{name} -")
                print(f"{quant} {n}x{k} {rows:>3} rows: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
