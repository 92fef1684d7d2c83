"""Decode efficiency against the memory, interleaved: a 512 MiB read (compiled bf16 matrix-vector
product and a float32 sum), then 64 decode steps of the `mid` shape, repeated 6 times, so each
decode speed can be compared with what the memory delivered at that moment.

    python3 benchmarks/decode_efficiency.py
"""

import time

import torch

from phimoe_cli.bench import active_bytes, random_model, shape_config
from phimoe_cli.model.kernels import matvec

torch.set_num_threads(2)
cfg = shape_config("mid")
model = random_model(cfg, torch.bfloat16, torch.device("cpu"))
cache = model.new_cache(1, 256)
ids = torch.randint(0, 32000, (1, 128)); tok = torch.tensor([[5]])
w = torch.ones(65536, 4096, dtype=torch.bfloat16); v = torch.ones(1, 1, 4096, dtype=torch.bfloat16)
big = torch.ones(128 << 20)
active = active_bytes(cfg, torch.bfloat16, 128 + 31.5)
with torch.inference_mode():
    model(ids, cache=cache, logits_to_keep=1)
    for _ in range(3): model(tok, cache=cache, logits_to_keep=1)
    for rep in range(6):
        t = time.perf_counter(); [matvec(v, w) for _ in range(3)]; mv_bw = 3 * w.nbytes / (time.perf_counter() - t)
        t = time.perf_counter(); [big.sum() for _ in range(3)]; sum_bw = 3 * big.nbytes / (time.perf_counter() - t)
        cache.truncate(128); t = time.perf_counter()
        for _ in range(64): int(model(tok, cache=cache, logits_to_keep=1)[0, -1].float().argmax())
        dt = (time.perf_counter() - t) / 64
        print(f"matvec read {mv_bw/1e9:.1f} GB/s, sum {sum_bw/1e9:.1f} GB/s | decode {1/dt:.1f} tok/s = {active/dt/1e9:.1f} GB/s effective = {100*active/dt/max(mv_bw,sum_bw):.0f}% of best read")
