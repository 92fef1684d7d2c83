"""The prompt's quantized kernel (native.qmatmul) in two or more builds of native.c, interleaved:
GMAC/s of one expert matrix per prompt-row count, best of the rounds, after checking that the
builds agree (within 2% of the largest output).

    cc -O3 -march=native -fopenmp -fPIC -shared -o /tmp/new.so phimoe_cli/model/native.c -lm
    git show OLD:phimoe_cli/model/native.c > /tmp/old.c && cc ... -o /tmp/old.so /tmp/old.c -lm
    python3 benchmarks/qmatmul_ab.py /tmp/old.so /tmp/new.so --quant nf4 --rows 3,4,8,16,64
    python3 benchmarks/qmatmul_ab.py /tmp/old.so /tmp/new.so --shape 4096x6400 --quant int8
"""

import argparse
import os
import time

import torch

from phimoe_cli.model import native
from phimoe_cli.model.quant import QuantizedMatrices

EXPERTS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+", help="built libraries (.so) of native.c")
    ap.add_argument("--shape", default="6400x4096", help="N x K of one expert matrix")
    ap.add_argument("--quant", default="nf4", choices=("int8", "nf4", "fp4"))
    ap.add_argument("--rows", default="3,4,8,16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = (int(v) for v in args.shape.split("x"))
    rows = [int(r) for r in args.rows.split(",")]
    libs = [native.load(os.path.abspath(p)) for p in args.libs]
    m = QuantizedMatrices(EXPERTS, n, k, args.quant, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for i in range(EXPERTS):
        m.store(i, torch.randn(n, k, generator=g).bfloat16() / k**0.5)
    for r in rows:
        x = torch.randn(r, k, generator=g).bfloat16()
        ys = [native.qmatmul(lib, x, m, 0).float() for lib in libs]
        for y in ys[1:]:
            if (y - ys[0]).abs().max() > 0.02 * ys[0].abs().max() + 1e-6:
                raise SystemExit(f"the builds disagree at {r} rows")
    best = {(i, r): float("inf") for i in range(len(libs)) for r in rows}
    for _ in range(args.rounds):
        for r in rows:
            x = torch.randn(r, k, generator=g).bfloat16()
            for i, lib in enumerate(libs):
                t = time.perf_counter()
                for e in range(EXPERTS):
                    native.qmatmul(lib, x, m, e)
                best[i, r] = min(best[i, r], time.perf_counter() - t)
    names = [os.path.basename(p) for p in args.libs]
    print(f"{args.quant} {n}x{k}, {args.threads} threads, GMAC/s (best of {args.rounds}, builds interleaved)")
    for r in rows:
        cells = "  ".join(f"{name} {EXPERTS * r * n * k / best[i, r] / 1e9:.1f}" for i, name in enumerate(names))
        print(f"{r:4d} rows: {cells}")


if __name__ == "__main__":
    main()
