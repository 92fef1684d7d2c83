"""Decode efficiency against the memory, interleaved: a 512 MiB read (the bfloat16 matrix-vector
product decoding uses, and a float32 sum, both in huge pages as the weights are), then 64 decode
steps on random tokens, for each decode path in turn, repeated 6 times; so each path's speed is
compared with what the memory delivered at that moment, and the paths with each other.

    python3 benchmarks/decode_efficiency.py [native compiled eager]       # mid, bf16
    python3 benchmarks/decode_efficiency.py --shape phi-3.5-moe --layers 2 -q int8 native compiled
    python3 benchmarks/decode_efficiency.py -q nf4 --quantize-attention native
"""

import argparse
import time

import torch

from phimoe_cli.bench import random_model, shape_config
from phimoe_cli.model import decode, hugepages, native
from phimoe_cli.model.decode import matvec
from phimoe_cli.model.memory import active_bytes
from phimoe_cli.model.quant import quantize_in_place

parser = argparse.ArgumentParser()
parser.add_argument("kinds", nargs="*", default=["native", "compiled"])
parser.add_argument("--shape", default="mid")
parser.add_argument("--layers", type=int)
parser.add_argument("-q", "--quantize", default="none")
parser.add_argument("--quantize-attention", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)
kinds = args.kinds
cfg = shape_config(args.shape, args.layers)
model = random_model(cfg, torch.bfloat16, torch.device("cpu"))
if args.quantize != "none":
    quantize_in_place(model, args.quantize, args.quantize_attention)
cache = model.new_cache(1, 256)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 32000, (1, 128), generator=g)
steps = torch.randint(0, 32000, (1, 64), generator=g)
w = hugepages.empty((65536, 4096), torch.bfloat16).fill_(1)
v = torch.ones(1, 1, 4096, dtype=torch.bfloat16)
big = hugepages.empty((128 << 20,), torch.float32).fill_(1)
lib = native.library()
active = active_bytes(cfg, 2, 128 + 31.5, args.quantize, args.quantize_attention)


def read_bw() -> float:
    t = time.perf_counter()
    for _ in range(3):
        native.linear(lib, v, w) if lib is not None else matvec(v, w)
    mv = 3 * w.nbytes / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(3):
        big.sum()
    return max(mv, 3 * big.nbytes / (time.perf_counter() - t))


with torch.inference_mode():
    for kind in kinds:  # warm up (and compile) every path first
        decode.choose(model, kind)
        cache.reset()
        model(ids, cache=cache, logits_to_keep=1)
        for i in range(4):
            model(steps[:, i : i + 1], cache=cache, logits_to_keep=1)
    for _rep in range(6):
        line = []
        for kind in kinds:
            decode.choose(model, kind)
            bw = read_bw()
            cache.truncate(128)
            t = time.perf_counter()
            for i in range(64):
                int(model(steps[:, i : i + 1], cache=cache, logits_to_keep=1)[0, -1].float().argmax())
            dt = (time.perf_counter() - t) / 64
            line.append(f"{kind}: read {bw / 1e9:.1f} GB/s, decode {1 / dt:.1f} tok/s = {100 * active / dt / bw:.0f}%")
        print(" | ".join(line))
