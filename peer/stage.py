"""One pipeline stage of a Llama-architecture model: the decoder layers [start, end), plus the
token embeddings on the first stage and the final norm and LM head on the last. Plain torch.nn
around transformers' own Llama layers, so a chain of stages computes exactly what the whole
Hugging Face model computes. It knows nothing of sessions, budgets, files or networks."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from peer.errors import LayerRangeError
from peer.kv_cache import SessionKVCache
from peer.profile import check_supported


class StageModel(nn.Module):
    """Layers [start, end) of a Llama model; embeddings if start == 0, norm and head if end == L."""

    def __init__(self, config: Any, start: int, end: int) -> None:
        super().__init__()
        check_supported(config)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise LayerRangeError(f"stage range [{start}, {end}) is not inside [0, {config.num_hidden_layers})")
        config = copy.copy(config)
        config._attn_implementation = "sdpa"  # what from_pretrained picks, so the math matches
        self.config = config
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        # layer_idx stays global: the KV cache maps it to the stage's own buffers.
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(start, end))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
        with torch.device("cpu"):  # rotary tables are computed, never loaded, even on a meta build
            self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def checkpoint_names(self) -> dict[str, str]:
        """This module's parameter names -> the Hugging Face checkpoint names they load from."""
        names = {}
        for name, _ in self.named_parameters(remove_duplicate=False):
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                names[name] = f"model.layers.{self.start + int(local)}.{rest}"
            elif name == "lm_head.weight":
                names[name] = "lm_head.weight"
            else:
                names[name] = f"model.{name}"
        return names

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        cache: SessionKVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the stage on one step of a session.

        inputs: token ids [B, T] (first stage) or hidden states [B, T, D]; positions: [B, T].
        Returns hidden states [B, T, D], or on the last stage logits [B, V] for the final position
        ([B, T, V] with all_logits). The caller has called cache.begin_step(positions[0, 0], T).
        """
        hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [B, T, D]
        position_embeddings = self.rotary_emb(hidden, positions)
        mask = causal_mask(cache.length, hidden.shape[1], hidden.device)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                position_embeddings=position_embeddings,
            )
        if self.norm is None or self.lm_head is None:
            return hidden
        if not all_logits:
            hidden = hidden[:, -1, :]  # only the next token's logits are needed: [B, D]
        return self.lm_head(self.norm(hidden))


def causal_mask(past: int, new: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [1, 1, new, past + new], or None where SDPA's own causal rule is exact.

    With no past the kernel's is_causal applies; a single new token attends to everything.
    """
    if past == 0 or new == 1:
        return None
    query = torch.arange(new, device=device)[:, None] + past
    key = torch.arange(past + new, device=device)[None, :]
    return (key <= query)[None, None]
