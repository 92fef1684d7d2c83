"""Decode at a long context, builds of the C step interleaved (A/B): the prompt is prefilled once,
then in every round each build decodes 31 timed steps from the same cache length, so the builds
read the same cache and a slow minute of the memory falls on all of them. Medians of the rounds.

    python3 benchmarks/long_context.py 4000 /tmp/old.so /tmp/new.so        # mid, bf16
    ATEN_CPU_CAPABILITY=avx2 python3 benchmarks/long_context.py 16000 old_avx2.so new_avx2.so
    SHAPE=phi-3.5-moe LAYERS=2 ROUNDS=3 python3 benchmarks/long_context.py 4000 a.so b.so

Arguments: the context length, then libraries built from native.c (``gcc -O3 FLAGS -fopenmp
-fPIC -shared -o X.so native.c -lm``) or compiler flags (built into the cache). Random weights.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from phimoe_cli import bench
from phimoe_cli.model import decode, native

context, builds = int(sys.argv[1]), sys.argv[2:] or [native.DEFAULT_FLAGS]
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
layers = int(os.environ["LAYERS"]) if "LAYERS" in os.environ else None
config = bench.shape_config(os.environ.get("SHAPE", "mid"), layers)
if context + 64 > config.max_position_embeddings:
    sys.exit(f"a context of {context} is more than the shape's {config.max_position_embeddings} tokens")
model = bench.random_model(config, torch.bfloat16, torch.device("cpu"))
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, config.vocab_size, (1, context), generator=g)
steps = torch.randint(0, config.vocab_size, (1, 32), generator=g)
cache = model.new_cache(capacity=context + 64)
with torch.inference_mode():
    for start in range(0, context, 512):
        model(prompt[:, start : start + 512], cache=cache, logits_to_keep=1)
libs = {b: native.load(Path(b)) if b.endswith(".so") else native.library(b) for b in builds}
rates = {b: [] for b in builds}
for _ in range(int(os.environ.get("ROUNDS", 5))):
    for b, lib in libs.items():
        assert decode.choose(model, "native", lib=lib) == "native"
        cache.length = context  # forget the last round's steps
        with torch.inference_mode():
            model(steps[:, :1], cache=cache, logits_to_keep=1)  # (the first step after a switch: untimed)
            t = time.perf_counter()
            for i in range(1, steps.shape[1]):
                model(steps[:, i : i + 1], cache=cache, logits_to_keep=1)
            rates[b].append((steps.shape[1] - 1) / (time.perf_counter() - t))
for b, r in rates.items():
    print(f"context {context}, {Path(b).name}: median {statistics.median(r):.1f} tok/s, "
          f"best {max(r):.1f} ({', '.join(f'{v:.1f}' for v in r)})")
