"""PhimoeModel, PhimoeForCausalLM and PhimoeForSequenceClassification.

Parameter names follow the published checkpoint (``model.layers.N.block_sparse_moe.gate`` …),
except that each layer's experts are stacked into three tensors (see ``layers.Experts``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import native
from .cache import KVCache
from .config import PhimoeConfig
from .layers import (
    Attention,
    DecoderLayer,
    Experts,
    Linear,
    LongRoPE,
    decode_groups,
    one_token_layers,
)


class PhimoeModel(nn.Module):
    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongRoPE(config)
        self.decode_fast = False  # one-token steps by the compiled layer groups (use_decode_kernel)
        self.native: native.Decoder | None = None  # one-token steps by the C step (use_decode_kernel)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [batch, seq, hidden] for ``input_ids`` [batch, seq].

        ``attention_mask`` (1 = token, 0 = padding) covers either the new tokens or, as in
        transformers, everything cached plus the new tokens. ``position_ids`` default to the
        token's index in the sequence. With a ``cache`` the new tokens are appended to it.
        """
        b, s = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + s, device=input_ids.device).expand(b, s)
            seq_len = start + s
        else:
            seq_len = int(position_ids.max()) + 1
        valid = None
        if attention_mask is not None:
            valid = attention_mask[:, -s:].to(device=input_ids.device, dtype=torch.bool)
        long = self.rotary_emb.is_long(seq_len)

        if cache is not None:
            if start and long != cache.long_rope:
                # The cached keys were rotated with the other factor set: growing past the
                # boundary (short -> long, as the reference does once during generation), or a
                # rewind back below it (long -> short, e.g. chat /retry). A fresh pass over the
                # whole sequence uses one set for every position, so compute it again, once.
                old_valid = cache.valid[:, :start] if (cache.padded or valid is not None) else None
                if old_valid is not None and valid is None:
                    valid = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
                input_ids = torch.cat([cache.tokens[:, :start], input_ids], dim=1)
                position_ids = torch.cat([cache.positions[:, :start], position_ids], dim=1)
                if old_valid is not None:
                    valid = torch.cat([old_valid, valid], dim=1)
                cache.reset()
                start, s = 0, input_ids.shape[1]
            cache.reserve(start + s)
            cache.record(input_ids, position_ids, valid, start)
            cache.long_rope = long
            if cache.padded:
                valid = cache.valid[:, : start + s]

        mask = self._mask(b, s, start, valid, input_ids.device)
        x = self.embed_tokens(input_ids)
        if (self.native is not None and b * s == 1 and mask is None and cache is not None and start > 0
                and self.native.accepts(x, cache)):
            x = self.native(x, cache, start, int(position_ids.reshape(-1)[0]), long)
            cache.length = start + s
            return x
        cos, sin = self.rotary_emb(position_ids, long, x.dtype)
        one_token = b * s == 1 and mask is None and cache is not None and start > 0
        if self.decode_fast and one_token and x.device.type == "cpu":
            c, moe = self.config, self.layers[0].block_sparse_moe
            consts = (c.rms_norm_eps, moe.jitter_eps, moe.top_k, c.num_attention_heads, c.num_key_value_heads)
            for group in decode_groups(len(self.layers)):
                layers = tuple(self.layers[i].decode_args(cache, start) for i in group)
                x = one_token_layers(x, cos, sin, layers, *consts)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, cache, start)
        if cache is not None:
            cache.length = start + s
        return self.norm(x)

    def _mask(self, b: int, s: int, start: int, valid, device):
        """None when plain causal attention is right (SDPA's fast path); otherwise a boolean
        [batch, 1, s, start + s] mask: causal, minus padding keys, minus keys beyond the sliding
        window. A query always sees itself, so padding rows never become all -inf."""
        total = start + s
        window = self.config.sliding_window
        windowed = window is not None and total > window
        if valid is None and not windowed and (start == 0 or s == 1):
            return None
        q = torch.arange(start, total, device=device)[:, None]
        k = torch.arange(total, device=device)[None, :]
        allowed = k <= q
        if windowed:
            allowed = allowed & (q - k < window)
        allowed = allowed.expand(b, 1, s, total)
        if valid is not None:
            allowed = allowed & valid[:, None, None, :]
        return allowed | (k == q)


