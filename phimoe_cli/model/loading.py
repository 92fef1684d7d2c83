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
from pathlib import Path

import torch

from .config import ConfigError, PhimoeConfig
from .layers import LongRoPE
from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file or tensor."""


def resolve_dtype(dtype: str | torch.dtype, config: PhimoeConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        name = config.torch_dtype if config is not None else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose auto, bfloat16, float16 or float32")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: choose cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: choose cpu or cuda")
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


def _targets(model: torch.nn.Module, config: PhimoeConfig) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Checkpoint tensor name -> (destination parameter, expert index or None)."""
    targets: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, param in model.named_parameters():
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            prefix, w = name.rsplit(".", 1)
            for e in range(config.num_local_experts):
                targets[f"{prefix}.{e}.{w}.weight"] = (param, e)
        else:
            targets[name] = (param, None)
    if config.tie_word_embeddings and "lm_head.weight" in targets:
        del targets["lm_head.weight"]
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

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}

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
    model: torch.nn.Module, path: str | Path, config: PhimoeConfig, progress: bool | None = None
) -> None:
    """Fill ``model``'s (already allocated) parameters from the checkpoint in ``path``."""
    path = Path(path)
    files = weight_files(path)
    targets = _targets(model, config)
    seen: set[str] = set()
    total = sum((path / f).stat().st_size for f in files)
    with _progress(total, progress, "Loading weights") as advance:
        for file, listed in files.items():
            f = SafetensorsFile(path / file)
            try:
                _load_file(f, listed, targets, seen, advance)
            finally:
                f.close()
    missing = [n for n in targets if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight


def _load_file(f: SafetensorsFile, listed, targets, seen: set[str], advance) -> None:
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
        dest, expert = targets[name]
        want = tuple(dest.shape[1:] if expert is not None else dest.shape)
        if shape != want:
            raise CheckpointError(
                f"{f.path}: tensor {name} has shape {list(shape)}, expected {list(want)} from config.json"
            )
        if not dtype.is_floating_point:
            raise CheckpointError(f"{f.path}: tensor {name} has dtype {dtype}, expected floats")
        source = f.tensor(name)
        with torch.no_grad():
            (dest[expert] if expert is not None else dest).copy_(source)
        del source
        f.release(name)
        seen.add(name)
        advance(math.prod(shape) * dtype.itemsize)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_empty(cls, config: PhimoeConfig, dtype: torch.dtype, device: torch.device):
    """The model with uninitialised storage in ``dtype`` on ``device`` (nothing is computed)."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    # non-persistent buffers do not survive to_empty: rebuild the rotary tables (kept in float32)
    model.model.rotary_emb = LongRoPE(config).to(device)
    return model


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    cls=PhimoeForCausalLM,
):
    """Load a checkpoint directory (hub layout) into a model in eval mode.

    ``dtype``: auto (the config's torch_dtype), bfloat16, float16 or float32. ``device``: cpu or
    cuda. Raises CheckpointError (one line, naming the file or tensor) for a bad checkpoint and
    ValueError for a bad dtype or device.
    """
    config = load_config(path)
    torch_dtype = resolve_dtype(dtype, config)
    dev = resolve_device(device)
    model = build_empty(cls, config, torch_dtype, dev)
    load_weights(model, path, config, progress)
    return model.eval().requires_grad_(False)


def load_classifier(path: str | Path, dtype="float32", device="cpu", progress=None):
    return load_model(path, dtype, device, progress, cls=PhimoeForSequenceClassification)
