"""A model's memory profile, computed from its config alone: bytes of one decoder layer, of the
embeddings, the final norm and the LM head, KV-cache bytes per token per layer and each layer's
sliding window, for a dtype and a quantization of the weights (`peer.quantize`).
The partitioner sizes stages with it and the shard loader checks against it; it reads no weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from peer.architectures import architecture_of
from peer.quantize import QUANTIZE_MODES, held_as, quantized_bytes


def head_dim(config: Any) -> int:
    """Per-head dimension, explicit in newer configs and derived in older ones."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@dataclass(frozen=True)
class ModelProfile:
    """Bytes of each part of a model at one dtype."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: torch.dtype
    tied_embeddings: bool
    layer_bytes: int  # one decoder layer: attention (with any biases and QK norms), MLP, norms
    embedding_bytes: int  # token embedding table, held by the first stage
    norm_bytes: int  # final RMSNorm, held by the last stage
    head_bytes: int  # LM head, held by the last stage (a copy of the embeddings when tied)
    kv_bytes_per_token_per_layer: int  # keys and values of one token in one layer
    quantize: str = "none"  # how projection, head and embedding weights are held
    # Each layer's sliding window (its KV cache holds at most that many positions); () for none anywhere.
    layer_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype = torch.float32, quantize: str = "none") -> ModelProfile:
        """Profile a config of a supported architecture (`peer.architectures`) at `dtype`, with the
        weights held as `peer.quantize.held_as` says for the setting `quantize`; UnsupportedModel for an
        architecture without a row, ValueError for an unknown quantization."""
        arch = architecture_of(config)
        decoder_layer, _, _ = arch.classes()
        d, hd, hkv = config.hidden_size, head_dim(config), config.num_key_value_heads
        elt = torch.empty((), dtype=dtype).element_size()

        def held(name: str, shape: tuple[int, ...]) -> int:
            scheme = held_as(name, shape, quantize)
            return math.prod(shape) * elt if scheme == "none" else quantized_bytes(shape, scheme, dtype)

        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
        with torch.device("meta"):  # shapes only: what transformers builds, biases and norms included
            layer = decoder_layer(config, layer_idx=0)
            attention = type(cast(Any, layer).self_attn)
            windows = tuple(
                arch.layer_window(config, attention(config, layer_idx=i)) for i in range(config.num_hidden_layers)
            )
        table = held("embed_tokens.weight", (config.vocab_size, d))
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=d,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            dtype=dtype,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            layer_bytes=sum(held(f"layers.0.{n}", tuple(p.shape)) for n, p in layer.named_parameters()),
            embedding_bytes=table,
            norm_bytes=d * elt,
            head_bytes=table,
            kv_bytes_per_token_per_layer=2 * hkv * hd * elt,
            quantize=quantize,
            layer_windows=windows if any(windows) else (),
        )

    def stage_weight_bytes(self, start: int, end: int) -> int:
        """Weight bytes of the stage holding layers [start, end), with embeddings and head as placed."""
        total = (end - start) * self.layer_bytes
        first, last = start == 0, end == self.num_layers
        if first:
            total += self.embedding_bytes
        if last:
            total += self.norm_bytes
            # A single stage holding both ends of a tied model keeps one table for both.
            if not (first and self.tied_embeddings):
                total += self.head_bytes
        return total

    def kv_bytes(self, start: int, end: int, tokens: int, batch: int = 1) -> int:
        """KV-cache bytes for `tokens` positions of `batch` sequences in layers [start, end), a
        sliding-window layer holding at most its window (as `SessionKVCache` holds them)."""
        windows = self.layer_windows or (None,) * self.num_layers
        held = sum(min(tokens, w or tokens) for w in windows[start:end])
        return held * batch * self.kv_bytes_per_token_per_layer

    @property
    def total_weight_bytes(self) -> int:
        """Weight bytes of the whole model held by one stage."""
        return self.stage_weight_bytes(0, self.num_layers)
