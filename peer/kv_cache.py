"""The keys and values of one session for the layers of one stage. Buffers grow in chunks (doubling,
capped at the session's maximum length) and are written in place, so a decode step copies one
token per layer rather than the whole history. A step may start before the cached length: the
cache is truncated there first, so a replayed step overwrites rather than appends. It implements
the `update` call that transformers' attention layers make; budgets and sessions live in
`peer.executor`."""

from __future__ import annotations

from typing import Any

import torch


class SessionKVCache:
    """KV cache of one session: per local layer, keys/values [B, H_kv, capacity, head_dim]."""

    def __init__(
        self,
        *,
        first_layer: int,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
        chunk_tokens: int = 64,
    ) -> None:
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.max_length = max_length
        self.length = 0  # positions [0, length) are valid
        self._shape = (batch, kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self._chunk = chunk_tokens
        self._capacity = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._write_at = 0  # where the current step's keys go
        self._new = 0  # tokens in the current step

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold without growing."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers now."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def begin_step(self, start: int, new_tokens: int) -> None:
        """Prepare to write positions [start, start + new_tokens); drops anything cached from `start` on."""
        if not 0 <= start <= self.length:
            raise ValueError(f"step starts at {start} but the cache holds {self.length} positions")
        if start + new_tokens > self.max_length:
            raise ValueError(f"step ends at {start + new_tokens}, past the session maximum {self.max_length}")
        self._grow(start + new_tokens)
        self._write_at, self._new = start, new_tokens
        self.length = start

    def commit(self) -> None:
        """Mark the current step's positions valid."""
        self.length = self._write_at + self._new

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, min(self.max_length, max(self._chunk, 2 * self._capacity)))
        b, h, _, d = self._shape
        for buffers in (self._keys, self._values):
            old = list(buffers)
            buffers.clear()
            for i in range(self.num_layers):
                new = torch.empty((b, h, capacity, d), dtype=self._dtype, device=self._device)
                if old:
                    new[:, :, : self.length] = old[i][:, :, : self.length]
                buffers.append(new)
        self._capacity = capacity

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, H_kv, T, hd] for a layer; return all valid ones so far."""
        i, new = layer_idx - self.first_layer, key_states.shape[2]
        keys, values = self._keys[i], self._values[i]
        keys.narrow(2, self._write_at, new).copy_(key_states)
        values.narrow(2, self._write_at, new).copy_(value_states)
        end = self._write_at + new
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached before the current step (the interface transformers expects)."""
        return self.length
