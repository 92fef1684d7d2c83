"""Issue-6 numbers: peak RSS while loading each quantization mode, against `phimoe info`'s estimate.

    python3 benchmarks/quant_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import make_config, write_checkpoint

CHILD = """
import logging, re, sys, time, torch
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as F
from phimoe_cli.model.loading import PhimoeForCausalLM, build_empty, load_config, load_model
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
cfg = load_config(sys.argv[1]); cfg.num_hidden_layers, cfg.vocab_size = 1, 8
build_empty(PhimoeForCausalLM, cfg, torch.float32, torch.device("cpu"))
F.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")
F.int8_vectorwise_quant(torch.ones(64, 64))
base = status("VmRSS")
t = time.perf_counter()
q = sys.argv[2]
m = load_model(sys.argv[1], dtype="bfloat16", quantize=q if q in ("int8", "nf4", "fp4") else "none")
dt = time.perf_counter() - t
held = sum(t.nbytes for t in m.state_dict().values())
print(status("VmHWM") - base, held, dt)
"""


def main() -> None:
    from phimoe_cli.model import PhimoeConfig
    from phimoe_cli.model.memory import memory_estimates

    cfg = make_config(hidden_size=1024, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, num_local_experts=8, vocab_size=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ckpt", cfg, shards=3, dtype=torch.bfloat16)
        estimate = memory_estimates(PhimoeConfig.from_file(path))
        print(f"{'mode':10} {'info estimate':>14} {'tensors held':>13} {'peak RSS growth':>16} {'load s':>7}")
        for mode in ("bfloat16", "int8", "nf4", "fp4"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                                 check=True).stdout.split()
            growth, held, seconds = int(out[0]), int(out[1]), float(out[2])
            print(f"{mode:10} {estimate[mode] / 1e6:>11.1f} MB {held / 1e6:>10.1f} MB "
                  f"{growth / 1e6:>13.1f} MB {seconds:>7.2f}")


if __name__ == "__main__":
    main()
