"""The PhiMoE model against the reference: transformers' PhimoeForCausalLM on the same files."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import make_config, random_state_dict, write_checkpoint

from phimoe_cli.model import (
    ConfigError,
    PhimoeConfig,
    PhimoeForCausalLM,
    PhimoeForSequenceClassification,
    load_model,
)
from phimoe_cli.model.loading import load_classifier

transformers = pytest.importorskip("transformers")

ATOL = 2e-4  # float32 logits of magnitude ~5; observed differences are ~1e-6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), shards=3, seed=0)


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_model(ckpt, dtype="float32")


def reference(path, fix_longrope: bool = False, cls=None):
    cls = cls or transformers.PhimoeForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if fix_longrope:
        _use_long_factors(model)
    return model


def _use_long_factors(model) -> None:
    """transformers 5.x's PhimoeRotaryEmbedding always uses the short factors (a bug). Replace its
    forward with the published LongRoPE rule, computed by transformers' own longrope formula."""
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    rot, cfg = model.model.rotary_emb, model.config
    params = cfg.rope_parameters

    def forward(x, position_ids):
        seq_len = int(position_ids.max()) + 1
        inv_freq, _ = _compute_longrope_parameters(cfg, x.device, seq_len=seq_len)
        long = seq_len > params["original_max_position_embeddings"]
        mscale = params["long_mscale"] if long else params["short_mscale"]
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    rot.forward = forward


@pytest.fixture(scope="module")
def ref(ckpt):
    return reference(ckpt)


def ids(n, batch=1, seed=0):
    return torch.randint(0, 32000, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- config
def test_config_reads_hub_format(ckpt):
    cfg = PhimoeConfig.from_file(ckpt / "config.json")
    raw = json.loads((ckpt / "config.json").read_text())
    assert cfg.hidden_size == raw["hidden_size"]
    assert cfg.rope_theta == raw["rope_theta"]
    assert cfg.rope_scaling.long_factor == raw["rope_scaling"]["long_factor"]
    assert cfg.rope_scaling.short_mscale == raw["rope_scaling"]["short_mscale"]
    assert cfg.original_max_position_embeddings == raw["rope_scaling"]["original_max_position_embeddings"]
    assert cfg.lm_head_bias is True and cfg.attention_bias is True


def test_config_reads_transformers5_format(ckpt, tmp_path):
    tcfg = transformers.AutoConfig.from_pretrained(ckpt)
    tcfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved  # the format under test
    ours_ = PhimoeConfig.from_file(tmp_path / "config.json")
    hub = PhimoeConfig.from_file(ckpt / "config.json")
    assert ours_.rope_scaling == hub.rope_scaling
    assert ours_.rope_theta == hub.rope_theta
    assert (ours_.hidden_size, ours_.num_key_value_heads) == (hub.hidden_size, hub.num_key_value_heads)


def test_config_defaults_are_the_published_models():
    cfg = PhimoeConfig.from_dict({"model_type": "phimoe"})
    assert cfg.rope_theta == 10000.0  # transformers' default would be 1e6
    assert (cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (4096, 16, 2)
    assert cfg.vocab_size == 32064 and cfg.head_dim == 128 and cfg.router_jitter_noise == 0.01


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size": 65}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"rope_theta": "x"}, "rope_theta"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8,
                           "short_mscale": 1.0, "long_mscale": 1.0}}, "short_factor"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type"),
    ],
)
def test_config_validation_names_the_field(tmp_path, change, field):
    cfg = make_config()
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        PhimoeConfig.from_file(tmp_path)
    msg = str(err.value)
    assert field in msg and "\n" not in msg


# ----------------------------------------------------------------------------------- parity
@pytest.mark.isa  # run again under another ISA's kernels (test_isa.py)
def test_logits_match_transformers(ours, ref):
    x = ids(48)
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    assert a.shape == b.shape == (1, 48, 32064)
    assert (a - b).abs().max().item() < ATOL


