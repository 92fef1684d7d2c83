"""The C decode step (model/native.c): its matrix-vector kernel, its sparsemixer and whole decode
steps, against float64 products, the Python sparsemixer, and the eager bfloat16 / float32 models.
Every instruction-set variant this CPU can run is built and checked."""

from __future__ import annotations

import ctypes
import subprocess
import warnings

import pytest
import torch
from checkpoints import make_config, write_checkpoint

from phimoe_cli.model import decode as backends
from phimoe_cli.model import hugepages, load_model, native, sparsemixer
from phimoe_cli.model.native import cpuinfo

FLAGS = set((cpuinfo().get("flags") or "").split())
VARIANTS = {"native": "-march=native", "generic": ""}  # generic: plain C (what a non-x86 CPU runs)
if {"avx2", "fma"} <= FLAGS:
    VARIANTS["avx2"] = "-mavx2 -mfma"
if {"avx512bw", "avx512_vnni"} <= FLAGS:  # native takes the VNNI 4-bit loop; this one the other
    VARIANTS["avx512"] = "-mavx2 -mfma -mavx512f -mavx512bw -mavx512dq -mavx512vl"


def _build(flags: str):
    try:
        return native.load(native.build(flags))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C toolchain here: {exc}")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def lib(request):
    return _build(VARIANTS[request.param])


def test_variants_report_their_instruction_set():
    expected = {"generic": "generic", "avx2": "avx2", "avx512": "avx512"}
    for name, flags in VARIANTS.items():
        isa = native.isa(_build(flags))
        if name in expected:
            assert isa == expected[name]
        elif "avx512f" in FLAGS:
            assert isa == "avx512"


