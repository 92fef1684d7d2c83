"""safetensors checkpoint -> PhimoeForCausalLM, tensor by tensor.

The model is built on the meta device, its storage allocated once in the target dtype and device,
and every checkpoint tensor is copied from the memory-mapped file straight into its place (dtype
conversion included): the weights are never held twice. Only safetensors are read: ``.bin``/``.pt`` pickles are never
opened, and no code from a checkpoint is ever run.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from phimoe_cli.errors import PhimoeError, UsageError

from . import decode, hugepages
from .config import ConfigError, PhimoeConfig, dtype_name
from .layers import LongRoPE
from .offload import OffloadedExperts, cache_capacity, plan_placement, swap_in_offloaded
from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification
from .quant import QUANT_TYPES, QuantizedExperts, QuantizedLinear, swap_in_quantized

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(PhimoeError, ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file or tensor."""


def resolve_dtype(dtype: str | torch.dtype, config: PhimoeConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype)
    if name == "auto":
        name = config.torch_dtype if config is not None else "bfloat16"
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}: choose cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported: choose cpu or cuda")
    return dev


def load_config(path: str | Path) -> PhimoeConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    try:
        return PhimoeConfig.from_file(path / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def weight_files(path: Path) -> dict[str, list[str] | None]:
    """The checkpoint's safetensors files, each with the tensors the index assigns to it (None
    for a single unindexed file)."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith("."):
                raise CheckpointError(f"{index}: tensor {name} points to an invalid file name {file!r}")
            files.setdefault(file, []).append(name)
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"{path / file}: missing (listed in {INDEX_FILE})")
        return files
    if (path / SINGLE_FILE).is_file():
        return {SINGLE_FILE: None}
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise CheckpointError(
            f"{path}: only pickled weights ({pickles[0]}); phimoe reads safetensors only and never unpickles"
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _targets(model: torch.nn.Module, config: PhimoeConfig, saved_quantized: bool = False) -> dict:
    """Checkpoint tensor name -> (expected shape, store function).

    The hub stores each expert as its own matrices (``experts.3.w1.weight``); here they land in a
    slot of the layer's stacked tensor, or are quantized into it. A checkpoint written by
    ``phimoe quantize`` holds the model's own tensors under their own names.
    """
    targets: dict[str, tuple[tuple[int, ...], object]] = {}
    if saved_quantized:
        for name, t in model.state_dict().items():
            if not name.endswith("inv_freq"):
                targets[name] = (tuple(t.shape), t.copy_)
        return _untie(targets, config)
    quantized = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            quantized.add(prefix)
        targets.update(_replaced_module_targets(prefix, module))
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            prefix, w = name.rsplit(".", 1)
            for e in range(config.num_local_experts):
                targets[f"{prefix}.{e}.{w}.weight"] = (tuple(param.shape[1:]), param[e].copy_)
        else:
            targets[name] = (tuple(param.shape), param.copy_)
    return _untie(targets, config)


def _replaced_module_targets(prefix: str, module: torch.nn.Module) -> dict:
    """The checkpoint tensors that a quantized or offloaded module stores its own way."""
    targets = {}
    if isinstance(module, QuantizedExperts):
        for w in ("w1", "w2", "w3"):
            matrices = getattr(module, w)
            for e in range(module.num_experts):
                targets[f"{prefix}.{e}.{w}.weight"] = (matrices.shape, partial(matrices.store, e))
    elif isinstance(module, OffloadedExperts):
        for w in ("w1", "w2", "w3"):
            for e in range(module.num_experts):
                targets[f"{prefix}.{e}.{w}.weight"] = (module.shapes[w], partial(module.store, w, e))
    elif isinstance(module, QuantizedLinear):
        targets[f"{prefix}.weight"] = (module.weight_q.shape, partial(module.weight_q.store, 0))
        if module.bias is not None:
            targets[f"{prefix}.bias"] = (tuple(module.bias.shape), module.bias.copy_)
    return targets


def _untie(targets: dict, config: PhimoeConfig) -> dict:
    if config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    return targets


@contextmanager
def _progress(total_bytes: int, enabled: bool | None, description: str) -> Iterator:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    ) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda n: bar.advance(task, n)


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors are zero-copy views into the mapping.

    The format is an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw data. Every entry is
    checked against the file's size before anything is read. After a tensor has been copied out,
    ``release`` drops its pages from this process's resident set (they stay in the page cache),
    so a load holds the destination weights plus at most one source tensor.
    """

    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views, never written
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise CheckpointError(f"{path}: cannot read ({_first_line(exc)})") from None
        size = len(self.map)
        n = int.from_bytes(self.map[:8], "little") if size >= 8 else -1
        if n < 2 or 8 + n > size:
            self.close()
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or bad header length)")
        try:
            header = json.loads(bytes(self.map[8 : 8 + n]).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            self.close()
            raise CheckpointError(f"{path}: not a valid safetensors file (unreadable header)") from None
        header.pop("__metadata__", None)
        self.base, data_len = 8 + n, size - 8 - n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype = self.DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
                numel = math.prod(shape)
                ok = 0 <= begin <= end <= data_len and end - begin == numel * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                self.close()
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (tensor {name}: bad entry or data past the end)"
                )
            self.entries[name] = (dtype, shape, begin)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.base + begin).view(shape)

    def release(self, name: str) -> None:
        dtype, shape, begin = self.entries[name]
        start = (self.base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self.base + begin + math.prod(shape) * dtype.itemsize
        if hasattr(mmap, "MADV_DONTNEED") and end > start:
            self.map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.map.close()


def load_weights(
    model: torch.nn.Module, path: str | Path, config: PhimoeConfig, progress: bool | None = None,
    saved_quantized: bool = False,
) -> None:
    """Fill ``model``'s (already allocated) parameters from the checkpoint in ``path``."""
    path = Path(path)
    files = weight_files(path)
    targets = _targets(model, config, saved_quantized)
    seen: set[str] = set()
    total = sum((path / f).stat().st_size for f in files)
    mapped = []  # files whose memory-mapped tensors the model keeps (offload "disk")
    with _progress(total, progress, "Loading weights") as advance:
        for file, listed in files.items():
            f = SafetensorsFile(path / file)
            kept = False
            try:
                kept = _load_file(f, listed, targets, seen, advance, saved_quantized)
            finally:
                if kept:
                    mapped.append(f)
                else:
                    f.close()
    model.mapped_files = mapped
    missing = [n for n in targets if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight


def _load_file(f: SafetensorsFile, listed, targets, seen: set[str], advance, saved_quantized: bool) -> bool:
    """Load one file's tensors; True when some are kept memory-mapped (the file must stay open)."""
    kept = False
    if listed is not None:
        absent = sorted(set(listed) - set(f.entries))
        if absent:
            raise CheckpointError(f"{f.path}: tensor {absent[0]} is listed in {INDEX_FILE} but not in the file")
    for name, (dtype, shape, _) in f.entries.items():
        if _IGNORED.search(name):
            continue
        if name not in targets:
            raise CheckpointError(f"{f.path}: unexpected tensor {name}")
        if name in seen:
            raise CheckpointError(f"{f.path}: tensor {name} appears in two files")
        want, store = targets[name]
        if shape != want:
            raise CheckpointError(
                f"{f.path}: tensor {name} has shape {list(shape)}, expected {list(want)} from config.json"
            )
        if not dtype.is_floating_point and not saved_quantized:
            raise CheckpointError(f"{f.path}: tensor {name} has dtype {dtype}, expected floats")
        source = f.tensor(name)
        with torch.no_grad():
            keep = store(source) is True
        del source
        if not keep:
            f.release(name)
        kept |= keep
        seen.add(name)
        advance(math.prod(shape) * dtype.itemsize)
    return kept


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


QUANT_FILE = "phimoe_quantization.json"


def build_empty(cls, config: PhimoeConfig, dtype: torch.dtype, device: torch.device,
                quantize: str = "none", quantize_attention: bool = False, offload_capacity: int | None = None,
                mapped: bool = False, quantize_head: bool = False):
    """The model with uninitialised storage in ``dtype`` on ``device`` (nothing is computed).
    With ``quantize``, the experts (with ``quantize_attention`` the attention projections, with
    ``quantize_head`` the output head, as int8) are quantized modules: the float weights are never
    allocated. With ``offload_capacity``, the
    experts live in host memory with that many per layer cached on ``device``."""
    with torch.device("meta"):
        model = cls(config).to(dtype=dtype)
        if quantize != "none":
            swap_in_quantized(model, quantize, quantize_attention, dtype, quantize_head)
        if offload_capacity is not None:
            swap_in_offloaded(model, offload_capacity, dtype, device, mapped)
    model = model._apply(lambda t: hugepages.empty_like(t, device))  # to_empty, in huge pages on the CPU
    # non-persistent buffers do not survive to_empty: rebuild the rotary tables (kept in float32)
    model.model.rotary_emb = LongRoPE(config).to(device)
    return model


def read_quantization(path: str | Path) -> dict | None:
    """The quantization a ``phimoe quantize`` checkpoint was written with (None for others)."""
    file = Path(path) / QUANT_FILE
    if not file.exists():
        return None
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
        if (info.get("format") != 1 or info.get("quantize") not in QUANT_TYPES
                or not isinstance(info.get("quantize_attention"), bool) or info.get("dtype") not in DTYPES
                or not isinstance(info.setdefault("quantize_head", False), bool)):  # absent: written before it existed
            raise ValueError
        return info
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: not a valid phimoe quantization file") from None


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    cls=PhimoeForCausalLM,
    quantize: str = "none",
    quantize_attention: bool = False,
    offload: str = "none",
    gpu_memory: int | None = None,
    quantize_head: bool = False,
):
    """Load a checkpoint directory (hub layout) into a model in eval mode.

    ``dtype``: auto (the config's torch_dtype), bfloat16, float16 or float32. ``device``: cpu or
    cuda. ``quantize``: none, int8, nf4 or fp4 experts, quantized tensor by tensor while loading
    (``quantize_attention``: q/k/v/o too; ``quantize_head``: the output head too, as int8).
    A checkpoint written by ``phimoe quantize`` loads as it was saved. ``offload="experts"`` keeps
    the experts in host memory and caches as many per layer on ``device`` as ``gpu_memory`` bytes
    allow (at least top-k); ``offload="disk"`` does the same but leaves the experts memory-mapped
    from the checkpoint files (read on demand; the OS page cache keeps what fits in RAM).
    ``device="auto"`` plans placement from free GPU memory. Raises CheckpointError
    (one line, naming the file or tensor) for a bad checkpoint and ValueError for bad options.
    """
    config = load_config(path)
    saved = read_quantization(path)
    if quantize not in ("none", *QUANT_TYPES):
        raise UsageError(f"unknown quantization {quantize!r}: choose none, {', '.join(QUANT_TYPES)}")
    if saved is not None:
        if quantize not in ("none", saved["quantize"]):
            raise UsageError(f"{path} is already quantized ({saved['quantize']}); load it without --quantize")
        for flag, asked, done in (("--quantize-attention", quantize_attention, saved["quantize_attention"]),
                                  ("--quantize-head", quantize_head, saved["quantize_head"])):
            if asked and not done:
                raise UsageError(f"{path} was quantized without {flag}; load it without {flag} "
                                 "(or quantize the original again with it)")
        quantize, quantize_attention = saved["quantize"], saved["quantize_attention"]
        quantize_head = saved["quantize_head"]
        if dtype == "auto":
            dtype = saved["dtype"]
    elif quantize == "none" and (quantize_attention or quantize_head):
        flag = "--quantize-attention" if quantize_attention else "--quantize-head"
        raise UsageError(f"{flag} needs --quantize int8, nf4 or fp4")
    torch_dtype = resolve_dtype(dtype, config)
    if device == "auto":
        plan = plan_placement(config, torch_dtype.itemsize, quantize, gpu_memory)
        device = plan["device"]
        if plan["offload"] != "none" and offload == "none":
            offload = plan["offload"]
    dev = resolve_device(device)
    capacity = None
    if offload not in ("none", "experts", "disk"):
        raise UsageError(f"unknown offload {offload!r}: choose none, experts or disk")
    if offload != "none":
        if quantize != "none":
            raise UsageError("--offload works with unquantized experts for now (use one or the other)")
        capacity = cache_capacity(config, torch_dtype.itemsize, dev, gpu_memory)
    model = build_empty(cls, config, torch_dtype, dev, quantize, quantize_attention, capacity, offload == "disk",
                        quantize_head)
    load_weights(model, path, config, progress, saved_quantized=saved is not None)
    model.quantization = {"quantize": quantize, "quantize_attention": quantize_attention,
                          "quantize_head": quantize_head}
    model = model.eval().requires_grad_(False)
    if isinstance(model, PhimoeForCausalLM):
        decode.choose(model)  # its one-token back-end, now that the weights are in place
    return model


def load_classifier(path: str | Path, dtype="float32", device="cpu", progress=None):
    return load_model(path, dtype, device, progress, cls=PhimoeForSequenceClassification)