class PhimoeForCausalLM(nn.Module):
    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.config = config
        self.model = PhimoeModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.decode_kernel: str | None = None  # native, compiled or eager; None: decided on the first call

    def use_decode_kernel(self, kind: bool | str) -> None:
        """How one-token steps on the CPU run: ``"native"`` (the C step of native.py, for plain
        bfloat16 models), ``"compiled"`` (inductor kernels, kernels.py) or ``"eager"``. True means
        "compiled", False "eager". Where "native" cannot run (no C compiler, quantized or
        offloaded layers, another dtype) the compiled kernels take over."""
        kind = {True: "compiled", False: "eager"}.get(kind, kind)
        if kind not in ("native", "compiled", "eager"):
            raise ValueError(f"unknown decode kernel {kind!r} (native, compiled or eager)")
        lib = native.library() if kind == "native" else None
        enabled = kind != "eager"
        for module in self.modules():
            # only the plain layers: quantized or offloaded ones keep their own forward
            if type(module) in (Linear, Experts):
                module.fast = enabled
            elif type(module) is Attention:
                projections = (module.q_proj, module.k_proj, module.v_proj, module.o_proj)
                module.fast = enabled and all(type(p) is Linear for p in projections)
            if type(module) is Linear:
                module.native = lib
        for layer in self.model.layers:
            moe = layer.block_sparse_moe
            layer.fast = layer.self_attn.fast and moe.experts.fast and type(moe.gate) is nn.Linear
        self.model.decode_fast = all(layer.fast for layer in self.model.layers)
        whole = lib is not None and native.supports(self)
        self.model.native = native.Decoder(self.model, lib) if whole else None
        self.decode_kernel = "native" if whole else "compiled" if enabled else "eager"

    def _default_decode_kernel(self) -> str:
        """``PHIMOE_DECODE_KERNEL`` (native, compiled or eager), else: the C step where it can
        run; else the compiled kernels for models of 256 MiB or more (where bandwidth dominates and
        the one-off compile, a few seconds, pays off)."""
        choice = os.environ.get("PHIMOE_DECODE_KERNEL", "auto")
        if choice in ("eager", "compiled", "native"):
            return choice
        p = self.lm_head.weight
        if p.device.type != "cpu":
            return "eager"
        if native.supports(self) and native.library() is not None:
            return "native"
        size = sum(t.nbytes for t in (*self.parameters(), *self.buffers()))  # quantized weights are buffers
        return "compiled" if size >= 256 << 20 else "eager"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (only the last ``logits_to_keep`` positions if > 0)."""
        if self.decode_kernel is None:
            self.use_decode_kernel(self._default_decode_kernel())
        s = input_ids.shape[1]
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        hidden = hidden[:, -s:]  # after a LongRoPE recompute the model returns the whole sequence
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity, dtype=p.dtype, device=p.device)


class PhimoeForSequenceClassification(nn.Module):
    """A ``score`` head on the hidden state of each sequence's last non-padding token."""

    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.config = config
        self.model = PhimoeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, num_labels]."""
        logits = self.score(self.model(input_ids, attention_mask, position_ids))
        b, s = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if b != 1:
                raise ValueError("batches of more than one sequence need pad_token_id in the config")
            last = torch.full((b,), s - 1, device=input_ids.device)
        else:
            # the rightmost token that is not padding (as transformers pools)
            index = torch.arange(s, device=input_ids.device)
            last = (index * (input_ids != pad)).argmax(-1)
        return logits[torch.arange(b, device=input_ids.device), last]
