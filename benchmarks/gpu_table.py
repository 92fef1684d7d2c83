"""The GPU check's table (benchmarks/gpu_check.sh): one row per `phimoe bench --json` file in a folder.

    python3 benchmarks/gpu_table.py gpu-check-out
"""

import json
import sys
from pathlib import Path

ROWS = {"bf16": "bf16", "bf16-eager": "bf16, eager decode", "int8": "int8 experts", "nf4": "nf4 experts",
        "offload": "bf16, --offload experts", "offload-host": "the same, misses computed on the CPU"}


def row(name: str, path: Path) -> str:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        err = path.with_suffix(".err")
        last = err.read_text().strip().splitlines()[-1:] if err.exists() else []
        said = (last or ["no output"])[0][:100]
        return f"| {ROWS[name]} | {'' if said.startswith('skipped') else 'failed: '}{said} | | | | | |"
    o = r["results"][0]
    cache = r.get("expert_cache")
    hit = f"{cache['hit_rate']:.0%} of {cache['hits'] + cache['misses']}" if cache else "-"
    if cache and cache.get("computed_on_host"):
        hit += f" ({cache['computed_on_host']} misses on the CPU)"
    roofline = (f"{o['roofline_pct']:.0f}% of {r['bandwidth_bytes_s'] / 1e9:.0f} GB/s, "
                f"{r['active_bytes_per_token'] / 1e9:.2f} GB/token")
    return (f"| {ROWS[name]} | {o.get('decode_kernel') or '-'} | {o['decode_tok_s']:.1f} | {o['prefill_tok_s']:.0f} "
            f"| {o['peak_memory_bytes'] / 2**30:.1f} GiB | {roofline} | {hit} |")


def main(folder: str) -> None:
    out = Path(folder)
    first = next((json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json")) if p.stat().st_size), None)
    if first:
        print(f"{first['shape']} ({first['config']['num_hidden_layers']} layers), {first['device']}, "
              f"prompt {first['prompt_tokens']}; {first['machine']}; torch {first['versions']['torch']}")
    print("| setting | decode path | decode tok/s | prefill tok/s | peak memory | % of the memory roofline "
          "| expert-cache hits |")
    print("|---|---|--:|--:|--:|---|---|")
    for name in ROWS:
        print(row(name, out / f"bench-{name}.json"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check-out")
