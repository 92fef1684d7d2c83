"""The one-token decode back-ends, chosen once per model from outside it.

The model (layers.py, phimoe.py) is the reference math and runs every shape. Decoding one token
on the CPU is a different problem: batch-1 products read every active weight once, so speed is
memory bandwidth, and every small operation costs microseconds of dispatch. A back-end runs a
whole one-token step (every layer and the final norm) and the output head its own way:

* ``native``: the C step (native.py), one call per token, for bfloat16 models on the CPU with
  bfloat16, int8 or 4-bit experts and attention projections.
* ``compiled``: inductor kernels written as float32 reductions; a group of layers per compiled
  call where every layer is plain bfloat16/float32, else the plain parts of each layer.
* ``static``: for CUDA, the one-token step with fixed shapes and no host-device sync (the
  routing stays on the device; the chosen experts are read from the stacks by grouped products,
  quantized ones by index inside compiled products),
  captured once as a CUDA graph and replayed per token. Elsewhere (tests) it runs uncaptured.
* ``eager``: no back-end; the model's own forward.

``choose(model, kind)`` sets ``model.model.decode_step`` (None for eager); ``PhimoeModel.forward``
hands it one-token steps that it ``accepts``. Every compiled function has an eager twin with the
same meaning: where compiling is impossible (no C++ compiler), the twin takes over for good.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from phimoe_cli.errors import UsageError

from . import native
from .layers import Experts, Linear, apply_rope, combine_chosen, sparsemixer

KINDS = ("native", "compiled", "static", "eager")
DECODE_GROUP = 4  # most layers per compiled call: 4 measured ~5% faster than 1; compiling takes ~4x longer


def choose(model, kind: str | bool | None = None, lib=None) -> str:
    """Give ``model`` (a PhimoeForCausalLM) its one-token back-end and return its kind.

    ``kind``: native, compiled, static or eager (True: compiled, False: eager); None:
    ``PHIMOE_DECODE_KERNEL`` if set, else on CUDA the captured static step where it can run,
    else on the CPU the C step where it can run, else the compiled kernels for models of 256 MiB
    or more on the CPU (where bandwidth dominates and the one-off compile, a few seconds, pays
    off), else eager. Where ``native`` cannot run (no C compiler, float32 weights, offloaded
    experts) the compiled kernels take over; where ``static`` cannot, eager. ``lib``: a
    particular build of the C library (tests). Call it again after replacing a model's weights:
    the C step points at the tensors it was given."""
    kind = {True: "compiled", False: "eager"}.get(kind, kind)
    if kind is None:
        kind = os.environ.get("PHIMOE_DECODE_KERNEL", "auto")
        if kind not in KINDS:
            kind = _default(model)
    if kind not in KINDS:
        raise UsageError(f"unknown decode kernel {kind!r} (native, compiled, static or eager)")
    step = None
    if kind == "static":
        model.model.decode_step = StaticStep() if supports_static(model) else None
        return kind if model.model.decode_step is not None else "eager"
    if kind == "native":
        lib = lib or native.library()
        step = NativeStep(model, lib) if lib is not None and supports_native(model) else None
    if kind != "eager" and step is None:
        step = CompiledStep(model)
    model.model.decode_step = step
    return step.kind if step is not None else "eager"


def kind(model) -> str:
    """The back-end ``choose`` gave ``model``: native, compiled, static or eager (or what a static
    step fell back to)."""
    step = getattr(model.model, "decode_step", None)
    return step.kind if step is not None else "eager"


def _default(model) -> str:
    p = model.model.embed_tokens.weight
    if p.device.type != "cpu":
        return "static" if p.device.type == "cuda" and supports_static(model) else "eager"
    if supports_native(model) and native.library() is not None:
        return "native"
    size = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))  # quantized weights are buffers
    return "compiled" if size >= 256 << 20 else "eager"


# ------------------------------------------------------------------------------------ the C step
def layer_weights(layer) -> native.LayerWeights | None:
    """A decoder layer's tensors as the C step reads them (matrices: bfloat16 tensors or quantized
    matrices), or None if a part of it is something else (offloaded experts, a custom router)."""
    a, moe = layer.self_attn, layer.block_sparse_moe
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    if type(moe.gate) is not torch.nn.Linear or not all(hasattr(moe.experts, w) for w in ("w1", "w2", "w3")):
        return None
    return native.LayerWeights(
        ln1.weight, ln1.bias, a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias, ln2.weight, ln2.bias,
        moe.gate.weight, *(_weight(getattr(a, f"{n}_proj")) for n in "qkvo"),
        moe.experts.w1, moe.experts.w2, moe.experts.w3,
    )


def _weight(linear):
    """The weight of a plain or quantized linear layer: a tensor or quantized matrices."""
    return linear.weight_q if hasattr(linear, "weight_q") else linear.weight


def supports_native(model) -> bool:
    """Whether the C step can run this model's one-token steps: on the CPU, contiguous, bfloat16
    norms/router/embeddings, and bfloat16, int8 or 4-bit attention projections and experts."""
    c = model.config
    if (c.head_dim > 512 or c.num_attention_heads // c.num_key_value_heads > 16 or c.num_local_experts > 256
            or c.num_experts_per_tok > 64):
        return False
    dense = [p for name, p in model.model.named_parameters()
             if ".experts." not in name and not name.endswith("_proj.weight")]  # those: matrices below
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in dense):
        return False
    weights = [layer_weights(layer) for layer in model.model.layers]
    return all(w is not None and native.layer_supported(w) for w in weights)


class NativeStep:
    """One-token steps by the C library: every layer and the final norm in one call, the head by
    the C matrix-vector product."""

    kind = "native"

    def __init__(self, model, lib):
        self.lib = lib
        m = model.model
        rope = m.rotary_emb
        self.decoder = native.Decoder(
            lib, model.config, m.layers[0].block_sparse_moe.top_k, m.layers[0].block_sparse_moe.jitter_eps,
            [layer_weights(layer) for layer in m.layers], (m.norm.weight, m.norm.bias),
            {False: rope.short_inv_freq, True: rope.long_inv_freq}, {False: rope.short_mscale, True: rope.long_mscale})

    @staticmethod
    def accepts(x: torch.Tensor, cache) -> bool:
        """One bfloat16 sequence, on the CPU."""
        return x.device.type == "cpu" and cache.k.dtype == torch.bfloat16 and cache.batch_size == 1

    def __call__(self, model, x, cache, start: int, position_ids, long: bool) -> torch.Tensor:
        return self.decoder(x, cache, start, int(position_ids.reshape(-1)[0]), long)

    def head(self, lm_head, h: torch.Tensor) -> torch.Tensor:
        w = getattr(lm_head, "weight", None)
        if type(lm_head) is Linear and w.dtype == h.dtype == torch.bfloat16 and w.is_contiguous():
            return native.linear(self.lib, h, w, lm_head.bias)
        stored = getattr(lm_head, "weight_q", None)  # an int8 head (--quantize-head): read as the layers' rows
        if h.dtype == torch.bfloat16 and stored is not None and native.matrix(stored) is not None:
            return native.qlinear(self.lib, h, stored, 0, lm_head.bias)
        return lm_head(h)


# ------------------------------------------------------------------------------ compiled kernels
class Compiled:
    """``fn`` compiled by inductor on first call; ``eager`` if that fails. ``dynamic=True``: every
    size may vary; ``False``: sizes are constants except those the caller marks
    (``torch._dynamo.maybe_mark_dynamic``), which gives inductor simpler, vectorisable indexing."""

    def __init__(self, fn, eager, dynamic: bool = True):
        self.fn, self.eager, self.dynamic, self.compiled = fn, eager, dynamic, None

    def __call__(self, *args):
        if self.compiled is None:
            separate_cache_per_isa()
            self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
        if self.compiled is not False:
            try:
                return self.compiled(*args)
            except Exception as exc:  # no compiler, or an inductor limitation: never fail a decode
                warnings.warn(f"compiled decode kernel unavailable, running eagerly ({type(exc).__name__}: {exc})",
                              stacklevel=2)
                self.compiled = False
        return self.eager(*args)


def separate_cache_per_isa() -> None:
    """With ``ATEN_CPU_CAPABILITY`` set (say avx2 on an AVX-512 machine), keep inductor's on-disk
    cache apart from the default one. Its cache key leaves the instruction set out: kernels
    compiled under one setting and loaded under the other were measured here to compute wrong
    results and corrupt the heap. An explicit ``TORCHINDUCTOR_CACHE_DIR`` is left alone."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability.lower()}"


