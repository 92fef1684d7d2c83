"""Issue-2 numbers: max |logit| difference against transformers, peak RSS while loading against the
weight bytes, and load time, on random checkpoints in the hub layout.

    python3 benchmarks/load_and_parity.py [--size-mb 350]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import make_config, write_checkpoint

CHILD = textwrap.dedent(
    """
    import re, sys, time, torch
    from phimoe_cli.model.loading import PhimoeForCausalLM, build_empty, load_config, load_model
    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    cfg = load_config(sys.argv[1]); cfg.num_hidden_layers, cfg.vocab_size = 1, 8
    build_empty(PhimoeForCausalLM, cfg, torch.float32, torch.device("cpu"))
    base = status("VmRSS")
    t = time.perf_counter()
    m = load_model(sys.argv[1], dtype=sys.argv[2])
    dt = time.perf_counter() - t
    print(status("VmHWM") - base, sum(p.nbytes for p in m.parameters()), dt)
    """
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=350)
    args = ap.parse_args()
    import transformers

    from phimoe_cli.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        small = write_checkpoint(Path(tmp) / "small", shards=3)
        ours = load_model(small)
        ref = transformers.PhimoeForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
        x = torch.randint(0, 32000, (2, 60), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = ours(x), ref(x).logits
        print(f"float32 max |logit diff| vs transformers: {(a - b).abs().max().item():.2e} "
              f"(logits up to {b.abs().max().item():.1f})")
        hidden = 512
        layers = max(1, round(args.size_mb * 1e6 / 4 / (8 * 3 * hidden * 1024 + 4 * hidden * hidden)))
        cfg = make_config(hidden_size=hidden, intermediate_size=1024, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, num_local_experts=8)
        big = write_checkpoint(Path(tmp) / "big", cfg, shards=4)
        files = sum(f.stat().st_size for f in big.glob("*.safetensors"))
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(big), dtype], capture_output=True, text=True,
                                 check=True).stdout.split()
            growth, weights, seconds = int(out[0]), int(out[1]), float(out[2])
            print(f"load {files / 1e6:.0f} MB float32 files as {dtype}: {seconds:.2f} s, peak RSS growth "
                  f"{growth / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights ({growth / weights:.2f}x)")


if __name__ == "__main__":
    main()
