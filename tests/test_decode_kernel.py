"""The compiled one-token decode back-end (model/decode.py) computes what the eager path computes;
the prefill compute dtype (model/kernels.py)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_checkpoint

from phimoe_cli.model import decode, kernels, load_model, quant

ATOL = 2e-4  # float32, as in test_model.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), shards=1, seed=0)


def ids(n, seed=0):
    return torch.randint(0, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, x, prefix):
    """Teacher-forced: the prompt in one pass, then one token at a time from a small cache."""
    cache = model.new_cache(capacity=8)
    with torch.inference_mode():
        steps = [model(x[:, :prefix], cache=cache)]
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(prefix, x.shape[1])]
    return torch.cat(steps, dim=1)


def test_small_models_decode_eagerly_by_default(ckpt, monkeypatch):
    monkeypatch.delenv("PHIMOE_DECODE_KERNEL", raising=False)
    model = load_model(ckpt)
    with torch.inference_mode():
        model(ids(3))
    assert decode.kind(model) == "eager"  # float32 (not the C step), and compiling would not pay off


def test_compiled_decode_matches_eager_and_full_forward(ckpt):
    fast, eager = load_model(ckpt), load_model(ckpt)
    decode.choose(fast, True)
    decode.choose(eager, False)
    x = ids(40, seed=1)  # below original_max_position_embeddings (64): short factors throughout
    a, b = run(fast, x, 20), run(eager, x, 20)
    with torch.inference_mode():
        full = eager(x)
    assert decode.matvec.compiled not in (None, False)  # the compiled kernels really ran
    assert decode.one_token_layers.compiled not in (None, False)
    assert (a - b).abs().max().item() < ATOL
    assert (a - full).abs().max().item() < ATOL


def test_compiled_decode_across_the_longrope_boundary(ckpt):
    fast, eager = load_model(ckpt), load_model(ckpt)
    decode.choose(fast, True)
    decode.choose(eager, False)
    x = ids(80, seed=2)  # 58 + 22 steps: the cache is recomputed with the long factors on the way
    a, b = run(fast, x, 58), run(eager, x, 58)
    with torch.inference_mode():
        full = eager(x)  # every position with the long factors, as the last steps see them
    assert (a - b).abs().max().item() < ATOL
    assert (a[:, -1] - full[:, -1]).abs().max().item() < ATOL


def test_partly_quantized_layers_use_the_per_part_kernels(ckpt):
    """With quantized experts the layer cannot run as one call: attention alone is compiled."""
    fast = load_model(ckpt, quantize="int8")
    eager = load_model(ckpt, quantize="int8")
    decode.choose(fast, True)
    decode.choose(eager, False)
    step = fast.model.decode_step
    assert not step.whole and all(step.attention) and not any(step.moe)
    x = ids(30, seed=4)
    a, b = run(fast, x, 20), run(eager, x, 20)
    assert decode._one_token_qkv.compiled not in (None, False)
    assert (a - b).abs().max().item() < ATOL


@pytest.mark.parametrize("n, groups", [(32, [4] * 8), (8, [4, 4]), (2, [2]), (6, [3, 3]), (7, [1] * 7), (1, [1])])
def test_decode_groups_are_equal(n, groups):
    parts = decode.decode_groups(n)
    assert [len(g) for g in parts] == groups
    assert [i for g in parts for i in g] == list(range(n))


def test_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    k = decode.Compiled(decode.mv, torch.nn.functional.linear)
    x, w, b = torch.randn(1, 1, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.warns(UserWarning, match="running eagerly"):
        y = k(x, w, b)
    assert k.compiled is False
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b))
    assert torch.allclose(k(x, w, b), y)  # and stays eager, silently


# ------------------------------------------------------------------ prefill compute dtype
AVX2_FLAGS = {"fpu", "sse2", "avx", "avx2", "fma"}
ZEN4_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
SKYLAKE_X_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl"}
SAPPHIRE_FLAGS = SKYLAKE_X_FLAGS | {"amx_bf16", "amx_tile", "avx512_fp16"}


@pytest.mark.parametrize(
    "flags, capability, dtype, native",
    [
        (AVX2_FLAGS, "AVX2", torch.bfloat16, False),  # the 2-core AVX2 laptop: widen to float32
        (ZEN4_FLAGS, "AVX512", torch.bfloat16, True),
        (ZEN4_FLAGS, "AVX2", torch.bfloat16, False),  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
        (SKYLAKE_X_FLAGS, "AVX512", torch.bfloat16, False),  # AVX-512 without the BF16 dot product
        (SAPPHIRE_FLAGS, "AVX512", torch.bfloat16, True),
        (SAPPHIRE_FLAGS, "AVX512", torch.float16, True),
        (ZEN4_FLAGS, "AVX512", torch.float16, False),
        ({"fp", "asimd", "bf16"}, "SVE256", torch.bfloat16, True),  # Graviton 3
        ({"fp", "asimd"}, "DEFAULT", torch.bfloat16, False),
        (AVX2_FLAGS, "AVX2", torch.float32, True),
    ],
)
def test_prefill_dtype_follows_the_cpu(flags, capability, dtype, native):
    assert kernels.native_low_precision(set(flags), capability, dtype) is native


def test_prefill_dtype_override(monkeypatch):
    monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "float32")
    assert kernels.prefill_dtype(torch.bfloat16) == torch.float32
    assert kernels.prefill_dtype(torch.float32) == torch.float32
    monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "native")
    assert kernels.prefill_dtype(torch.bfloat16) == torch.bfloat16
    assert kernels.prefill_dtype(torch.bfloat16, "meta") == torch.bfloat16  # only the CPU widens


@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_is_the_float32_product_rounded_once(bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 48, generator=g).bfloat16()
    w = torch.randn(100, 48, generator=g).bfloat16()
    b = torch.randn(100, generator=g).bfloat16() if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # blocks of 8 rows: 13 blocks, the last one partial
    y = kernels.upcast_linear(x, w, b, block_bytes=8 * 48 * 4)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 100)
    # exact up to float32 summation order, then one bfloat16 rounding
    assert torch.equal(y, ref.float().bfloat16()) or (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.abs().max()
    assert torch.equal(y, kernels.upcast_linear(x, w, b))  # the block size does not change the result


def test_widened_prefill_matches_the_native_one(ckpt, monkeypatch):
    """A bfloat16 model prefilled in float32 agrees with the float32 model as well as the
    bfloat16 prefill does (what differs is only where the products are rounded)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 32000, (1, 24), generator=g)
    ref_model = load_model(ckpt)
    bf16 = load_model(ckpt, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = ref_model(x).float()
        monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "native")
        native = bf16(x).float()
        monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "float32")
        widened = bf16(x).float()
    scale = ref.abs().max()
    assert (native - widened).abs().max() > 0  # the widened path really ran
    assert (widened - ref).abs().max() <= max(0.05 * scale, 1.5 * (native - ref).abs().max())