def mv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as a reduction: x [..., in] times weight [..., out, in] -> [..., out], summed
    in float32 and rounded once to x's dtype. Meant to be compiled (eagerly it materialises the
    product)."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


matvec = Compiled(mv, F.linear)


def _qkv(linear, x, wq, bq, wk, bk, wv, bv, cos, sin, num_heads: int, num_kv_heads: int):
    """Attention.forward's projections and rotation, as one function to compile."""
    b, s, _ = x.shape
    q = linear(x, wq, bq).view(b, s, num_heads, -1).transpose(1, 2)
    k = linear(x, wk, bk).view(b, s, num_kv_heads, -1).transpose(1, 2)
    v = linear(x, wv, bv).view(b, s, num_kv_heads, -1).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def one_query_attention(q, k, v):
    """Attention of one query [1, heads, 1, d] to keys/values [1, kv_heads, T, d] in float32 (as
    SDPA computes internally): two small matmuls, several times faster than SDPA's CPU kernel
    for a single query."""
    _, heads, _, d = q.shape
    kv_heads = k.shape[1]
    q = q.float().view(1, kv_heads, heads // kv_heads, d)  # the query heads that share a K/V head
    scores = torch.matmul(q, k.float().transpose(-1, -2)) * d**-0.5
    return torch.matmul(scores.softmax(-1), v.float()).to(v.dtype)  # [1, kv_heads, group, d]


def one_query_attention_math(q, k, v):
    """one_query_attention written as reductions, for inductor (its matmuls would become a
    flash-attention call, which costs more for one query; measured equal from ~3000 cached tokens)."""
    _, heads, _, d = q.shape
    kv_heads = k.shape[1]
    q = q.float().view(1, kv_heads, heads // kv_heads, 1, d)
    scores = (q * k.float().unsqueeze(2)).sum(-1) * d**-0.5  # [1, kv_heads, group, T]
    out = (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)
    return out.to(v.dtype)


_one_token_qkv = Compiled(functools.partial(_qkv, mv), functools.partial(_qkv, F.linear))


def _one_token_moe_math(x, gate, w1, w2, w3, jitter_eps: float, top_k: int) -> torch.Tensor:
    """SparseMoE for one token [1, hidden], written for inductor: ``w1[chosen]`` becomes indirect
    loads inside the reductions, so only the chosen experts' weights are read, and nothing is
    copied. Rounds to the model's dtype where the eager path does."""
    weights, chosen = sparsemixer(mv(x, gate), jitter_eps, top_k)
    i = chosen[0]
    h = (F.silu(mv(x, w1[i])) * mv(x, w3[i])).to(x.dtype)  # [top_k, ffn]
    y = (mv(h, w2[i]) * weights[0, :, None]).to(x.dtype)  # [top_k, hidden]
    return y.sum(0, keepdim=True)


def _one_token_moe_eager(x, gate, w1, w2, w3, jitter_eps: float, top_k: int) -> torch.Tensor:
    weights, chosen = sparsemixer(F.linear(x, gate), jitter_eps, top_k)

    def expert(e: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e])

    return combine_chosen(expert, x, weights, chosen)


_one_token_moe = Compiled(_one_token_moe_math, _one_token_moe_eager)


def _layer_step(linear, attention, moe, x, cos, sin, layer: native.LayerWeights, k_cache, v_cache, eps: float,
                jitter_eps: float, top_k: int, num_heads: int, num_kv_heads: int):
    """DecoderLayer.forward for one token x [1, 1, hidden] of a plain layer; ``k_cache``,
    ``v_cache``: views of its cache for positions 0 .. start (the last one is written here)."""
    w = layer
    h = F.layer_norm(x, x.shape[-1:], w.ln1_w, w.ln1_b, eps)
    q, k, v = _qkv(linear, h, w.q, w.bq, w.k, w.bk, w.v, w.bv, cos, sin, num_heads, num_kv_heads)
    k_cache[:, :, -1:] = k
    v_cache[:, :, -1:] = v
    x = x + linear(attention(q, k_cache, v_cache).reshape(1, 1, -1), w.o, w.bo)
    h = F.layer_norm(x, x.shape[-1:], w.ln2_w, w.ln2_b, eps).view(1, -1)
    return x + moe(h, w.gate, w.w1, w.w2, w.w3, jitter_eps, top_k).view_as(x)


def _layers_step(step, x, cos, sin, layers: tuple, *consts):
    for weights, k_cache, v_cache in layers:
        x = step(x, cos, sin, weights, k_cache, v_cache, *consts)
    return x


# One compiled call runs a group of layers (the same graph for every group): the cost of a call
# (guards, wrappers, ~60-80 us) is paid per group, not per layer.
one_token_layers = Compiled(
    functools.partial(_layers_step, functools.partial(_layer_step, mv, one_query_attention_math, _one_token_moe_math)),
    functools.partial(_layers_step,
                      functools.partial(_layer_step, F.linear, one_query_attention, _one_token_moe_eager)),
    dynamic=False,
)


def decode_groups(num_layers: int, most: int = DECODE_GROUP) -> list[range]:
    """Layers split into equal groups of at most ``most`` (equal, so one graph serves them all)."""
    size = max(g for g in range(1, min(most, num_layers) + 1) if num_layers % g == 0)
    return [range(i, i + size) for i in range(0, num_layers, size)]


def _plain_attention(a) -> bool:
    return all(type(getattr(a, f"{n}_proj")) is Linear for n in "qkvo")


def _plain_moe(moe) -> bool:
    return type(moe.experts) is Experts and type(moe.gate) is torch.nn.Linear


class CompiledStep:
    """One-token steps by inductor kernels: groups of layers per compiled call where every layer
    is plain; otherwise, layer by layer, the compiled projections and attention where the
    attention is plain and the compiled expert block where the experts are (quantized or
    offloaded parts keep their own forward)."""

    kind = "compiled"

    def __init__(self, model):
        c, moe = model.config, model.model.layers[0].block_sparse_moe
        self.consts = (c.rms_norm_eps, moe.jitter_eps, moe.top_k, c.num_attention_heads, c.num_key_value_heads)
        layers = model.model.layers
        self.attention = [_plain_attention(layer.self_attn) for layer in layers]
        self.moe = [_plain_moe(layer.block_sparse_moe) for layer in layers]
        self.whole = all(self.attention) and all(self.moe)
        self.weights = [layer_weights(layer) for layer in layers] if self.whole else None

    @staticmethod
    def accepts(x: torch.Tensor, cache) -> bool:
        return x.device.type == "cpu"

    def __call__(self, model, x, cache, start: int, position_ids, long: bool) -> torch.Tensor:
        m = model
        cos, sin = m.rotary_emb(position_ids, long, x.dtype)
        if self.whole:
            for group in decode_groups(len(m.layers)):
                x = one_token_layers(x, cos, sin, tuple(self._group_args(i, cache, start) for i in group), *self.consts)
        else:
            for i, layer in enumerate(m.layers):
                x = self._layer(i, layer, x, cos, sin, cache, start)
        return m.norm(x)

    def _group_args(self, i: int, cache, start: int):
        k_cache, v_cache = cache.window(i, start + 1)
        for t in (k_cache, v_cache):  # one compiled graph for every cache length
            torch._dynamo.maybe_mark_dynamic(t, 2)
        return self.weights[i], k_cache, v_cache

    def _layer(self, i: int, layer, x, cos, sin, cache, start: int):
        a, moe = layer.self_attn, layer.block_sparse_moe
        h = layer.input_layernorm(x)
        if self.attention[i]:
            q, k, v = _one_token_qkv(h, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                                     a.v_proj.weight, a.v_proj.bias, cos, sin, a.num_heads, a.num_kv_heads)
            k, v = cache.update(a.layer_idx, k, v, start)
            att = one_query_attention(q, k, v).reshape(1, 1, -1)
            x = x + matvec(att, a.o_proj.weight, a.o_proj.bias)
        else:
            x = x + a(h, cos, sin, None, cache, start)
        h = layer.post_attention_layernorm(x).view(1, -1)
        if self.moe[i]:
            e = moe.experts
            out = _one_token_moe(h, moe.gate.weight, e.w1, e.w2, e.w3, moe.jitter_eps, moe.top_k)
        else:
            out = moe(h)
        return x + out.view_as(x)

    def head(self, lm_head, h: torch.Tensor) -> torch.Tensor:
        if type(lm_head) is Linear:
            return matvec(h, lm_head.weight, lm_head.bias)
        return lm_head(h)


# --------------------------------------------------------------- the static step (CUDA graphs)
def supports_static(model) -> bool:
    """Whether the static step can run this model: bfloat16, every layer's experts plain or
    quantized stacks (offloaded experts keep their own forward, which reads the routing on the host)."""
    layers, device = model.model.layers, model.model.embed_tokens.weight.device
    plain = [type(layer.block_sparse_moe.experts) is Experts for layer in layers]
    return (model.model.embed_tokens.weight.dtype == torch.bfloat16
            and all(p or _quantized(layer.block_sparse_moe.experts) for p, layer in zip(plain, layers, strict=True))
            and not (any(plain) and device.type == "cuda" and not _fast_grouped_mm(device)))


def _fast_grouped_mm(device: torch.device) -> bool:
    """Whether torch._grouped_mm has a kernel for this GPU (Hopper, Blackwell: compute capability
    9 or 10); elsewhere it falls back to a loop that reads the group sizes back to the host."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] in (9, 10)


def _quantized(experts) -> bool:
    return all(hasattr(getattr(experts, w, None), "qweight") for w in ("w1", "w2", "w3"))


def _quantized_mv(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, values, ids: torch.Tensor,
                  shape: tuple) -> torch.Tensor:
    """h [k, in] times matrix ids[r] of a quantized stack (quant.QuantizedMatrices' layout) for
    row r -> [k, out], summed in float32. int8: rows of codes times their scale; 4-bit: byte j of
    a row holds weights 2j (high nibble) and 2j + 1 (low), each values[code] times the absmax of
    its 64. Written as one reduction over the bytes, which inductor fuses with the gather and
    the widening (one pass over the quantized bytes; eagerly it materialises the products)."""
    k, (out, n) = ids.shape[0], shape
    h = h.float()
    if values is None:
        return (h[:, None, :] * q[ids].float()).sum(-1) * scale[ids]
    if n % 64:  # blocks run across rows (test shapes; the published ones are whole blocks a row)
        p = q[ids]
        codes = torch.stack((p >> 4, p & 15), -1).view(k, -1, 64).long()
        return (h[:, None, :] * (values[codes] * scale[ids][..., None]).view(k, out, n)).sum(-1)
    p = q[ids].view(k, out, n // 64, 32)
    a = scale[ids].view(k, out, n // 64, 1)
    even, odd = h[:, 0::2].reshape(k, 1, n // 64, 32), h[:, 1::2].reshape(k, 1, n // 64, 32)
    products = values[(p >> 4).long()] * even + values[(p & 15).long()] * odd
    return (products * a).sum((-1, -2))


def _quantized_moe_math(x, weights, chosen, q1, s1, q3, s3, q2, s2, values, up_shape: tuple, down_shape: tuple):
    """Quantized experts for one token x [1, hidden] with the routing on the device: each chosen
    expert's matrices read by index from the stacks and widened inside the products. Rounded,
    weighted and summed in expert order as the eager path rounds (its products are bfloat16
    GEMMs of weights rounded to bfloat16: these sum the exact values in float32)."""
    ids, order = chosen[0].sort(stable=True)
    rows = x.expand(ids.shape[0], -1)
    gate = _quantized_mv(rows, q1, s1, values, ids, up_shape).to(x.dtype)
    up = _quantized_mv(rows, q3, s3, values, ids, up_shape).to(x.dtype)
    y = _quantized_mv(F.silu(gate) * up, q2, s2, values, ids, down_shape).to(x.dtype)
    y = (y * weights[0, order, None]).to(x.dtype)
    out = y[:1]
    for k in range(1, ids.shape[0]):
        out = out + y[k : k + 1]
    return out


_quantized_moe = Compiled(_quantized_moe_math, _quantized_moe_math, dynamic=False)


def quantized_one_token(experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``experts(x, weights, chosen)`` for quantized experts and one token, with nothing read back
    to the host; compiled on CUDA (where it runs inside the captured graph), as it is elsewhere."""
    w1, w2, w3 = experts.w1, experts.w2, experts.w3
    values = None if w1.quant_type == "int8" else _code_values(w1.quant_type, x.device)
    args = (x, weights, chosen, w1.qweight, w1.scale, w3.qweight, w3.scale, w2.qweight, w2.scale, values,
            w1.shape, w2.shape)
    return (_quantized_moe if x.device.type == "cuda" else _quantized_moe_math)(*args)


@functools.cache
def _code_values(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (before its absmax), float32 on ``device``; made
    once per device, outside any capture (a copy to the GPU cannot be captured)."""
    from .quant import codebook

    return (codebook(quant_type).float() / 127).to(device)


class _Rows:
    """The KV cache as the static step writes it: this token's keys and values go to the row a
    device tensor names (no host integer), and attention sees every row, masked."""

    def __init__(self, cache, row: torch.Tensor):
        self.k, self.v, self.row = cache.k, cache.v, row

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        self.k[layer].index_copy_(2, self.row, k)
        self.v[layer].index_copy_(2, self.row, v)
        return self.k[layer], self.v[layer]


def static_step(model, x: torch.Tensor, row: torch.Tensor, position: torch.Tensor, cache, long: bool) -> torch.Tensor:
    """Every layer and the final norm for one token x [1, 1, hidden] at cache row ``row`` and
    rotary position ``position`` (device tensors [1]), with shapes fixed by the cache's capacity
    and nothing read back to the host: the model's own attention (over all cache rows, later ones
    masked) and norms, the experts as grouped products (``Experts.grouped``) or, quantized, by
    ``quantized_one_token``."""
    m = model  # the PhimoeModel
    cos, sin = m.rotary_emb(position.view(1, 1), long, x.dtype)
    mask = (torch.arange(cache.k.shape[3], device=x.device) <= row).view(1, 1, 1, -1)
    writer = _Rows(cache, row)
    for layer in m.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, writer)
        h = layer.post_attention_layernorm(x).view(1, -1)
        moe = layer.block_sparse_moe
        weights, chosen = moe.route(h)
        e = moe.experts
        y = e.grouped(h, weights, chosen) if type(e) is Experts else quantized_one_token(e, h, weights, chosen)
        x = x + y.view_as(x)
    return m.norm(x)


def _attention_kernels(device: torch.device):
    """On CUDA, SDPA without cuDNN's kernel (reported to fail on some masked shapes, which would
    end the static step for good); host-side flags only, so capture is unaffected."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


class _Graph:
    """One captured static step: its input buffers, the graph, its output buffer."""

    def __init__(self, model, x: torch.Tensor, row: torch.Tensor, position: torch.Tensor, cache, long: bool):
        with torch.inference_mode(False):  # ordinary tensors: usable under no_grad too
            self.x, self.row, self.position = x.clone(), row.clone(), position.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, compiles, lazy inits)
            for _ in range(2):
                static_step(model, self.x, self.row, self.position, cache, long)  # rewrites this token's row
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = static_step(model, self.x, self.row, self.position, cache, long)

    def __call__(self, x: torch.Tensor, start: int, position: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.row.fill_(start)
        self.position.copy_(position)
        self.graph.replay()
        return self.out.clone()


class StaticStep:
    """One-token steps by ``static_step``: on CUDA captured as a CUDA graph per (cache, capacity,
    factor set) and replayed, so a token costs one launch and no host-device sync (a cache that
    grows, rarely, gets a new graph); elsewhere run as it is. If capturing fails the step runs
    uncaptured, with one warning; if that fails too, the model's own layers run from then on."""

    most_graphs = 4  # graphs kept (each holds its own activation memory); the oldest goes first

    def __init__(self):
        self.graphs: dict[tuple, _Graph] = {}
        self.capture = self.runs = True

    @property
    def kind(self) -> str:
        """static; after a fallback, what runs instead (so that bench reports it)."""
        return "eager (static failed)" if not self.runs else "static" if self.capture else "static, uncaptured"

    def accepts(self, x: torch.Tensor, cache) -> bool:
        return self.runs and cache.batch_size == 1 and cache.k.dtype == x.dtype == torch.bfloat16

    def __call__(self, model, x, cache, start: int, position_ids, long: bool) -> torch.Tensor:
        position = position_ids.reshape(1)
        with _attention_kernels(x.device):
            if x.device.type != "cuda" or not self.capture:
                return self._uncaptured(model, x, cache, start, position_ids, long)
            key = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), long)
            graph = self.graphs.pop(key, None)
            if graph is None:
                try:
                    row = torch.full((1,), start, dtype=torch.long, device=x.device)
                    graph = _Graph(model, x, row, position, cache, long)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:  # never fail a decode: run uncaptured from now on
                    warnings.warn(f"CUDA graph capture failed, decoding uncaptured ({type(exc).__name__}: {exc})",
                                  stacklevel=2)
                    self.capture, self.graphs = False, {}
                    return self._uncaptured(model, x, cache, start, position_ids, long)
                while len(self.graphs) >= self.most_graphs:
                    self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = graph  # (re)inserted last: the most recently used
            return graph(x, start, position)

    def _uncaptured(self, model, x, cache, start: int, position_ids, long: bool) -> torch.Tensor:
        try:
            row = torch.full((1,), start, dtype=torch.long, device=x.device)
            return static_step(model, x, row, position_ids.reshape(1), cache, long)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # (an old torch, a kernel this device lacks): the model's own layers
            warnings.warn(f"static decode step unavailable, decoding eagerly ({type(exc).__name__}: {exc})",
                          stacklevel=2)
            self.runs = False
            m = model
            cos, sin = m.rotary_emb(position_ids, long, x.dtype)
            for layer in m.layers:
                x = layer(x, cos, sin, None, cache, start)
            return m.norm(x)

    def head(self, lm_head, h: torch.Tensor) -> torch.Tensor:
        return lm_head(h)
