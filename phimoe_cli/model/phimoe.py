"""PhimoeModel, PhimoeForCausalLM and PhimoeForSequenceClassification.

Parameter names follow the published checkpoint (``model.layers.N.block_sparse_moe.gate`` …),
except that each layer's experts are stacked into three tensors (see ``layers.Experts``).
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import PhimoeConfig
from .layers import DecoderLayer, Linear, LongRoPE


class PhimoeModel(nn.Module):
    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.config = config
        # nn.Embedding's own initialisation on the meta device (loading.build_empty) imports
        # torch._dynamo, 2+ s of every start: initialise only real storage
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongRoPE(config)
        self.decode_step = None  # a one-token back-end (decode.choose), or None: these layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states [batch, seq, hidden] for ``input_ids`` [batch, seq].

        ``attention_mask`` (1 = token, 0 = padding) covers either the new tokens or, as in
        transformers, everything cached plus the new tokens. ``position_ids`` default to the
        token's index in the sequence. With a ``cache`` the new tokens are appended to it.
        """
        input_ids, position_ids, valid, start, long = self._admit(input_ids, attention_mask, position_ids, cache)
        b, s = input_ids.shape
        mask = self._mask(b, s, start, valid, input_ids.device)
        x = self.embed_tokens(input_ids)
        step, one_token = self.decode_step, b * s == 1 and mask is None and cache is not None and start > 0
        if step is not None and one_token and step.accepts(x, cache):
            x = step(self, x, cache, start, position_ids, long)  # every layer and the final norm
        else:
            cos, sin = self.rotary_emb(position_ids, long, x.dtype)
            for layer in self.layers:
                x = layer(x, cos, sin, mask, cache, start)
            x = self.norm(x)
        if cache is not None:
            cache.length = start + s
        return x

    def _admit(self, input_ids, attention_mask, position_ids, cache):
        """Positions, padding and LongRoPE factors of the new tokens; with a cache, record them
        there. Returns (input_ids, position_ids, valid, start, long); input_ids grows to the whole
        sequence when the cache has to be recomputed (see below)."""
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
        if cache is None:
            return input_ids, position_ids, valid, start, long
        if start and long != cache.long_rope:
            # The cached keys were rotated with the other factor set: growing past the boundary
            # (short -> long, as the reference does once during generation), or a rewind back
            # below it (long -> short, e.g. chat /retry). A fresh pass over the whole sequence
            # uses one set for every position, so compute it again, once.
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
        return input_ids, position_ids, valid, start, long

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

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (only the last ``logits_to_keep`` positions if > 0)."""
        s = input_ids.shape[1]
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        hidden = hidden[:, -s:]  # after a LongRoPE recompute the model returns the whole sequence
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        step = self.model.decode_step
        if step is not None and hidden.shape[0] * hidden.shape[1] == 1 and hidden.device.type == "cpu":
            return step.head(self.lm_head, hidden)  # one row: the back-end's matrix-vector product
        return self.lm_head(hidden)

    def recomputes(self, cache: KVCache, new_tokens: int) -> int:
        """How many cached tokens the next call with ``new_tokens`` more (default positions) computes
        again, because the sequence crosses LongRoPE's boundary (``PhimoeModel._admit``); 0: none."""
        start = cache.length
        long = self.model.rotary_emb.is_long(start + new_tokens)
        return start if start and long != cache.long_rope else 0

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        p = self.model.embed_tokens.weight  # (the head may be stored quantized)
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
