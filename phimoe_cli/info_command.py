"""`phimoe info`: what a model needs, from config.json alone."""

from __future__ import annotations

import json

from phimoe_cli.hub import resolve_config
from phimoe_cli.info import report
from phimoe_cli.model.config import PhimoeConfig


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def run_info(model: str, *, revision=None, offline=None, context=4096, json_out=False, plan=False,
             quantize="none", gpu_memory=None) -> None:
    path = resolve_config(model, revision=revision, offline=offline)
    config = PhimoeConfig.from_file(path / "config.json")
    data = report(config, context=context)
    data["model"] = model
    if plan:
        from phimoe_cli.model.offload import plan_placement

        data["plan"] = plan_placement(config, 2, quantize, gpu_memory, kv_tokens=context)
    if json_out:
        print(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a, p = data["architecture"], data["parameters"]
    console.print(f"[bold]{model}[/bold]  ({path})")
    console.print(
        f"{a['layers']} layers, hidden {a['hidden_size']}, {a['attention_heads']} heads / {a['kv_heads']} KV heads "
        f"(head_dim {a['head_dim']}), {a['experts']} experts top-{a['experts_per_token']} "
        f"(ffn {a['intermediate_size']}), vocab {a['vocab_size']}, context {a['context_length']} "
        f"({a['rope']}, original {a['original_context_length']}), "
        f"stored as {a['dtype']}"
    )
    console.print(f"parameters: {_count(p['total'])} total, {_count(p['active_per_token'])} active per token "
                  f"({_count(p['experts'])} in experts)")
    kv = data["kv_cache_bytes_per_token"]
    console.print(f"KV cache: {_size(kv['bfloat16'])} per token in bfloat16")
    table = Table(title=f"Memory (weights + KV cache for {context} tokens)")
    table.add_column("weights as")
    table.add_column("weights", justify="right")
    table.add_column("with KV cache", justify="right")
    table.add_column("fits RAM", justify="center")
    gpus = data["machine"]["gpus"]
    for g in gpus:
        table.add_column(f"fits {g['name']}", justify="center")
    mark = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "?"}
    for name, m in data["memory"].items():
        fmt, _, rest = name.partition(" + ")  # "int8 + attention + head": int8 experts + attention + head
        label = name if fmt in ("float32", "bfloat16", "float16") else f"{fmt} experts" + (f" + {rest}" if rest else "")
        table.add_row(label, _size(m["bytes"]), _size(m["with_kv_cache_bytes"]), mark[m["fits_ram"]],
                      *(mark[f] for f in m["fits_gpu"]))
    console.print(table)
    ram = data["machine"]["ram_available_bytes"]
    console.print(f"this machine: {_size(ram)} RAM available"
                  + "".join(f", {g['name']} {_size(g['free_bytes'])} free" for g in gpus)
                  + ("" if gpus else ", no CUDA GPU"))
    console.print(f"[dim]{data['note']}[/dim]")
    if plan:
        p = data["plan"]
        on_gpu = p["experts_per_layer_on_gpu"]
        cached = f", {on_gpu} per layer cached on the GPU" if on_gpu else ""
        where = p["device"] + {"none": "", "experts": f" + experts in host RAM{cached}",
                               "disk": f" + experts memory-mapped from the files{cached}"}[p["offload"]]
        console.print(f"[bold]--device auto[/bold] (bfloat16, {quantize} experts): {where}: {p['reason']}")