def test_prefill_of_few_rows_takes_the_bfloat16_dot_kernel(ckpt, monkeypatch):
    """Where bfloat16 is multiplied natively without AMX but with AVX512-BF16 (AMD Zen 4 and
    later), products of up to native.DPBF16_MAX_ROWS prompt rows (an expert's share of a short
    prompt) go to the C kernel (native.dpbf16_matmul), more rows to torch's GEMM; the model's
    output stays that of torch's GEMM but for the order of the float32 sums."""
    from phimoe_cli.model import native

    lib = native.library()
    probe = torch.ones(1, 32, dtype=torch.bfloat16)
    if lib is None or native.amx_matmul(lib, probe, torch.ones(16, 32, dtype=torch.bfloat16)) is not None \
            or native.dpbf16_matmul(lib, probe, probe) is None:
        pytest.skip("this build has AMX, or no AVX512-BF16 kernel")
    x = torch.randint(0, 32000, (1, 40), generator=torch.Generator().manual_seed(8))  # ~20 rows an expert
    model = load_model(ckpt, dtype=torch.bfloat16)
    calls, real = [], native.dpbf16_matmul

    def dpbf16(lib, x, w, *args):
        calls.append((tuple(w.shape), x.numel() // x.shape[-1]))
        return real(lib, x, w, *args)

    monkeypatch.setattr(native, "dpbf16_matmul", dpbf16)
    monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "native")
    experts = {(model.config.intermediate_size, model.config.hidden_size),
               (model.config.hidden_size, model.config.intermediate_size)}
    with torch.inference_mode():
        by_kernel = model(x).float()
        monkeypatch.setattr(native, "DPBF16_MAX_ROWS", 0)
        by_gemm = model(x).float()
    rows = [m for shape, m in calls if shape in experts]
    assert rows and max(rows) <= 16 and all(shape in experts for shape, _ in calls)  # 40-row products: torch's
    err, scale = (by_kernel - by_gemm).abs().amax(-1), by_gemm.abs().max()
    assert err.median() <= 0.01 * scale and (err <= 0.05 * scale).float().mean() >= 0.9


def test_prefill_of_quantized_experts_follows_the_compute_dtype(ckpt, monkeypatch):
    """Quantized experts in the prompt's pass: where bfloat16 is multiplied natively, on a CPU
    with AMX, AMX tiles on weights widened in L1 (native.amx_matmul); without AMX an expert's rows
    beyond quant.INTEGER_ROWS go to the bfloat16 GEMM with its weight rows widened by C a block at
    a time (blocked_linear); where prefill widens to float32, and for fewer rows, they are
    multiplied as integers against int16 activations (native.qmatmul). Either way close to each
    other."""
    from phimoe_cli.model import native

    if native.library() is None:
        pytest.skip("no C toolchain here")
    # ~150 rows an expert (4 experts, top 2), a few below the limit, most above
    x = torch.randint(0, 32000, (1, 300), generator=torch.Generator().manual_seed(7))
    model = load_model(ckpt, dtype=torch.bfloat16, quantize="int8")
    calls = []
    real_qmatmul, real_blocked, real_amx = native.qmatmul, kernels.blocked_linear, native.amx_matmul

    def qmatmul(lib, x, w, *args):
        calls.append(("qmatmul", tuple(w.shape), x.numel() // x.shape[-1]))
        return real_qmatmul(lib, x, w, *args)

    def blocked(x, shape, *args, **kw):
        calls.append(("blocked", tuple(shape), x.numel() // x.shape[-1]))
        return real_blocked(x, shape, *args, **kw)

    def amx(lib, x, w, *args):
        y = real_amx(lib, x, w, *args)
        if y is not None:
            calls.append(("amx", tuple(w.shape), x.numel() // x.shape[-1]))
        return y

    monkeypatch.setattr(native, "qmatmul", qmatmul)
    monkeypatch.setattr(native, "amx_matmul", amx)
    monkeypatch.setattr(quant, "blocked_linear", blocked)
    experts = {(model.config.intermediate_size, model.config.hidden_size),
               (model.config.hidden_size, model.config.intermediate_size)}
    with torch.inference_mode():
        monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "native")
        in_bf16 = model(x).float()
        on_amx = {"amx_tile", "amx_bf16"} <= set(native.cpuinfo().get("flags", "").split())
        used = {kind for kind, shape, _ in calls if shape in experts}
        assert used == {"amx"} if on_amx else "blocked" in used and used <= {"blocked", "qmatmul"}, used
        assert all((kind == "blocked") == (rows > quant.INTEGER_ROWS)
                   for kind, shape, rows in calls if shape in experts and kind != "amx")
        assert experts <= {shape for kind, shape, _ in calls if kind in ("blocked", "amx")}
        calls.clear()
        monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", "float32")
        as_integers = model(x).float()
    assert experts <= {shape for _, shape, _ in calls} and all(kind == "qmatmul" for kind, _, _ in calls)
    # per position, within a few bfloat16 steps, but for a routing flip here and there
    err, scale = (as_integers - in_bf16).abs().amax(-1), in_bf16.abs().max()
    assert err.median() <= 0.02 * scale and (err <= 0.05 * scale).float().mean() >= 0.9


def test_inductor_cache_is_kept_apart_per_instruction_set(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    decode.separate_cache_per_isa()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("_avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    decode.separate_cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"  # the user's choice stays


def test_one_graph_for_every_cache_length_and_capacity(tmp_path):
    """Decoding while the cache grows (and its views change length and strides) compiles the
    layer step once, not once per size."""
    from checkpoints import make_config
    from torch._dynamo.utils import counters

    cfg = make_config(9, hidden_size=48, num_attention_heads=3, num_key_value_heads=1)  # a shape no other test uses
    model = load_model(write_checkpoint(tmp_path, cfg, shards=1, seed=9))
    decode.choose(model, True)
    run(model, ids(6, seed=9), 3)  # compiles the lm_head matvec and the layer step once
    before = counters["stats"]["unique_graphs"]
    run(model, ids(40, seed=9), 3)  # capacity 8 -> 16 -> 32 -> 64 on the way
    assert decode.one_token_layers.compiled not in (None, False)
    assert counters["stats"]["unique_graphs"] == before  # nothing compiled again
