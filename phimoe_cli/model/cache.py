"""A preallocated KV cache.

Keys and values for every layer live in two tensors ``[layers, batch, kv_heads, capacity + 1, head_dim]``
written in place: decoding one token allocates nothing. The cache also remembers the token ids,
position ids and padding mask it has seen, so the model can recompute it once when a sequence
grows past LongRoPE's ``original_max_position_embeddings`` (the cached keys were rotated with the
short factors; from then on every position uses the long ones), and ``truncate`` lets a chat rewind
to an earlier turn without recomputing the shared prefix.
"""

from __future__ import annotations

import torch

from .config import PhimoeConfig


class KVCache:
    def __init__(
        self,
        config: PhimoeConfig,
        batch_size: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_capacity = config.max_position_embeddings
        self.length = 0  # tokens cached
        self.long_rope = False  # whether the cached keys were rotated with the long factors
        self.padded = False  # whether any cached position is padding
        self.capacity = 0
        self._allocate(min(capacity, self.max_capacity))

    def _allocate(self, capacity: int) -> None:
        # Always ordinary tensors, also when the cache grows inside torch.inference_mode(): the
        # compiled decode step guards on the kind of tensor and would compile again.
        with torch.inference_mode(False):
            c = self.config
            # one spare row: a view of the first n rows then never looks contiguous, which would let
            # the compiled decode step specialise on (and later recompile for) a full cache
            shape = (c.num_hidden_layers, self.batch_size, c.num_key_value_heads, capacity + 1, c.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            tokens = torch.zeros(self.batch_size, capacity, dtype=torch.long, device=self.device)
            positions = torch.zeros_like(tokens)
            valid = torch.ones(self.batch_size, capacity, dtype=torch.bool, device=self.device)
            n = self.length
            if n:
                k[..., :n, :] = self.k[..., :n, :]
                v[..., :n, :] = self.v[..., :n, :]
                tokens[:, :n], positions[:, :n], valid[:, :n] = (
                    self.tokens[:, :n], self.positions[:, :n], self.valid[:, :n],
                )
            self.k, self.v, self.tokens, self.positions, self.valid = k, v, tokens, positions, valid
            self.capacity = capacity

    def reserve(self, total: int) -> None:
        """Make room for ``total`` tokens, growing geometrically (rarely, never per token)."""
        if total > self.max_capacity:
            raise ValueError(
                f"sequence of {total} tokens exceeds the context length ({self.max_capacity})"
            )
        if total > self.capacity:
            self._allocate(min(self.max_capacity, max(total, 2 * self.capacity)))

    def record(self, input_ids, position_ids, valid, start: int) -> None:
        """Remember the ids, positions and padding mask of tokens ``start .. start + n``."""
        n = input_ids.shape[1]
        self.tokens[:, start : start + n] = input_ids
        self.positions[:, start : start + n] = position_ids
        if valid is None:
            self.valid[:, start : start + n] = True
        else:
            self.valid[:, start : start + n] = valid
            self.padded = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write this step's keys/values for ``layer``; return views of everything cached so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.window(layer, end)

    def window(self, layer: int, end: int):
        """Views of ``layer``'s keys and values for positions ``0 .. end``."""
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens."""
        self.length = max(0, min(self.length, length))
        if self.length == 0:
            self.long_rope = False
            self.padded = False

    def shared_prefix(self, ids: list[int]) -> int:
        """How many cached tokens are a prefix of ``ids`` (at most all but the last of them, so that
        the last position's logits are computed again)."""
        n = min(self.length, len(ids) - 1)
        if n <= 0:
            return 0
        same = self.tokens[0, :n].cpu() == torch.tensor(ids[:n], dtype=torch.long)
        return n if bool(same.all()) else int(same.long().cumprod(0).sum())

    def copy_prefix(self, source: KVCache, length: int) -> None:
        """Hold the first ``length`` tokens of ``source`` (keys, values, ids, positions, flags),
        forgetting everything this cache held: a second sequence that shares a prefix with it."""
        n = min(length, source.length)
        self.reserve(n)
        with torch.inference_mode(False):
            self.k[..., :n, :] = source.k[..., :n, :]
            self.v[..., :n, :] = source.v[..., :n, :]
            self.tokens[:, :n], self.positions[:, :n], self.valid[:, :n] = (
                source.tokens[:, :n], source.positions[:, :n], source.valid[:, :n],
            )
        self.length = n
        self.long_rope = source.long_rope and n > 0
        self.padded = source.padded and n > 0

    def reset(self) -> None:
        self.truncate(0)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
