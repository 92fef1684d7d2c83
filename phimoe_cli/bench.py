"""`phimoe bench`: prefill and decode speed of a PhiMoE of a named shape, with random weights.

Like llama-bench, nothing is downloaded: the model is built directly in the target dtype and
device with random weights (speed does not depend on their values). One run measures

* prefill: one forward pass over a ``-p``-token prompt into an empty KV cache;
* decode: ``-n`` single-token steps after it, each as ``phimoe generate`` runs them
  (``model(token, cache=cache, logits_to_keep=1)`` and an argmax that reads the result back);
* the machine's read bandwidth, read just before each timed run, which gives the roofline: batch-1
  decoding must read every active weight once per token, so it cannot beat
  ``bandwidth / active bytes per token``.

``--compare transformers`` runs transformers' PhimoeForCausalLM on the very same weights (shared,
not copied, where the layouts agree) in the same process. Timings are the best of ``--repeat``
runs: other processes on the machine only ever make a run slower.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from phimoe_cli import __version__
from phimoe_cli.errors import PhimoeError, UsageError, report
from phimoe_cli.model import PhimoeConfig, PhimoeForCausalLM, decode, hugepages, native
from phimoe_cli.model.decode import matvec
from phimoe_cli.model.kernels import prefill_dtype
from phimoe_cli.model.loading import build_empty, resolve_device, resolve_dtype
from phimoe_cli.model.memory import QUANT_BYTES, active_bytes, available_ram, weight_bytes
from phimoe_cli.model.native import cpuinfo
from phimoe_cli.model.offload import OffloadedExperts, cache_capacity, offload_stats
from phimoe_cli.model.quant import quantize_in_place

SHAPES: dict[str, dict] = {
    # the published Phi-3.5-MoE-instruct dimensions (42B parameters; use --layers to fit memory)
    "phi-3.5-moe": dict(),
    "mid": dict(
        hidden_size=1024, intermediate_size=1600, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, vocab_size=32064,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=1024,
        eos_token_id=2,
    ),
}
COMPARE = ("transformers",)


def shape_config(shape: str, layers: int | None = None) -> PhimoeConfig:
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}: choose {', '.join(SHAPES)}")
    overrides = dict(SHAPES[shape])
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    return PhimoeConfig(**overrides)


# ------------------------------------------------------------------------------- random weights
def random_model(config: PhimoeConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 offload_capacity: int | None = None):
    """A PhimoeForCausalLM with random weights, built in place (no float32 copy, no file); with
    ``offload_capacity``, its experts in host memory and that many per layer cached on ``device``."""
    torch.manual_seed(seed)
    model = build_empty(PhimoeForCausalLM, config, dtype, device, offload_capacity=offload_capacity)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OffloadedExperts):  # its host copies are plain tensors, not parameters
                for t in module.host.values():
                    t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]))
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm"):
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BandwidthProbe:
    """Bytes per second that streaming reads achieve here, so decode speed is judged against what
    the memory delivers at that moment: a sum over a float32 tensor and, on the CPU, a bfloat16
    matrix-vector product as decoding does it (the C kernel where it builds, else the compiled
    one); the faster of the two (best of ``repeat`` each) counts. ``nbytes`` each, allocated
    once, as the model's weights are (hugepages.py), so a probe can run between the timed runs;
    ``resident`` is what it holds."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20, repeat: int = 3):
        self.device, self.nbytes, self.repeat = device, nbytes, repeat
        self.x = hugepages.empty_like(torch.empty(nbytes // 4, device="meta"), device).fill_(1)
        self.w = self.v = self.lib = None
        if device.type == "cpu":
            self.w = hugepages.empty((nbytes // 2 // 4096, 4096), torch.bfloat16).fill_(1)
            self.v = torch.ones(1, 1, 4096, dtype=torch.bfloat16)
            self.lib = native.library()
        self.resident = nbytes * (2 if self.w is not None else 1)

    def __call__(self) -> float:
        best = _best_time(lambda: self.x.sum().item(), self.device, self.repeat)
        if self.w is not None:
            lib, v, w = self.lib, self.v, self.w
            with torch.inference_mode():
                product = (lambda: native.linear(lib, v, w)) if lib is not None else (lambda: matvec(v, w))
                best = min(best, _best_time(product, self.device, self.repeat))
        return self.nbytes / best


def _best_time(fn, device: torch.device, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat + 1):  # the first run warms up
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


class PeakMemory:
    """Peak memory over a ``with`` block: allocated device memory on CUDA; on CPU the process's
    peak resident set (VmHWM, reset on entry where Linux allows it)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _vm_hwm()


def _vm_hwm() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class EngineResult:
    engine: str
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float
    peak_memory_bytes: int
    roofline_pct: float = 0.0
    warmup_s: float = 0.0  # the untimed first run, compile time included
    decode_kernel: str | None = None  # phimoe: native, compiled, static or eager
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    read_bytes_s: list[float] = field(default_factory=list)  # the probe's reading before each timed run


class _Ours:
    name = "phimoe"

    def __init__(self, model: PhimoeForCausalLM, capacity: int):
        self.model, self.cache = model, model.new_cache(1, capacity)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        return self.model(ids, cache=self.cache, logits_to_keep=1)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=self.cache, logits_to_keep=1)

    @property
    def decode_kernel(self) -> str | None:
        return decode.kind(self.model)


class _Transformers:
    name = "transformers"
    decode_kernel = None

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache_cls, self.cache = model, DynamicCache, None
        self.new_kwarg = "cache" in inspect.signature(model.forward).parameters

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache = self.cache_cls(config=self.model.config)
        return self.step(ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        # transformers 5.x renamed past_key_values to cache
        kwargs = {"cache" if self.new_kwarg else "past_key_values": self.cache}
        return self.model(ids, use_cache=True, logits_to_keep=1, **kwargs).logits


def time_engine(engine, prompt: torch.Tensor, steps: torch.Tensor, repeat: int, device,
                probe: BandwidthProbe | None = None) -> EngineResult:
    """Prefill ``prompt`` then decode ``steps`` one token at a time, ``repeat`` times (after one
    warm-up run); the best time of each phase counts. ``probe``: read the memory's bandwidth
    before each timed run (its memory, allocated before, is left out of the peak)."""
    prefill_s, decode_s, read_bytes_s = [], [], []
    with torch.inference_mode(), PeakMemory(device) as mem:
        for r in range(repeat + 1):
            if r and probe is not None:
                read_bytes_s.append(probe())
            _sync(device)
            t0 = time.perf_counter()
            logits = engine.prefill(prompt)
            int(logits[0, -1].float().argmax())
            t1 = time.perf_counter()
            for i in range(steps.shape[1]):
                logits = engine.step(steps[:, i : i + 1])
                int(logits[0, -1].float().argmax())  # what generate does: the next token is read back
            t2 = time.perf_counter()
            if r:  # run 0 is the warm-up (and compiles the decode kernels where they are used)
                prefill_s.append(t1 - t0)
                decode_s.append(t2 - t1)
            else:
                warmup_s = t2 - t0
    n_prompt, n_gen = prompt.shape[1], steps.shape[1]
    best_prefill, best_decode = min(prefill_s), min(decode_s)
    return EngineResult(
        engine=engine.name,
        prefill_tok_s=n_prompt / best_prefill,
        decode_tok_s=n_gen / best_decode if n_gen else 0.0,
        ms_per_token=1000 * best_decode / n_gen if n_gen else 0.0,
        peak_memory_bytes=max(0, mem.peak - (probe.resident if probe is not None else 0)),
        warmup_s=warmup_s,
        decode_kernel=engine.decode_kernel,
        prefill_s=prefill_s,
        decode_s=decode_s,
        read_bytes_s=read_bytes_s,
    )


# -------------------------------------------------------------------------------- transformers
def transformers_model(model: PhimoeForCausalLM):
    """transformers' PhimoeForCausalLM holding ``model``'s weights (shared storage, except the
    expert gate/up projections, which transformers keeps concatenated)."""
    import transformers

    config = model.config
    p = model.lm_head.weight
    tconfig = transformers.PhimoeConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        ref = transformers.PhimoeForCausalLM(tconfig)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".experts.w1" in name or ".experts.w3" in name:
            continue
        if ".experts.w2" in name:
            prefix = name.rsplit(".", 1)[0].replace("block_sparse_moe", "mlp")
            w1, w3 = (model.get_parameter(name[:-1] + k) for k in "13")
            state[f"{prefix}.gate_up_proj"] = torch.cat([w1, w3], dim=1)
            state[f"{prefix}.down_proj"] = tensor
            continue
        state[name.replace("block_sparse_moe.gate", "mlp.router")] = tensor
    ref.load_state_dict(state, strict=False, assign=True)
    # buffers (the rotary tables) were never materialised on the meta device: rebuild them
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=tconfig)
    missing = [n for n, t in ref.named_parameters() if t.is_meta]
    if missing:
        raise RuntimeError(f"transformers model has unset parameters: {missing[:3]}")
    return ref.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------- run
def _check_options(quantize, quantize_attention, quantize_head, compare, offload, prompt_tokens, gen_tokens,
                   repeat) -> None:
    if quantize not in ("none", *QUANT_BYTES):
        raise UsageError(f"--quantize: unknown {quantize!r} (choose none, {', '.join(QUANT_BYTES)})")
    for flag, given in (("--quantize-attention", quantize_attention), ("--quantize-head", quantize_head)):
        if given and quantize == "none":
            raise UsageError(f"{flag} needs --quantize int8, nf4 or fp4")
    if quantize != "none" and compare is not None:
        raise UsageError("--compare runs on unquantized weights: use it without --quantize")
    if compare is not None and compare not in COMPARE:
        raise UsageError(f"--compare: unknown engine {compare!r} (choose {', '.join(COMPARE)})")
    if offload not in ("none", "experts"):
        raise UsageError(f"--offload: phimoe bench runs none or experts, not {offload!r}")
    if offload != "none" and (quantize != "none" or compare is not None):
        raise UsageError("--offload works with unquantized experts, without --compare")
    if prompt_tokens < 1 or gen_tokens < 0 or repeat < 1:
        raise UsageError("-p must be >= 1, -n >= 0 and --repeat >= 1")


def run(
    shape: str = "mid",
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    dtype: str = "bfloat16",
    device: str = "cpu",
    threads: int | None = None,
    repeat: int = 3,
    layers: int | None = None,
    compare: str | None = None,
    seed: int = 0,
    quantize: str = "none",
    quantize_attention: bool = False,
    offload: str = "none",
    gpu_memory: int | None = None,
    quantize_head: bool = False,
) -> dict:
    _check_options(quantize, quantize_attention, quantize_head, compare, offload, prompt_tokens, gen_tokens, repeat)
    if threads is not None:
        torch.set_num_threads(threads)
    config = shape_config(shape, layers)
    torch_dtype = resolve_dtype(dtype, config)
    dev = resolve_device(device)
    need = weight_bytes(config, torch_dtype.itemsize)
    available = _available_memory(torch.device("cpu") if offload == "experts" else dev)  # offload: host RAM
    if available is not None and need > available:
        raise UsageError(
            f"shape {shape} needs {_gib(need)} of weights in {str(torch_dtype).removeprefix('torch.')}, "
            f"{_gib(available)} is available:"
            f" use --layers N to keep fewer layers"
        )
    if compare == "transformers":
        import transformers  # noqa: F401  (imported before any measurement)

    probe = BandwidthProbe(dev)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (1, prompt_tokens + gen_tokens), generator=g).to(dev)
    prompt, steps = tokens[:, :prompt_tokens], tokens[:, prompt_tokens:]

    capacity = cache_capacity(config, torch_dtype.itemsize, dev, gpu_memory) if offload == "experts" else None
    t = time.perf_counter()
    model = random_model(config, torch_dtype, dev, seed, capacity)
    if quantize != "none":
        quantize_in_place(model, quantize, quantize_attention, quantize_head)
    decode.choose(model)
    build_s = time.perf_counter() - t
    ours = _Ours(model, prompt_tokens + gen_tokens)
    results = [time_engine(ours, prompt, steps, repeat, dev, probe)]
    expert_cache = offload_stats(model) or None  # capacity, hits, misses, hit rate
    logit_diff = None
    if compare == "transformers":
        ref = _Transformers(transformers_model(model))
        with torch.inference_mode():  # the same weights must give the same logits
            logit_diff = (ours.prefill(prompt).float() - ref.prefill(prompt).float()).abs().max().item()
        del model, ours
        gc.collect()
        results.append(time_engine(ref, prompt, steps, repeat, dev, probe))
        del ref
    gc.collect()

    del probe
    context = prompt_tokens + (gen_tokens - 1) / 2  # mean tokens attended over the decode steps
    active = active_bytes(config, torch_dtype.itemsize, context, quantize, quantize_attention, quantize_head)
    # each timed run against the bandwidth read just before it (a fast minute and a slow one are
    # not mixed); the median run counts
    readings = [bw for r in results for bw in r.read_bytes_s]
    bandwidth = statistics.median(readings)
    roofline = bandwidth / active
    for r in results:
        if gen_tokens:
            r.roofline_pct = statistics.median(100 * gen_tokens / d * active / bw
                                               for d, bw in zip(r.decode_s, r.read_bytes_s, strict=True))
    out = {
        "shape": shape,
        "config": {k: getattr(config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size")},
        "dtype": str(torch_dtype).removeprefix("torch."),
        "quantize": quantize,
        "quantize_attention": quantize_attention,
        "quantize_head": quantize_head,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeat": repeat,
        "weight_bytes": need,
        "build_s": build_s,
        "active_bytes_per_token": active,
        "bandwidth_bytes_s": bandwidth,
        "bandwidth_method": "best read of 256 MiB, float32 sum or bfloat16 matrix-vector product, "
                            "before each timed run (median)",
        "roofline_tok_s": roofline,
        "prefill_compute_dtype": str(prefill_dtype(torch_dtype, dev)).removeprefix("torch."),
        "offload": offload,
        "expert_cache": expert_cache,
        "results": [asdict(r) for r in results],
        "versions": _versions(compare),
        "machine": _machine(dev),
    }
    if len(results) == 2:
        a, b = results
        out["max_abs_logit_diff"] = logit_diff
        out["ratios"] = {
            "prefill": a.prefill_tok_s / b.prefill_tok_s,
            "decode": a.decode_tok_s / b.decode_tok_s if b.decode_tok_s else None,
        }
    return out


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_ram()


def _versions(compare: str | None) -> dict:
    out = {"phimoe": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if compare == "transformers":
        import transformers

        out["transformers"] = transformers.__version__
    return out


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}"


def _quantized_what(result: dict) -> str:
    if result.get("quantize", "none") == "none":
        return ""
    parts = [f"{result['quantize']} experts"] + ["attention"] * bool(result.get("quantize_attention"))
    parts += ["an int8 head"] * bool(result.get("quantize_head"))
    return " with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------- output
def render(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    c = result["config"]
    title = (
        f"{result['shape']} ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_local_experts']} experts top-{c['num_experts_per_tok']}), {result['dtype']}"
        f"{_quantized_what(result)}, "
        f"{result['device']}, {result['threads']} threads, p={result['prompt_tokens']} "
        f"n={result['gen_tokens']}, best of {result['repeat']}"
    )
    table = Table(title=title)
    for col in ("engine", "prefill tok/s", "decode tok/s", "ms/token", "peak RSS", "% roofline", "warm-up s"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in result["results"]:
        table.add_row(
            r["engine"], f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
            f"{r['ms_per_token']:.2f}", _gib(r["peak_memory_bytes"]), f"{r['roofline_pct']:.0f}%",
            f"{r['warmup_s']:.1f}",
        )
    console.print(table)
    used = result["results"][0]["decode_kernel"]
    kernel = {"native": "C decode step (native.c)", "compiled": "compiled one-token kernels",
              "static": "static step (a CUDA graph on CUDA)"}.get(used, used or "-")
    console.print(f"phimoe decode path: {kernel} (PHIMOE_DECODE_KERNEL=native|compiled|static|eager to choose)")
    if "prefill_compute_dtype" in result:
        console.print(
            f"phimoe prefill multiplies in {result['prefill_compute_dtype']}"
            " (PHIMOE_PREFILL_DTYPE=auto|float32|native to choose)"
        )
    console.print(
        f"roofline: {result['active_bytes_per_token'] / 1e6:.1f} MB read per token at "
        f"{result['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({result['bandwidth_method']}) = "
        f"{result['roofline_tok_s']:.1f} tok/s; machine: {result['machine']}"
    )
    cache = result.get("expert_cache")
    if cache:
        console.print(f"offloaded experts: {cache['capacity_per_layer']} per layer on {result['device']}, hit rate "
                      f"{cache['hit_rate']:.0%} ({cache['hits']} hits, {cache['misses']} misses); the roofline "
                      "counts device memory only")
    if "ratios" in result:
        r = result["ratios"]
        decode = f"{r['decode']:.2f}x" if r["decode"] else "-"
        console.print(
            f"phimoe / transformers: prefill {r['prefill']:.2f}x, decode {decode} "
            f"(last-token logits differ by at most {result['max_abs_logit_diff']:.3g})"
        )


def main(as_json: bool = False, **options) -> int:
    """Run the benchmark and print it (a table, or one JSON object); returns the exit code."""

    try:
        result = run(**options)
    except PhimoeError as exc:
        return report(exc)
    if as_json:
        print(json.dumps(result))
    else:
        render(result)
    return 0
