"""The C decode step (native.c): built once with the host's C compiler, loaded with ctypes.

``library()`` compiles native.c with ``-O3 -march=native -fopenmp`` into a per-user cache
(``$PHIMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/phimoe``, else ~/.cache/phimoe), keyed by the
source, the flags and the CPU, so each machine builds it once (under a second). Where there is no
compiler, or the build fails, it returns None and the model decodes with the inductor kernels
(layers.one_token_layers) instead. ``PHIMOE_NATIVE_CFLAGS`` replaces ``-march=native`` (tests
build the AVX2 and the plain-C variants that way).

The library is linked against the OpenMP runtime PyTorch has already loaded (the same
``libgomp.so.1``), so it shares PyTorch's threads and honours ``torch.set_num_threads``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
DEFAULT_FLAGS = "-march=native"


class Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "ffn", "experts", "top_k", "layers")] + [
        ("eps", ctypes.c_float), ("jitter_eps", ctypes.c_float), ("mscale", ctypes.c_float),
        ("cache_head_stride", ctypes.c_long),
    ]


LAYER_FIELDS = ("ln1_w", "ln1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
                "ln2_w", "ln2_b", "gate", "w1", "w2", "w3", "s1", "s2", "s3", "k_cache", "v_cache")


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in LAYER_FIELDS]


def cache_dir() -> Path:
    if os.environ.get("PHIMOE_CACHE_DIR"):
        return Path(os.environ["PHIMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phimoe"


def build(flags: str | None = None) -> Path:
    """Compile native.c (if not already in the cache) and return the shared library's path.
    Raises OSError / subprocess.CalledProcessError when it cannot be built."""
    flags = flags if flags is not None else os.environ.get("PHIMOE_NATIVE_CFLAGS", DEFAULT_FLAGS)
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (cc / gcc)")
    from .kernels import cpuinfo

    cpu = cpuinfo().get("flags") or cpuinfo().get("Features") or ""
    key = hashlib.sha256("\0".join((SOURCE.read_text(), compiler, flags, cpu)).encode()).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", *flags.split(), "-fopenmp", "-fPIC", "-shared", "-o", str(out), str(SOURCE), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: concurrent builders never see half a file
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.phimoe_native_isa.restype = ctypes.c_char_p
    lib.phimoe_scratch_bytes.restype = ctypes.c_long
    lib.phimoe_scratch_bytes.argtypes = [ctypes.POINTER(Dims), ctypes.c_long]
    lib.phimoe_decode.restype = None
    lib.phimoe_decode.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(Layer), ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.phimoe_linear_int8.restype = None
    lib.phimoe_linear_int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                                               ctypes.c_int]
    lib.phimoe_linear.restype = None
    lib.phimoe_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def library(flags: str | None = None) -> ctypes.CDLL | None:
    """The loaded library, or None (with a warning) where it cannot be built here."""
    try:
        return load(build(flags))
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["?"]
        warnings.warn(f"native decode step unavailable, the C build failed: {last[0]}", stacklevel=2)
    except OSError as exc:
        warnings.warn(f"native decode step unavailable: {exc}", stacklevel=2)
    return None


def isa(lib: ctypes.CDLL) -> str:
    return lib.phimoe_native_isa().decode()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def expert_tensors(experts) -> tuple | None:
    """(w1, w2, w3, s1, s2, s3) of a layer's experts as the C step reads them: bfloat16 stacks and
    no scales, or int8 stacks and their float32 row scales; None for anything else."""
    from .layers import Experts
    from .quant import QuantizedExperts

    if type(experts) is Experts:
        stacks = (experts.w1, experts.w2, experts.w3)
        return (*stacks, None, None, None) if all(w.dtype == torch.bfloat16 for w in stacks) else None
    if type(experts) is QuantizedExperts and experts.w1.quant_type == "int8":
        m = (experts.w1, experts.w2, experts.w3)
        if all(q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32 for q in m):
            return (*(q.qweight for q in m), *(q.scale for q in m))
    return None


def supports(model) -> bool:
    """Whether the C step can run this model's one-token steps: on the CPU, contiguous, bfloat16
    attention/norms/router, plain attention projections, and bfloat16 or int8 experts (not 4-bit,
    not offloaded)."""
    from .layers import Linear

    c = model.config
    if (c.head_dim > 512 or c.num_attention_heads // c.num_key_value_heads > 16 or c.num_local_experts > 256
            or c.num_experts_per_tok > 64):
        return False
    tensors = [p for name, p in model.model.named_parameters() if ".experts." not in name]
    if any(t.dtype != torch.bfloat16 for t in tensors):
        return False
    for layer in model.model.layers:
        a, moe = layer.self_attn, layer.block_sparse_moe
        experts = expert_tensors(moe.experts)
        if experts is None or type(moe.gate) is not torch.nn.Linear or any(
                type(p) is not Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
            return False
        tensors += [t for t in experts if t is not None]
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


class Decoder:
    """Runs ``PhimoeModel``'s one-token steps through the C library: holds the layer pointers
    (rebuilt when the cache moves) and the scratch memory. It keeps the weight tensors it points
    to alive; after replacing a model's weights, call ``use_decode_kernel`` again."""

    def __init__(self, model, lib: ctypes.CDLL):
        self.lib = lib
        c = model.config
        moe = model.layers[0].block_sparse_moe
        self.dims = Dims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.intermediate_size, c.num_local_experts, moe.top_k, c.num_hidden_layers,
                         c.rms_norm_eps, moe.jitter_eps, 1.0, 0)
        self.weights = []
        for layer in model.layers:
            a, moe = layer.self_attn, layer.block_sparse_moe
            self.weights.append((layer.input_layernorm.weight, layer.input_layernorm.bias,
                                 a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                                 a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias,
                                 layer.post_attention_layernorm.weight, layer.post_attention_layernorm.bias,
                                 moe.gate.weight, *expert_tensors(moe.experts)))
        self.norm = (model.norm.weight, model.norm.bias)
        rope = model.rotary_emb
        self.inv_freq = {False: rope.short_inv_freq.float().contiguous(), True: rope.long_inv_freq.float().contiguous()}
        self.mscale = {False: rope.short_mscale, True: rope.long_mscale}
        self.layers = (Layer * c.num_hidden_layers)()
        self._cache_key = None
        self._scratch = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def accepts(x: torch.Tensor, cache) -> bool:
        """Whether this step can run here: one bfloat16 sequence, on the CPU."""
        return x.device.type == "cpu" and cache.k.dtype == torch.bfloat16 and cache.batch_size == 1

    def _bind(self, cache) -> None:
        key = (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape, cache.k.stride())
        if key == self._cache_key:
            return
        self.dims.cache_head_stride = cache.k.stride(2)
        for i, tensors in enumerate(self.weights):
            self.layers[i] = Layer(*(_ptr(t) for t in tensors), cache.k[i, 0].data_ptr(), cache.v[i, 0].data_ptr())
        need = self.lib.phimoe_scratch_bytes(ctypes.byref(self.dims), cache.k.shape[3])
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        self._cache_key = key

    def __call__(self, x: torch.Tensor, cache, start: int, position: int, long: bool) -> torch.Tensor:
        """x [1, 1, hidden] (the token's embedding) through every layer and the final norm; the
        token's keys and values go to cache row ``start``."""
        self._bind(cache)
        self.dims.mscale = self.mscale[long]
        x = x.contiguous()
        out = torch.empty_like(x)
        self.lib.phimoe_decode(ctypes.byref(self.dims), self.layers, x.data_ptr(), start + 1, position,
                               self.inv_freq[long].data_ptr(), self.norm[0].data_ptr(), self.norm[1].data_ptr(),
                               out.data_ptr(), self._scratch.data_ptr(), torch.get_num_threads())
        return out


def linear_int8(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One bfloat16 row times an int8 matrix with float32 row scales, as ``_weight_int8pack_mm``."""
    n, k = qweight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    tmp = torch.empty(n, dtype=torch.float32)
    lib.phimoe_linear_int8(qweight.data_ptr(), scale.data_ptr(), x.contiguous().data_ptr(), y.data_ptr(), n, k,
                           tmp.data_ptr(), torch.get_num_threads())
    return y


def linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of one bfloat16 row by the C kernel (weight: contiguous, on the CPU)."""
    n, k = weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    tmp = torch.empty(n, dtype=torch.float32)
    lib.phimoe_linear(weight.data_ptr(), _ptr(bias), x.contiguous().data_ptr(), y.data_ptr(), n, k, tmp.data_ptr(),
                      torch.get_num_threads())
    return y