# shapes with every tail: rows not a multiple of 4, K below and above each unrolled step
@pytest.mark.parametrize("n, k", [(37, 100), (1600, 1024), (64, 1600), (9, 600), (5, 8), (3, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_the_float32_sum_rounded_once(lib, n, k, bias):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(1, 1, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    y = native.linear(lib, x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, n)
    # float32 summation (any order) then one rounding: within one bfloat16 step of the exact value
    err = (y.double() - exact).abs()
    bound = 2.0**-8 * exact.abs() + 1e-6 * k * (x.double().abs() @ w.double().abs().t())
    assert (err <= bound).all(), (err - bound).max()


# prompt rows and weight rows not multiples of the 3 x 4 tiles; K a multiple of 16 (else it declines)
@pytest.mark.parametrize("m, n, k", [(1, 5, 16), (16, 1600, 1024), (17, 37, 96), (128, 64, 1600), (2, 3, 100)])
def test_prefill_product_of_bfloat16_rows_is_the_float32_sum_rounded_once(lib, m, n, k):
    """native.bf16_matmul (prefill where the CPU has no bfloat16 dot product): the AVX2 builds
    compute it, within one bfloat16 rounding of the exact product; others decline (None)."""
    g = torch.Generator().manual_seed(m * n + k)
    w, x, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16(), \
        torch.randn(n, generator=g).bfloat16()
    y = native.bf16_matmul(lib, x, w, b)
    if native.isa(lib) == "generic" or k % 16:
        assert y is None
        return
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.double() - exact).abs()
    bound = 2.0**-8 * exact.abs() + 1e-6 * k * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert (err <= bound).all(), (err - bound).max()


# prompt rows and weight rows not multiples of the 6 x 4 tiles; K a multiple of 32 (else it declines)
@pytest.mark.parametrize("m, n, k", [(1, 5, 32), (7, 37, 96), (16, 1600, 1024), (13, 6, 64), (2, 3, 100)])
def test_prefill_product_by_bfloat16_dot_products_is_the_float32_sum_rounded_once(request, lib, m, n, k):
    """native.dpbf16_matmul (prefill of few rows where the CPU has AVX512-BF16 but no AMX): the
    build for this CPU computes it where the CPU has AVX512-BF16, within one bfloat16 rounding of
    the exact product, each row as it would be alone; others decline (None)."""
    g = torch.Generator().manual_seed(m * n + k)
    w, x, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16(), \
        torch.randn(n, generator=g).bfloat16()
    y = native.dpbf16_matmul(lib, x, w, b)
    if not ("avx512_bf16" in FLAGS and request.node.callspec.params["lib"] == "native") or k % 32:
        assert y is None
        return
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.double() - exact).abs()
    bound = 2.0**-8 * exact.abs() + 1e-6 * k * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(native.dpbf16_matmul(lib, x[-1:], w, b), y[-1:])  # the tiles do not change a row's sum


def quantize_like_the_c_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation vector quantized as native.c's comment defines it, written here from that
    definition: blocks of 64 (the last one may be shorter), d = max |x| / 32639 in float32,
    q = x * (1 / d) rounded half to even."""
    xf = x.float().reshape(-1)
    q, d = torch.empty(xf.numel(), dtype=torch.int16), []
    for b in range(0, xf.numel(), 64):
        block = xf[b : b + 64]
        db = block.abs().max() / 32639
        inv = 1 / db if db > 0 else torch.tensor(0.0)
        q[b : b + 64] = torch.round(block * inv).clamp(-32639, 32639).to(torch.int16)
        d.append(db)
    return q, torch.stack(d)


@pytest.mark.parametrize("k", [1, 8, 63, 64, 100, 544, 1600])
def test_activations_are_quantized_to_int16_per_64(lib, k):
    x = (torch.randn(k, generator=torch.Generator().manual_seed(k)) * 3).bfloat16()
    x[k // 2] = 0.0
    q, d = native.quantize_activations(lib, x)
    want_q, want_d = quantize_like_the_c_step(x)
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert native.quantize_activations(lib, torch.zeros(k).bfloat16())[0].abs().max() == 0  # d = 0: all zeros


def _quantized(quant: str, n: int, k: int, seed: int):
    """Random matrices [2, n, k] quantized as the experts store them, and their float64 values as
    the C kernels read them (int8: scale rounded to bfloat16, as torch's int8 kernel rounds it)."""
    from phimoe_cli.model.quant import QuantizedMatrices

    g = torch.Generator().manual_seed(seed)
    m = QuantizedMatrices(2, n, k, quant, torch.bfloat16)
    for i in range(2):
        m.store(i, torch.randn(n, k, generator=g) * 0.05)
    if quant == "int8":
        values = m.qweight.double() * m.scale.bfloat16().double()[..., None]
    else:
        values = torch.stack([m.dequantize(i, torch.float64) for i in range(2)])
    return m, values


# int8 rows take every K; 4-bit ones a multiple of 64 (pairs of 64-blocks and a lone last one)
@pytest.mark.parametrize("quant, n, k", [("int8", 37, 100), ("int8", 64, 1600), ("int8", 9, 544), ("int8", 5, 8),
                                         ("nf4", 37, 128), ("nf4", 16, 1600), ("fp4", 9, 576), ("fp4", 70, 64)])
def test_quantized_linear_is_the_integer_product_of_the_quantized_vector(lib, quant, n, k):
    """What the C step computes for a quantized matrix: its values (as dequantize() gives them)
    times x quantized to int16 in blocks of 64: integer sums per block, exact, then float32
    scales; so within float32 summation of the exact product, plus one bfloat16 rounding. And the
    quantized vector is within half a step (1/65278 of its block's largest value) of x itself."""
    m, values = _quantized(quant, n, k, seed=n * k)
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    q, d = native.quantize_activations(lib, x.reshape(-1))
    x_hat = q.double() * d.double().repeat_interleave(64)[:k]
    for index in (0, 1):
        y = native.qlinear(lib, x, m, index)
        assert y.dtype == torch.bfloat16 and y.shape == (1, 1, n)
        w = values[index]
        exact = w @ x_hat
        err = (y.double().reshape(n) - exact).abs()
        bound = 2.0**-8 * exact.abs() + 1e-6 * k * (w.abs() @ x_hat.abs())
        assert (err <= bound).all(), (err - bound).max()
        # against x unquantized: at most half a step d / 2 per value
        step = d.double().repeat_interleave(64)[:k] / 2
        assert ((y.double().reshape(n) - w @ x.double().reshape(k)).abs() <= bound + w.abs() @ step).all()


@pytest.mark.parametrize("quant, n, k, rows", [("int8", 37, 100, 5), ("int8", 64, 1600, 17), ("nf4", 40, 128, 3),
                                               ("fp4", 9, 1600, 8), ("nf4", 70, 576, 1),
                                               # panels of 32 widened rows: several a thread, the last partial
                                               ("nf4", 150, 256, 6), ("int8", 133, 128, 9),
                                               # int8 tiles with a group of 3 rows, widened as it is multiplied
                                               ("int8", 48, 192, 3)])
def test_quantized_matmul_is_the_one_row_kernel_row_by_row(lib, quant, n, k, rows):
    """The prompt's pass (many rows, on CPUs without bfloat16 dot products) multiplies each row as
    the decode step does: the same integer sums per block, summed in another float32 order, so
    within one bfloat16 rounding of the one-row kernel; and within the exact product's bound."""
    m, values = _quantized(quant, n, k, seed=3 * n + k)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    y = native.qmatmul(lib, x, m, 1, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    for t in range(rows):
        one = native.qlinear(lib, x[t].reshape(1, 1, k), m, 1, bias).reshape(n)
        assert ((y[t].float() - one.float()).abs() <= 2.0**-7 * one.float().abs() + 1e-6).all(), t
        q, d = native.quantize_activations(lib, x[t])
        x_hat = q.double() * d.double().repeat_interleave(64)[:k]
        exact = values[1] @ x_hat + bias.double()
        bound = 2.0**-8 * exact.abs() + 1e-6 * k * (values[1].abs() @ x_hat.abs())
        assert ((y[t].double() - exact).abs() <= bound).all(), t


@pytest.mark.parametrize("quant, n, k", [("int8", 37, 100), ("nf4", 40, 128), ("fp4", 9, 1600)])
def test_dequantized_rows_are_the_values_dequantize_gives(lib, quant, n, k):
    """Prefill multiplies quantized weights widened by the C kernels, a block of rows at a time:
    bit for bit the float32 values of QuantizedMatrices.dequantize (the same float32 operations)."""
    m, _ = _quantized(quant, n, k, seed=n + k)
    for index in (0, 1):
        out = torch.full((n - 3, k), float("nan"))
        assert native.dequantize_rows(lib, m, index, 2, n - 1, out)
        assert torch.equal(out, m.dequantize(index, torch.float32)[2 : n - 1])
        # straight to bfloat16 (where prefill multiplies bfloat16): those values rounded as torch rounds
        half = torch.full((n - 3, k), float("nan"), dtype=torch.bfloat16)
        assert native.dequantize_rows(lib, m, index, 2, n - 1, half)
        assert torch.equal(half, m.dequantize(index, torch.float32)[2 : n - 1].bfloat16())


AMX = {"amx_tile", "amx_bf16", "avx512_bf16"} <= FLAGS


# n: 64-row passes (4 A tiles), 32 and 16; K: whole 256-value chunks and a tail; prompt rows: one
# group of 16 (R = 4), two (R = 2), up to four, and more than a pass of 64
@pytest.mark.parametrize("quant, n, k, rows", [("int8", 64, 544, 5), ("nf4", 128, 1600, 16), ("fp4", 48, 320, 17),
                                               ("int8", 32, 96, 40), ("nf4", 16, 256, 70), ("bf16", 80, 608, 3),
                                               ("bf16", 64, 1024, 130), ("int8", 20, 64, 4)])
def test_amx_product_is_the_float32_sum_of_the_widened_weights(request, lib, quant, n, k, rows):
    """The prompt's pass with AMX tiles: the weights widened to bfloat16 exactly as
    dequantize_rows widens them (bfloat16 weights as they are), multiplied by the bfloat16 rows
    exactly, summed in float32 and rounded once. Only the build for this CPU has it, and only
    on a CPU with AMX; elsewhere (and for n not a multiple of 16) it declines, and callers take
    the other kernels."""
    g = torch.Generator().manual_seed(n + rows)
    if quant == "bf16":
        m = torch.randn(2, n, k, generator=g).bfloat16()
        w = m[1].double()
        weight, index = m[1], 0
    else:
        m, _ = _quantized(quant, n, k, seed=n * k + rows)
        w = m.dequantize(1, torch.float32).bfloat16().double()
        weight, index = m, 1
    x = torch.randn(rows, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    y = native.amx_matmul(lib, x, weight, index, bias)
    if not (AMX and request.node.callspec.params["lib"] == "native") or n % 16:
        assert y is None
        return
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, n)
    exact = x.double() @ w.t() + bias.double()
    bound = 2.0**-8 * exact.abs() + 1e-6 * k * (x.double().abs() @ w.abs().t())
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() - bound).max()
    assert torch.equal(native.amx_matmul(lib, x[:1], weight, index), native.amx_matmul(lib, x, weight, index)[:1])


def sparsemixer_c(lib, scores: torch.Tensor, top_k: int, jitter_eps: float):
    n = scores.numel()
    s = scores.float().contiguous()
    chosen = (ctypes.c_int * top_k)()
    weights = (ctypes.c_float * top_k)()
    lib.phimoe_sparsemixer(ctypes.c_void_p(s.data_ptr()), n, top_k, ctypes.c_float(jitter_eps), chosen, weights)
    return list(weights), list(chosen)


def _rounding_sensitive_cases(eps: float, most: int = 40) -> list[torch.Tensor]:
    """Score vectors where the gap test ``(best - s) / max(|s|, best) > 2 * eps`` decides
    differently in float32 than with each step rounded to bfloat16, as the eager ops round."""
    grid = torch.linspace(0.25, 4.0, 2000).bfloat16().unique()
    best, s = grid[:, None], grid[None, :]
    exact = ((best.float() - s.float()) / torch.maximum(s.float().abs(), best.float())) > 2 * eps
    rounded = ((best - s) / s.abs().clamp(min=best)) > 2 * eps
    b, j = torch.nonzero(exact != rounded, as_tuple=True)
    assert len(b), "no rounding-sensitive pair in the grid"
    cases = []
    for i in range(min(most, len(b))):
        c = torch.full((16,), -8.0)
        c[5], c[9] = grid[b[i]], grid[j[i]]
        cases.append(c)
    return cases


def test_sparsemixer_matches_the_python_one_exactly(lib):
    """On bfloat16 scores, as the eager bfloat16 model routes: the same experts, the same
    weights, bit for bit; including ties and gaps right at the 2 * jitter_eps threshold."""
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(16, generator=g) * scale for scale in (0.01, 0.3, 1.0, 5.0) for _ in range(60)]
    cases += [torch.randint(-3, 4, (16,), generator=g).float() for _ in range(40)]  # many ties
    base = torch.randn(16, generator=g)
    for step in range(-4, 5):  # gaps around the threshold
        c = base.clone()
        c[3] = base.max() * (1 + step * 0.005)
        cases.append(c)
    cases += [torch.randn(8, generator=g) for _ in range(20)]  # other expert counts
    cases += _rounding_sensitive_cases(0.01)
    for top_k, eps in ((2, 0.01), (3, 0.1), (1, 0.01)):
        for scores in cases:
            scores = scores.bfloat16()[None]
            w_ref, c_ref = sparsemixer(scores, eps, top_k)
            w, c = sparsemixer_c(lib, scores[0], top_k, eps)
            assert c == c_ref[0].tolist(), scores
            assert w == w_ref[0].float().tolist(), scores


# --------------------------------------------------------------------------- whole decode steps
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The tiny test model, and one whose widths hit every unrolled loop and tail of the kernel."""
    wide = make_config(11, hidden_size=544, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)
    gqa4 = make_config(12, hidden_size=256, num_attention_heads=4, num_key_value_heads=1)  # as published: 4 per kv head
    q4 = make_config(13, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    return {
        "q4": write_checkpoint(tmp_path_factory.mktemp("q4"), q4, shards=1, seed=13),  # widths: multiples of 64
        "tiny": write_checkpoint(tmp_path_factory.mktemp("tiny"), shards=1, seed=0),
        "wide": write_checkpoint(tmp_path_factory.mktemp("wide"), wide, shards=2, seed=11),
        "gqa4": write_checkpoint(tmp_path_factory.mktemp("gqa4"), gqa4, shards=1, seed=12),
    }


def ids(n, seed=0):
    return torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def decode(model, x, prefix):
    """Teacher-forced: the prompt in one pass, then one token at a time from a small cache (it
    grows, and the C step rebinds to the moved tensors)."""
    cache = model.new_cache(capacity=8)
    with torch.inference_mode():
        steps = [model(x[:, :prefix], cache=cache)]
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(prefix, x.shape[1])]
    return torch.cat(steps, dim=1)[:, prefix:].float()


def _models(path, lib, kinds=("native", "eager"), quantize="none", quantize_attention=False):
    out = {}
    for kind in kinds:
        m = load_model(path, dtype=torch.bfloat16, quantize=quantize, quantize_attention=quantize_attention)
        assert backends.choose(m, kind, lib=lib) == kind  # this variant of the library, not the default build
        out[kind] = m
    out["float32"] = load_model(path)
    backends.choose(out["float32"], "eager")
    return out


@pytest.mark.isa  # run again under another ISA's kernels (test_isa.py)
@pytest.mark.parametrize("name, n, prefix", [("tiny", 40, 20), ("wide", 30, 10), ("tiny", 80, 58), ("gqa4", 110, 70)])
def test_decode_agrees_with_the_reference_as_well_as_eager_bfloat16(ckpts, lib, name, n, prefix):
    """Against the float32 model, the C step's error is no larger than the eager bfloat16 path's
    (both round the same operations to bfloat16), and it picks the same greedy tokens.
    ``tiny`` 80/58 crosses LongRoPE's original_max_position_embeddings (64) while decoding;
    ``gqa4`` (four query heads per kv head, head_dim 64) takes the four-heads-at-once attention."""
    models = _models(ckpts[name], lib)
    x = ids(n, seed=n)
    got, eager, ref = (decode(models[k], x, prefix) for k in ("native", "eager", "float32"))
    scale = ref.abs().max()
    err_c, err_eager = (got - ref).abs().amax(-1), (eager - ref).abs().amax(-1)  # per position
    # a routing decision between two experts whose bfloat16 scores tie can flip on one rounding;
    # away from those the two paths agree to a few bfloat16 steps
    close = (got - eager).abs().amax(-1) <= 0.02 * scale
    assert close.float().mean() >= 0.9
    assert err_c.median() <= 1.5 * err_eager.median() + 1e-3 * scale
    agree = lambda a: (a.argmax(-1) == ref.argmax(-1)).float().mean()  # noqa: E731
    assert agree(got) >= agree(eager) - 0.1


def _values(m) -> torch.Tensor:
    """A quantized matrix stack as the C step reads it, in float64."""
    if m.quant_type == "int8":
        return m.qweight.double() * m.scale.bfloat16().double()[..., None]  # as torch's int8 kernel
    return torch.stack([m.dequantize(i, torch.float64) for i in range(m.qweight.shape[0])])


def _float64_twin(path, quantized):
    """The float64 model with ``quantized``'s weights as the C step reads them (int8 rows scaled by
    their scale rounded to bfloat16, as torch's int8 kernel scales them; 4-bit codes as
    dequantize() gives them), everything else the bfloat16 checkpoint's weights."""
    ref = load_model(path, dtype=torch.bfloat16)
    for mine, theirs in zip(ref.model.layers, quantized.model.layers, strict=True):
        experts = theirs.block_sparse_moe.experts
        for name in ("w1", "w2", "w3"):
            getattr(mine.block_sparse_moe.experts, name).data = _values(getattr(experts, name))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            theirs_proj, mine_proj = getattr(theirs.self_attn, name), getattr(mine.self_attn, name)
            if hasattr(theirs_proj, "weight_q"):
                mine_proj.weight.data = _values(theirs_proj.weight_q)[0]
    ref = ref.double()
    backends.choose(ref, "eager")
    return ref


@pytest.mark.isa  # run again under another ISA's kernels (test_isa.py)
@pytest.mark.parametrize("name, quant, attention", [("tiny", "int8", False), ("wide", "int8", True),
                                                    ("q4", "nf4", True), ("q4", "fp4", False), ("q4", "int8", True)])
def test_quantized_decode_is_as_exact_as_bfloat16_arithmetic(ckpts, lib, name, quant, attention):
    """Quantized experts (and attention), in the C step (integer products against int16
    activations) and on the eager path (torch's int8 kernel, or dequantized weights), each against
    the float64 model with the same weights. The yardstick is the error of the unquantized eager
    bfloat16 model against its own float64 twin: all of them round the same operations to
    bfloat16, so their typical (median) error must be of that size.
    Not compared with each other: a routing choice between two experts within the sparsemixer's
    2 * jitter_eps gap flips on one rounding, and which rounding happens differs by path and ISA
    (on AVX2 the prompt's products are summed in float32 by another kernel), so two paths disagree
    on a few positions (17% of 18 on AVX2) while each is as close to float64 as bfloat16 allows."""
    path = ckpts[name]
    models = _models(path, lib, quantize=quant, quantize_attention=attention)
    assert backends.kind(models["native"]) == "native"
    bf16 = _models(path, lib, kinds=("eager",))["eager"]
    bf16_ref = load_model(path, dtype=torch.bfloat16).double()
    backends.choose(bf16_ref, "eager")
    yardstick = (decode_many(bf16) - decode_many(bf16_ref)).abs().amax(-1).median()
    ref = decode_many(_float64_twin(path, models["native"]))
    scale = ref.abs().max()
    err = {kind: (decode_many(models[kind]) - ref).abs().amax(-1) for kind in ("native", "eager")}  # per position
    for kind in ("native", "eager"):
        assert err[kind].median() <= 1.5 * yardstick + 1e-3 * scale, kind
    # Routing flips aside, positions are within a few bfloat16 steps; a flip in a prompt's pass
    # (run in torch for both paths) disturbs that sequence's later positions. The C step flips
    # no more often than the eager path (measured: 69-100% of positions close, alike on both)
    close = {kind: (e <= 0.03 * scale).float().mean() for kind, e in err.items()}
    assert close["native"] >= close["eager"] - 0.1 and close["native"] >= 0.6, close


def decode_many(model, sequences: int = 8, length: int = 10, prefix: int = 4) -> torch.Tensor:
    """``decode`` of several short sequences, their positions side by side: a routing flip in one
    prompt's pass disturbs only that sequence."""
    return torch.cat([decode(model, ids(length, seed=100 + i), prefix) for i in range(sequences)], dim=1)


def test_one_and_two_threads_give_identical_tokens(ckpts):
    lib = native.library()
    if lib is None:
        pytest.skip("no C toolchain here")
    model = _models(ckpts["wide"], lib, kinds=("native",))["native"]
    x = ids(20, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(model, x, 10)
        torch.set_num_threads(2)
        two = decode(model, x, 10)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # rows and heads are split between threads, never a sum


def test_default_kernel_for_bfloat16_and_float32_models(ckpts, monkeypatch):
    monkeypatch.delenv("PHIMOE_DECODE_KERNEL", raising=False)
    if native.library() is None:
        pytest.skip("no C toolchain here")
    bf16, f32 = load_model(ckpts["tiny"], dtype=torch.bfloat16), load_model(ckpts["tiny"])
    with torch.inference_mode():
        bf16(ids(3)), f32(ids(3))
    assert backends.kind(bf16) == "native"
    assert backends.kind(f32) == "eager"  # float32: not the C step's dtype
    q = load_model(ckpts["tiny"], dtype=torch.bfloat16, quantize="int8")
    assert backends.choose(q, "native") == "native"  # int8 experts: in the C step too
    q = load_model(ckpts["tiny"], dtype=torch.bfloat16, quantize="nf4")
    assert backends.choose(q, "native") == "compiled"  # 4-bit rows of 96: not in C
    q = load_model(ckpts["q4"], dtype=torch.bfloat16, quantize="nf4", quantize_attention=True)
    assert backends.choose(q, "native") == "native"  # widths multiples of 64: in C


def test_without_a_compiler_the_compiled_kernels_take_over(ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv("PHIMOE_CACHE_DIR", str(tmp_path))  # nothing built yet in this cache
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None
        assert any("no C compiler" in str(w.message) for w in caught)
        model = load_model(ckpts["tiny"], dtype=torch.bfloat16)
        assert backends.choose(model, "native") == "compiled"
    finally:
        native.library.cache_clear()


def test_a_failed_build_warns_with_the_compiler_message(monkeypatch, tmp_path):
    monkeypatch.setenv("PHIMOE_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C build failed"):
            assert native.library("-mno-such-flag-exists") is None
    finally:
        native.library.cache_clear()


def test_build_is_cached_per_source_flags_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PHIMOE_CACHE_DIR", str(tmp_path))
    try:
        a = native.build("")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C toolchain here: {exc}")
    mtime = a.stat().st_mtime_ns
    assert native.build("") == a and a.stat().st_mtime_ns == mtime  # not built again
    assert native.build("-O2") != a
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({a.name, native.build("-O2").name})  # no leftovers


def test_hugepage_tensors_are_aligned_usable_and_freed():
    t = hugepages.empty((3, 1 << 20), torch.bfloat16)  # 6 MiB
    if hugepages._madvise() is not None:
        assert t.data_ptr() % hugepages.HUGE == 0
    t.fill_(2)
    view = t[1]
    del t
    assert view.sum().item() == 2 * (1 << 20)  # the mapping lives as long as a view of it
    small = hugepages.empty((10,), torch.float32)
    assert small.shape == (10,) and small.dtype == torch.float32