def test_batched_left_padded_logits_match(ours, ref):
    x = ids(40, batch=3, seed=1)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    mask[2, :25] = 0
    x = x.masked_fill(mask == 0, 32000)
    with torch.no_grad():
        # positions as transformers' forward defaults to (the index), then as generate() counts them
        for pos in (None, (mask.cumsum(-1) - 1).clamp(min=0)):
            a = ours(x, attention_mask=mask, position_ids=pos)
            b = ref(x, attention_mask=mask, position_ids=pos).logits
            real = mask.bool()
            assert torch.isfinite(a).all()
            assert (a[real] - b[real]).abs().max().item() < ATOL


def test_padded_row_equals_unpadded_row(ours):
    """A left-padded sequence, with generate()-style positions, gives the logits of the bare sequence."""
    x = ids(30, seed=2)
    padded = torch.cat([torch.full((1, 9), 32000), x], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(padded, attention_mask=mask, position_ids=pos)[:, 9:]
        b = ours(x)
    assert (a - b).abs().max().item() < ATOL


@pytest.mark.isa  # run again under another ISA's kernels (test_isa.py)
def test_prefill_then_decode_equals_full_forward(ours, ref):
    x = ids(50, seed=3)
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache(capacity=8)  # also exercises growth
        steps = [ours(x[:, :20], cache=cache)]
        steps += [ours(x[:, t : t + 1], cache=cache) for t in range(20, 44)]
        steps.append(ours(x[:, 44:], cache=cache))  # a multi-token chunk after a prefix
        inc = torch.cat(steps, dim=1)
        b = ref(x).logits
    assert cache.length == 50
    assert (inc - full).abs().max().item() < ATOL
    assert (inc - b).abs().max().item() < ATOL


def test_padded_batch_decode_with_cache(ours):
    x = ids(30, batch=2, seed=4)
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    with torch.no_grad():
        full = ours(x, attention_mask=mask)
        cache = ours.new_cache(batch_size=2)
        a = ours(x[:, :20], attention_mask=mask[:, :20], cache=cache)
        b = ours(x[:, 20:], attention_mask=mask, cache=cache)  # mask over past + new, as transformers
        inc = torch.cat([a, b], dim=1)
    real = mask.bool()
    assert (inc[real] - full[real]).abs().max().item() < ATOL


def greedy(model, prompt, n, stop):
    cache = model.new_cache()
    out, x = [], prompt
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(x, cache=cache, logits_to_keep=1)[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        x = torch.tensor([[nxt]])
    return out


def test_greedy_32_tokens_match_transformers_generate(ours, ref):
    prompt = ids(20, seed=5)  # 20 + 32 stays below original_max_position_embeddings (64)
    stop = {32000, 32001, 32007}
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, 20:].tolist()
    got = greedy(ours, prompt, 32, stop)
    assert got == expected[: len(got)] and len(got) == len(expected)
    assert len(set(got)) > 3  # a real continuation, not one token repeated


# ------------------------------------------------------------------------------------ LongRoPE
def test_long_prompt_uses_long_factors(ckpt, ours):
    fixed = reference(ckpt, fix_longrope=True)
    buggy = reference(ckpt)
    x = ids(100, seed=6)  # longer than original_max_position_embeddings = 64
    with torch.no_grad():
        a, b, c = ours(x), fixed(x).logits, buggy(x).logits
    assert (a - b).abs().max().item() < ATOL
    assert (a - c).abs().max().item() > 1e-2  # the test can tell the factors apart


def test_decoding_across_the_longrope_boundary_equals_full_forward(ckpt, ours):
    fixed = reference(ckpt, fix_longrope=True)
    x = ids(80, seed=7)
    cache = ours.new_cache()
    with torch.no_grad():
        ours(x[:, :58], cache=cache)
        assert not cache.long_rope
        for t in range(58, 80):
            step = ours(x[:, t : t + 1], cache=cache)[0, -1]
            expected = fixed(x[:, : t + 1]).logits[0, -1]  # a fresh full pass over t + 1 tokens
            assert (step - expected).abs().max().item() < ATOL, f"position {t}"
        assert cache.long_rope and cache.length == 80
        # after the one recompute, the cache holds long-factor keys: a full forward agrees
        assert (ours(x)[0, -1] - step).abs().max().item() < ATOL


def test_rewinding_below_the_longrope_boundary_recomputes(ours):
    """After the cache switched to the long factors, rewinding (chat /retry, /undo) to a sequence
    that fits the original context must give the logits of a fresh pass, which uses the short ones."""
    x = ids(70, seed=16)  # crosses original_max_position_embeddings = 64
    cache = ours.new_cache()
    with torch.no_grad():
        ours(x, cache=cache)
        assert cache.long_rope
        cache.truncate(40)
        step = ours(x[:, 40:50], cache=cache)
        fresh = ours(x[:, :50])[:, 40:]
    assert not cache.long_rope
    assert (step - fresh).abs().max().item() < ATOL


def test_truncate_then_continue(ours):
    """Rewinding the cache (chat /undo, /retry) gives the logits of the shorter sequence."""
    x, y = ids(30, seed=8), ids(10, seed=9)
    cache = ours.new_cache()
    with torch.no_grad():
        ours(x, cache=cache)
        ours(ids(12, seed=10), cache=cache)
        cache.truncate(30)
        a = ours(y, cache=cache)
        b = ours(torch.cat([x, y], dim=1))[:, 30:]
    assert (a - b).abs().max().item() < ATOL


# ------------------------------------------------------------------------------ sliding window
def test_sliding_window_matches_transformers(tmp_path):
    cfg = make_config(seed=11, sliding_window=16, num_hidden_layers=1)
    path = write_checkpoint(tmp_path, cfg, shards=1, seed=11)
    ours_, ref_ = load_model(path), reference(path)
    x = ids(40, seed=12)
    with torch.no_grad():
        a, b = ours_(x), ref_(x).logits
        cache = ours_.new_cache()
        steps = [ours_(x[:, :25], cache=cache)] + [ours_(x[:, t : t + 1], cache=cache) for t in range(25, 40)]
        inc = torch.cat(steps, 1)
        unwindowed = ours_(x[:, :1])  # sanity: within the window nothing changes
    assert (a - b).abs().max().item() < ATOL
    assert (inc - b).abs().max().item() < ATOL
    assert (a[:, :1] - unwindowed).abs().max().item() < ATOL


# ---------------------------------------------------------------------------- classification
def test_sequence_classification_matches_transformers(tmp_path):
    cfg = make_config(seed=13, pad_token_id=32000, num_labels=3,
                      id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    sd = random_state_dict(cfg, seed=13, classifier_labels=3)
    path = write_checkpoint(tmp_path, cfg, sd, shards=2, seed=13)
    ours_ = load_classifier(path)
    ref_ = reference(path, cls=transformers.PhimoeForSequenceClassification)
    x = ids(24, batch=3, seed=14)
    x[1, 15:] = 32000  # right padding: pooled at token 14
    x[2, 20:] = 32000
    mask = (x != 32000).long()
    with torch.no_grad():
        a = ours_(x, attention_mask=mask)
        b = ref_(x, attention_mask=mask).logits
    assert a.shape == (3, 3)
    assert (a - b).abs().max().item() < ATOL


# ---------------------------------------------------------------------------------- dtypes
@pytest.mark.isa  # run again under another ISA's kernels (test_isa.py)
def test_auto_dtype_and_bfloat16(tmp_path, ours):
    path = write_checkpoint(tmp_path, make_config(), dtype=torch.bfloat16, shards=2)
    auto = load_model(path, dtype="auto")
    assert auto.lm_head.weight.dtype == torch.bfloat16
    assert auto.model.rotary_emb.long_inv_freq.dtype == torch.float32  # tables stay exact
    fp32 = load_model(path, dtype="float32")
    x = ids(30, seed=15)
    with torch.no_grad():
        lo, hi = auto(x).float(), fp32(x)
    # bf16 compute of the same bf16 weights: close, not equal
    assert (lo - hi).abs().max().item() < 0.1 * hi.abs().max().item()


def test_api_shapes_and_eval_mode(ours):
    assert isinstance(ours, PhimoeForCausalLM) and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    out = ours(ids(5, batch=2))
    assert out.shape == (2, 5, 32064)
    assert isinstance(PhimoeForSequenceClassification, type)
