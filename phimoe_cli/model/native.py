"""The C decode step (native.c): built once with the host's C compiler, loaded with ctypes.

``library()`` compiles native.c with ``-O3 -march=native -fopenmp`` into a per-user cache
(``$PHIMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/phimoe``, else ~/.cache/phimoe), keyed by the
source, the flags and the CPU, so each machine builds it once (under a second). Where there is no
compiler, or the build fails, it returns None and the model decodes with the inductor kernels
(decode.py) instead. ``PHIMOE_NATIVE_CFLAGS`` replaces ``-march=native`` (tests build the AVX2 and
the plain-C variants that way). This module knows tensors and matrices, not the model: decode.py
hands it each layer's weights as a ``LayerWeights``.

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
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("native.c")
DEFAULT_FLAGS = "-march=native"
#: the most prompt rows for which amx_matmul beats torch's GEMM on bf16 weights, and dequantizing
#: quantized ones for it (measured: benchmarks/quant_matmul.py, real expert shapes)
AMX_MAX_ROWS, AMX_MAX_ROWS_QUANTIZED = 128, 256
#: the most prompt rows for which dpbf16_matmul beats torch's bfloat16 GEMM (oneDNN) without AMX
#: (measured: benchmarks/bf16_matmul.py, real expert shapes, a Zen 5 EPYC)
DPBF16_MAX_ROWS = 16


class Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "ffn", "experts", "top_k", "layers")] + [
        ("eps", ctypes.c_float), ("jitter_eps", ctypes.c_float), ("mscale", ctypes.c_float),
        ("cache_head_stride", ctypes.c_long),
    ]


BF16, INT8, Q4 = 0, 1, 2  # Mat.kind


class Mat(ctypes.Structure):
    """A weight matrix (or a stack of them) as the C step reads it: bfloat16, int8 rows with a
    float32 scale each, or 4-bit codes with a float32 absmax per 64 weights and an int8 codebook."""

    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("lut", ctypes.c_void_p), ("kind", ctypes.c_int)]


class LayerWeights(NamedTuple):
    """One decoder layer's weights, in the order of native.c's ``Layer``: bfloat16 vectors (norms,
    biases, the router), then the seven matrices (bfloat16 tensors or quantized matrices: anything
    ``matrix()`` reads); q/k/v/o [out, in], w1/w3 [experts, ffn, hidden], w2 [experts, hidden, ffn]."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    gate: torch.Tensor
    q: object
    k: object
    v: object
    o: object
    w1: object
    w2: object
    w3: object


VECTORS, MATRICES = LayerWeights._fields[:9], LayerWeights._fields[9:]


class Layer(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in VECTORS] + [(name, Mat) for name in MATRICES]
                + [("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)])


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); empty where
    there is no such file."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


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
    lib.phimoe_qlinear_scratch.restype = ctypes.c_long
    lib.phimoe_qlinear_scratch.argtypes = [ctypes.c_long, ctypes.c_long]
    lib.phimoe_qlinear.restype = None
    lib.phimoe_qlinear.argtypes = [ctypes.POINTER(Mat), ctypes.c_long] + [ctypes.c_void_p] * 3 + [
        ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    lib.phimoe_dequantize.restype = None
    lib.phimoe_dequantize.argtypes = [ctypes.POINTER(Mat)] + [ctypes.c_long] * 5 + [ctypes.c_void_p, ctypes.c_int]
    lib.phimoe_dequantize_bf16.restype = None
    lib.phimoe_dequantize_bf16.argtypes = lib.phimoe_dequantize.argtypes
    lib.phimoe_qmatmul_scratch.restype = ctypes.c_long
    lib.phimoe_qmatmul_scratch.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.phimoe_qmatmul.restype = None
    lib.phimoe_qmatmul.argtypes = [ctypes.POINTER(Mat)] + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_long] + [
        ctypes.c_void_p] * 3 + [ctypes.c_int]
    lib.phimoe_quantize_x.restype = None
    lib.phimoe_quantize_x.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p]
    lib.phimoe_bf16_matmul.restype = ctypes.c_int
    lib.phimoe_bf16_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [
        ctypes.c_int]
    lib.phimoe_dpbf16_matmul.restype = ctypes.c_int
    lib.phimoe_dpbf16_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int]
    lib.phimoe_amx_matmul.restype = ctypes.c_int
    lib.phimoe_amx_matmul.argtypes = [ctypes.POINTER(Mat)] + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_long] + [
        ctypes.c_void_p] * 2 + [ctypes.c_int]
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


