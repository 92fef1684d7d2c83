"""Expert offload: every expert's weights in host memory, the ones in use cached on the device.

Each layer keeps a small LRU cache of experts on the compute device (``capacity`` slots, at least
``top_k``); a token's chosen experts are copied in on a miss (from pinned memory when the device
is CUDA, so the copy is asynchronous), evicting the least recently used. Attention, router,
norms and embeddings stay on the device. The code is device-agnostic: with host and device both
"cpu" it runs, and is tested, without a GPU.

``PHIMOE_OFFLOAD_MISS=host`` (a measurement switch; ``copy`` is the default) computes a missed
expert of a few rows on the CPU from host memory instead of copying it in, as Fiddler does at
batch 1: the copy moves all of its weights over the bus for one row's product, the CPU reads
them at its memory's speed. Which wins depends on the bus and the host (benchmarks/gpu_check.sh
measures both).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

from phimoe_cli.errors import UsageError

from .kernels import prefill_linear
from .layers import ExpertGroup
from .memory import QUANT_BYTES, available_ram, expert_bytes, kv_bytes_per_token, parameter_counts

HOST_ROWS = 4  # PHIMOE_OFFLOAD_MISS=host: misses of at most this many rows are computed on the CPU


class OffloadedExperts(ExpertGroup):
    """The experts (same routing and dispatch as ``layers.Experts``) in host memory, with a
    per-layer LRU cache of the ones in use on the device."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, mapped: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = max(1, min(capacity, num_experts))
        self.device = torch.device(device)
        self.dtype = dtype
        self.mapped = mapped  # keep the checkpoint's memory-mapped tensors instead of copies in RAM
        shapes = {"w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn)}
        self.pinned: int | None = None  # the host address page-locked here (released by release())
        # plain attributes, not buffers: .to() / to_empty() never move the host copy to the device
        if mapped:
            self.host = {name: [None] * num_experts for name in shapes}
        elif self.device.type == "cuda":
            self.host, self.pinned = _page_locked_stacks(num_experts, shapes, dtype)
        else:
            self.host = {name: torch.empty(num_experts, *shape, dtype=dtype, device="cpu")
                         for name, shape in shapes.items()}
        miss = os.environ.get("PHIMOE_OFFLOAD_MISS", "copy")
        if miss not in ("copy", "host"):
            raise UsageError(f"PHIMOE_OFFLOAD_MISS must be copy or host, not {miss!r}")
        self.miss_on_host = miss == "host"
        self.shapes = shapes
        self.slots = {name: torch.empty(self.capacity, *shape, dtype=dtype, device=self.device)
                      for name, shape in shapes.items()}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        self.hits = self.misses = self.host_computed = 0

    def release(self) -> None:
        """Unlock the page-locked host memory, once copies from it are done (before the tensors
        are freed; also on deletion)."""
        if self.pinned is not None:
            with contextlib.suppress(Exception):  # (at interpreter exit the CUDA runtime may be gone)
                torch.cuda.synchronize(self.device)
            _unpin(self.pinned)
            self.pinned = None

    def __del__(self):
        self.release()

    def store(self, name: str, e: int, weight: torch.Tensor) -> bool:
        """Take expert ``e``'s matrix; True when the (memory-mapped) tensor itself is kept."""
        self.slot_of.pop(e, None)  # a cached copy would be stale
        if self.mapped:
            keep = weight.dtype == self.dtype and weight.device.type == "cpu"
            self.host[name][e] = weight if keep else weight.to(device="cpu", dtype=self.dtype, copy=True)
            return keep
        self.host[name][e].copy_(weight)
        return False

    def _slot(self, e: int) -> int:
        if e in self.slot_of:
            self.hits += 1
            self.slot_of.move_to_end(e)
            return self.slot_of[e]
        self.misses += 1
        if len(self.slot_of) < self.capacity:
            slot = len(self.slot_of)
        else:
            _, slot = self.slot_of.popitem(last=False)  # evict the least recently used
        for name, host in self.host.items():
            self.slots[name][slot].copy_(host[e], non_blocking=True)
        self.slot_of[e] = slot
        return slot

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.miss_on_host and e not in self.slot_of and x.shape[0] <= HOST_ROWS:
            self.misses += 1
            self.host_computed += 1
            w1, w2, w3 = (self.host[name][e] for name in ("w1", "w2", "w3"))
            h = x.to("cpu", self.dtype)
            y = prefill_linear(F.silu(prefill_linear(h, w1)) * prefill_linear(h, w3), w2)  # the CPU's fastest dtype
            return y.to(x.device, x.dtype)
        s = self._slot(e)
        w1, w2, w3 = self.slots["w1"][s], self.slots["w2"][s], self.slots["w3"][s]
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


PAGE = 4096


def _page_locked_stacks(num_experts: int, shapes: dict, dtype: torch.dtype) -> tuple[dict, int | None]:
    """The stacks [num_experts, *shape] as views of one page-aligned block of host memory, its
    whole pages locked at once (cudaHostRegister) so host-to-device copies are asynchronous;
    and the block's address, or None where locking failed (copies are then synchronous: slower,
    still correct). One block of whole pages: ranges that share a page with another locked one
    cannot be registered. (torch's pinned allocator would round each block up to a power of two:
    800 MiB of experts would lock 1 GiB.)"""
    item = torch.empty((), dtype=dtype).element_size()
    sizes = {name: num_experts * math.prod(shape) * item for name, shape in shapes.items()}
    span = -(-sum(sizes.values()) // PAGE) * PAGE
    raw = torch.empty(span + PAGE, dtype=torch.uint8)
    block = raw[(-raw.data_ptr()) % PAGE :][:span]
    host, offset = {}, 0
    for name, shape in shapes.items():
        host[name] = block[offset : offset + sizes[name]].view(dtype).view(num_experts, *shape)
        offset += sizes[name]
    try:
        locked = int(torch.cuda.cudart().cudaHostRegister(block.data_ptr(), span, 0)) == 0
    except Exception:
        locked = False
    if not locked:
        _clear_cuda_error()
    return host, block.data_ptr() if locked else None


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call that torch does not check (torch's
    next kernel launch would report it as its own)."""
    with contextlib.suppress(Exception), open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "libcudart.so" in line)
        ctypes.CDLL(path).cudaGetLastError()


def _unpin(address: int) -> None:
    # (at interpreter exit the CUDA runtime may be gone: the process's end unlocks the memory)
    with contextlib.suppress(Exception):
        if int(torch.cuda.cudart().cudaHostUnregister(address)) != 0:
            _clear_cuda_error()


def offload_stats(model) -> dict:
    """Expert cache hits and misses over all layers (empty if nothing is offloaded)."""
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    if not layers:
        return {}
    hits, misses = sum(m.hits for m in layers), sum(m.misses for m in layers)
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "capacity_per_layer": layers[0].capacity, "memory_mapped": layers[0].mapped,
            "computed_on_host": sum(m.host_computed for m in layers)}


def swap_in_offloaded(model, capacity: int, dtype: torch.dtype, device, mapped: bool) -> None:
    """Give a model built on the meta device offloaded experts, ``capacity`` per layer on
    ``device``; ``mapped``: they keep the checkpoint's memory-mapped tensors (offload "disk")."""
    c = model.config
    for layer in model.model.layers:
        layer.block_sparse_moe.experts = OffloadedExperts(
            c.num_local_experts, c.hidden_size, c.intermediate_size, capacity, dtype, device, mapped)


def capacity_for_budget(config, budget_bytes: int, dtype_bytes: int) -> int:
    """Experts per layer that fit ``budget_bytes`` of device memory after everything else."""
    dense = parameter_counts(config)["dense"] * dtype_bytes
    per_layer = (budget_bytes - dense) // (config.num_hidden_layers * expert_bytes(config, dtype_bytes))
    return int(max(config.num_experts_per_tok, min(config.num_local_experts, per_layer)))


def cache_capacity(config, dtype_bytes: int, device: torch.device, gpu_memory: int | None) -> int:
    """Experts per layer for ``--offload experts``: what ``gpu_memory`` bytes hold, or (None) 90%
    of the GPU's free memory; on the CPU without a budget, the top-k only."""
    budget = gpu_memory
    if budget is None and device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.9)
    return capacity_for_budget(config, budget or 0, dtype_bytes)


def plan_placement(config, dtype_bytes: int = 2, quantize: str = "none", gpu_memory: int | None = None,
                   kv_tokens: int = 4096, host_ram: int | None = None) -> dict:
    """Where ``--device auto`` puts the model: on the GPU if it all fits; on the GPU with experts
    offloaded to host memory if the rest fits; else on the CPU. Experts that do not fit host RAM
    either stay memory-mapped from the checkpoint files (offload "disk")."""
    counts = parameter_counts(config)
    weights = counts["dense"] * dtype_bytes + counts["experts"] * QUANT_BYTES.get(quantize, dtype_bytes)
    kv = kv_bytes_per_token(config, dtype_bytes) * kv_tokens
    active_experts = config.num_hidden_layers * config.num_experts_per_tok * expert_bytes(config, dtype_bytes)
    free = gpu_memory
    if free is None and torch.cuda.is_available():
        free = int(torch.cuda.mem_get_info()[0] * 0.9)
    plan = {"device": "cpu", "offload": "none", "experts_per_layer_on_gpu": None, "gpu_budget_bytes": free,
            "weights_bytes": int(weights), "kv_cache_bytes": kv}
    ram = host_ram if host_ram is not None else available_ram()
    if not free:
        plan["reason"] = "no CUDA GPU"
    elif weights + kv <= free:
        plan.update(device="cuda", reason="the whole model fits the GPU")
    elif quantize == "none" and counts["dense"] * dtype_bytes + kv + active_experts <= free:
        cap = capacity_for_budget(config, free - kv, dtype_bytes)
        plan.update(device="cuda", offload="experts", experts_per_layer_on_gpu=cap,
                    reason=f"attention, router and embeddings on the GPU; {cap} of {config.num_local_experts} "
                           "experts per layer cached there")
    else:
        plan["reason"] = "not even the non-expert weights fit the GPU"
    if quantize == "none" and ram is not None:
        on_host = counts["experts"] * dtype_bytes + (0 if plan["device"] == "cuda" else counts["dense"] * dtype_bytes)
        if plan["offload"] == "experts" and on_host > ram:
            plan.update(offload="disk", reason=plan["reason"] + "; the experts do not fit RAM and stay memory-mapped")
        elif plan["device"] == "cpu" and on_host > ram:
            plan.update(offload="disk", experts_per_layer_on_gpu=None,
                        reason=plan["reason"] + "; the model does not fit RAM: experts stay memory-mapped "
                                                "from the files")
    return plan
