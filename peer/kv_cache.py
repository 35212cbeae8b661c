"""The keys and values of one session for the layers of one stage. Buffers grow in chunks (doubling,
capped at what the layer can need) and are written in place, so a decode step copies one token per
layer rather than the whole history. A step may start before the cached length: the cache is
truncated there first, so a replayed step overwrites rather than appends.

A sliding-window layer (window W: a query sees the keys at a distance under W) keeps only its last
W positions, in a ring: position p lives in slot p mod W. Its memory is bounded by the window
however long the session grows (Gemma 3's sliding layers, Mistral, Phi-3). Once a session is past
a window, a step may start no earlier than one position before the cached length (a replayed
single-token step): the keys an earlier start would need are gone. A step that fails midway may
have overwritten ring slots of positions before it; `abort` then empties the cache. It implements
the `update` call that transformers' attention layers make; budgets and sessions live in
`peer.executor`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SessionKVCache:
    """KV cache of one session: per local layer, keys/values [B, H_kv, capacity, head_dim]; a layer
    with a sliding window W holds at most W positions (`windows`, one entry per local layer, None
    for a layer that sees the whole past)."""

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
        windows: Sequence[int | None] | None = None,
    ) -> None:
        windows = list(windows) if windows is not None else [None] * num_layers
        if len(windows) != num_layers or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"windows must be {num_layers} positive sizes or None, not {windows}")
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.max_length = max_length
        self.windows: list[int | None] = [w if w is not None and w < max_length else None for w in windows]
        self.length = 0  # positions [0, length) are valid
        self._shape = (batch, kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self._chunk = chunk_tokens
        self._limits = [w or max_length for w in self.windows]  # the most positions each layer holds
        self._keys: list[torch.Tensor] = [torch.empty(self._shape, dtype=dtype, device=self._device)] * num_layers
        self._values: list[torch.Tensor] = list(self._keys)
        self._write_at = 0  # where the current step's keys go
        self._new = 0  # tokens in the current step
        self._overwrites = False  # whether the current step writes over ring slots of earlier positions

    @property
    def capacity(self) -> int:
        """Positions the largest buffer can hold without growing."""
        return max(k.shape[2] for k in self._keys)

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers now."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    @property
    def earliest_start(self) -> int:
        """The earliest position a step may start at: 0, or once the session is past a layer's
        window, one before the cached length."""
        return restart_limit(self.length, self.windows)

    def begin_step(self, start: int, new_tokens: int) -> None:
        """Prepare to write positions [start, start + new_tokens); drops anything cached from `start` on.
        ValueError for a start after the cached length or before `earliest_start`."""
        if not self.earliest_start <= start <= self.length:
            raise ValueError(
                f"step starts at {start} but the cache holds {self.length} positions"
                + (f" and can restart no earlier than {self.earliest_start}" if self.earliest_start else "")
            )
        if start + new_tokens > self.max_length:
            raise ValueError(f"step ends at {start + new_tokens}, past the session maximum {self.max_length}")
        self._grow(start + new_tokens)
        self._write_at, self._new = start, new_tokens
        self._overwrites = any(w is not None and start + new_tokens > w for w in self.windows)
        self.length = start

    def commit(self) -> None:
        """Mark the current step's positions valid."""
        self.length = self._write_at + self._new

    def abort(self) -> None:
        """The current step failed midway: keep the positions before it, or none where it may have
        overwritten a ring slot of one of them (the session must then start again from 0)."""
        self.length = 0 if self._overwrites else self._write_at

    def _grow(self, needed: int) -> None:
        for i, limit in enumerate(self._limits):
            capacity = self._keys[i].shape[2]
            if min(needed, limit) <= capacity:
                continue  # a full ring never grows: it is as large as its window
            capacity = min(limit, max(needed, self._chunk, 2 * capacity))
            # A ring that grows has not wrapped, so slot = position; the length may still count the
            # positions this step is about to overwrite, which costs a copy and nothing else.
            kept = min(self.length, limit)
            for buffers in (self._keys, self._values):
                b, h, _, d = self._shape
                new = torch.empty((b, h, capacity, d), dtype=self._dtype, device=self._device)
                new[:, :, :kept] = buffers[i][:, :, :kept]
                buffers[i] = new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, H_kv, T, hd] for a layer; return the ones its queries may
        see, [B, H_kv, end - first, hd] for the step's end `end` = start + T: first = 0 for a layer
        without a window or a session inside it, else max(0, start - W + 1), as `stage.attention_mask`
        counts. Positions come in order, except for a single-token step of a wrapped ring, which gets
        the ring as it lies (attention over one query is the same in any key order)."""
        i, new = layer_idx - self.first_layer, key_states.shape[2]
        keys, values, window = self._keys[i], self._values[i], self.windows[i]
        start, end = self._write_at, self._write_at + new
        if window is None or end <= window:  # slot = position
            keys.narrow(2, start, new).copy_(key_states)
            values.narrow(2, start, new).copy_(value_states)
            return keys.narrow(2, 0, end), values.narrow(2, 0, end)
        if new == 1:  # the ring holds exactly positions [end - W, end) once this one is in
            keys.narrow(2, start % window, 1).copy_(key_states)
            values.narrow(2, start % window, 1).copy_(value_states)
            return keys, values
        # Several queries past the window: the retained keys they see, in order, then the new ones.
        first = max(0, start - window + 1)
        slots = torch.arange(first, start, device=keys.device) % window
        seen = [torch.cat([buffer.index_select(2, slots), states], dim=2) for buffer, states in
                ((keys, key_states), (values, value_states))]  # fmt: skip
        kept = min(new, window)  # the step's last W positions go to their slots
        slots = torch.arange(end - kept, end, device=keys.device) % window
        keys.index_copy_(2, slots, key_states.narrow(2, new - kept, kept))
        values.index_copy_(2, slots, value_states.narrow(2, new - kept, kept))
        return seen[0], seen[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached before the current step (the interface transformers expects)."""
        return self.length


def restart_limit(length: int, windows: Sequence[int | None]) -> int:
    """The earliest position a step may start at, for a session holding `length` positions in layers
    with these sliding `windows` (None: no window): 0 until the session is past a window, then one
    before `length`. Every position a step from there on needs is still held."""
    wrapped = any(w is not None and length > w for w in windows)
    return max(0, length - 1) if wrapped else 0