def matrix(weight) -> tuple[Mat, tuple] | None:
    """``weight`` as the C step reads it, with the tensors it points to; None where it cannot:
    a bfloat16 tensor [.., n, K], or quantized matrices (quant.QuantizedMatrices: int8, or 4-bit
    with K a multiple of 64). On the CPU and contiguous."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype != torch.bfloat16:
            return None
        tensors, mat = (weight,), Mat(weight.data_ptr(), None, None, BF16)
    else:
        q, scale = getattr(weight, "qweight", None), getattr(weight, "scale", None)
        quant = getattr(weight, "quant_type", None)
        if q is None or scale is None or scale.dtype != torch.float32:
            return None
        if quant == "int8" and q.dtype == torch.int8:
            tensors, mat = (q, scale), Mat(q.data_ptr(), scale.data_ptr(), None, INT8)
        elif quant in ("nf4", "fp4") and q.dtype == torch.uint8 and weight.shape[1] % 64 == 0:
            tensors, mat = (q, scale, weight.lut), Mat(q.data_ptr(), scale.data_ptr(), weight.lut.data_ptr(), Q4)
        else:
            return None
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return mat, tensors


def layer_supported(weights: LayerWeights) -> bool:
    """Whether the C step reads every matrix of this layer (and its vectors are bfloat16)."""
    vectors = [t for t in weights[:9] if t is not None]
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in vectors)
            and all(matrix(m) is not None for m in weights[9:]))


class Decoder:
    """One-token steps through the C library: holds the layer pointers (rebuilt when the cache
    moves) and the scratch memory, and keeps alive the tensors they point to.

    ``config``: the model's (a PhimoeConfig); ``layers``: a LayerWeights per layer; ``norm``: the
    final norm's (weight, bias); ``inv_freq`` / ``mscale``: the rotary tables and scales by
    ``long`` (False: short factors, True: long ones)."""

    def __init__(self, lib: ctypes.CDLL, config, top_k: int, jitter_eps: float, layers: list[LayerWeights],
                 norm: tuple, inv_freq: dict, mscale: dict):
        self.lib = lib
        c = config
        self.dims = Dims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.intermediate_size, c.num_local_experts, top_k, c.num_hidden_layers,
                         c.rms_norm_eps, jitter_eps, 1.0, 0)
        self.weights = []  # per layer: (vectors, matrices, the tensors they point to)
        for w in layers:
            found = [matrix(m) for m in w[9:]]
            self.weights.append((w[:9], [m for m, _ in found], [t for _, ts in found for t in ts]))
        self.norm = norm
        self.inv_freq = {k: v.float().contiguous() for k, v in inv_freq.items()}
        self.mscale = dict(mscale)
        self.layers = (Layer * c.num_hidden_layers)()
        self._cache_key = None
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def _bind(self, cache) -> None:
        key = (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape, cache.k.stride())
        if key == self._cache_key:
            return
        self.dims.cache_head_stride = cache.k.stride(2)
        for i, (vectors, mats, _) in enumerate(self.weights):
            self.layers[i] = Layer(*(_ptr(t) for t in vectors), *mats,
                                   cache.k[i, 0].data_ptr(), cache.v[i, 0].data_ptr())
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


def qlinear(lib: ctypes.CDLL, x: torch.Tensor, weight, index: int = 0, bias: torch.Tensor | None = None):
    """One bfloat16 row times matrix ``index`` of ``weight`` (anything ``matrix()`` takes) by the C
    kernels: quantized weights against x quantized to int16 in blocks of 64, as the C step does."""
    found = matrix(weight)
    if found is None:
        raise ValueError("the C kernels cannot read this weight")
    mat, _ = found
    n, k = weight.shape[-2:] if isinstance(weight, torch.Tensor) else weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    scratch = torch.empty(lib.phimoe_qlinear_scratch(n, k), dtype=torch.uint8)
    lib.phimoe_qlinear(ctypes.byref(mat), index, _ptr(bias), x.contiguous().data_ptr(), y.data_ptr(), n, k,
                       scratch.data_ptr(), torch.get_num_threads())
    return y


def qmatmul(lib: ctypes.CDLL, x: torch.Tensor, weight, index: int = 0, bias: torch.Tensor | None = None):
    """``F.linear`` of many bfloat16 rows x [..., K] by matrix ``index`` of quantized ``weight``
    (the prompt's pass): integer products against x's rows quantized to int16 per 64, as the
    decode step multiplies one row. None where the C kernels cannot read ``weight``."""
    found = matrix(weight)
    if found is None or isinstance(weight, torch.Tensor):
        return None
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    threads = torch.get_num_threads()
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    scratch = torch.empty(lib.phimoe_qmatmul_scratch(rows.shape[0], k, threads), dtype=torch.uint8)
    lib.phimoe_qmatmul(ctypes.byref(found[0]), index, n, k, rows.data_ptr(), rows.shape[0], _ptr(bias), y.data_ptr(),
                       scratch.data_ptr(), threads)
    return y.reshape(*x.shape[:-1], n)


def amx_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight, index: int = 0, bias: torch.Tensor | None = None):
    """``F.linear`` of bfloat16 rows x [..., K] by matrix ``index`` of ``weight`` (bfloat16, or
    quantized matrices widened to bfloat16 in L1 as ``dequantize_rows`` widens them) with AMX
    tiles, summed in float32; None where it cannot run (no AMX, n not a multiple of 16, K of 32)."""
    found = matrix(weight)
    if found is None:
        return None
    n, k = weight.shape[-2:]
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    if not lib.phimoe_amx_matmul(ctypes.byref(found[0]), index, n, k, rows.data_ptr(), rows.shape[0], _ptr(bias),
                                 y.data_ptr(), torch.get_num_threads()):
        return None
    return y.reshape(*x.shape[:-1], n)


def bf16_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` of many bfloat16 rows x [..., K] by bfloat16 ``weight`` [n, K] (contiguous, CPU),
    summed in float32 by the C kernel and rounded once to bfloat16; None where it cannot run
    (no AVX2 build, K not a multiple of 16)."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    xs = torch.empty(rows.shape, dtype=torch.float32)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if not lib.phimoe_bf16_matmul(weight.data_ptr(), _ptr(bias), rows.data_ptr(), rows.shape[0], n, k, xs.data_ptr(),
                                  y.data_ptr(), torch.get_num_threads()):
        return None
    return y.to(torch.bfloat16).reshape(*x.shape[:-1], n)


def dpbf16_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` of bfloat16 rows x [..., K] by bfloat16 ``weight`` [n, K] (contiguous, CPU) with
    AVX512-BF16 dot products, summed in float32 and rounded once to bfloat16; None where it cannot
    run (a build without AVX512-BF16, K not a multiple of 32)."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    if not lib.phimoe_dpbf16_matmul(weight.data_ptr(), _ptr(bias), rows.data_ptr(), rows.shape[0], n, k, y.data_ptr(),
                                    torch.get_num_threads()):
        return None
    return y.reshape(*x.shape[:-1], n)


def dequantize_rows(lib: ctypes.CDLL, weight, index: int, start: int, end: int, out: torch.Tensor) -> bool:
    """Rows start..end of matrix ``index`` of quantized matrices ``weight`` as float32 values, or
    those values rounded to bfloat16, into ``out`` (contiguous, float32 or bfloat16, on the CPU);
    False where the C kernels cannot read ``weight``."""
    found = matrix(weight)
    if found is None or not out.is_contiguous() or out.dtype not in (torch.float32, torch.bfloat16):
        return False
    n, k = weight.shape
    fn = lib.phimoe_dequantize if out.dtype == torch.float32 else lib.phimoe_dequantize_bf16
    fn(ctypes.byref(found[0]), index, n, k, start, end, out.data_ptr(), torch.get_num_threads())
    return True


def quantize_activations(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] (bfloat16) as the C kernels quantize it: int16 q [K] and float32 scales d [ceil(K / 64)]."""
    k = x.numel()
    q, d = torch.empty(k, dtype=torch.int16), torch.empty((k + 63) // 64, dtype=torch.float32)
    scratch = torch.empty(lib.phimoe_qlinear_scratch(1, k), dtype=torch.uint8)
    lib.phimoe_quantize_x(x.contiguous().data_ptr(), k, q.data_ptr(), d.data_ptr(), scratch.data_ptr())
    return q, d


def linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of one bfloat16 row by the C kernel (weight: contiguous, on the CPU)."""
    n, k = weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    tmp = torch.empty(n, dtype=torch.float32)
    lib.phimoe_linear(weight.data_ptr(), _ptr(bias), x.contiguous().data_ptr(), y.data_ptr(), n, k, tmp.data_ptr(),
                      torch.get_num_threads())
    return y
