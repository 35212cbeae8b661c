"""What differs between the decoder-only architectures a stage can hold, in one table: the classes
transformers itself uses for each architecture's decoder layer, RMSNorm and rotary embedding, and
the few switches the stage's arithmetic and the start-up checks read (biases are the modules' own).
A stage runs transformers' own modules and weights for every architecture here; nothing is copied
per architecture.

What the architectures here share (a pre-norm residual block: RMSNorm, attention with rotary
positions, RMSNorm, gated MLP) is the stage's code; what they do not share is a row of this table.
An architecture whose layers need more than the table can say (sliding-window attention, sandwich
norms, mixtures of experts) is refused by `architecture_of` until it has its row."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from peer.errors import UnsupportedModel


@dataclass(frozen=True)
class Architecture:
    """One decoder-only architecture: transformers' module names and what sets it apart."""

    model_type: str  # config.model_type
    module: str  # transformers' modeling module, e.g. "transformers.models.qwen3.modeling_qwen3"
    prefix: str  # its class names' prefix, e.g. "Qwen3"
    examples: str  # model families users know it by, for messages
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before the rotation
    window_from_config: bool = False  # config.sliding_window, when set, limits every layer's attention
    gguf: bool = False  # GGUF files read (their Q/K rows un-permuted as llama.cpp's Llama converter permutes them)

    def classes(self) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
        """(decoder layer, RMSNorm, rotary embedding) classes, from transformers."""
        module = importlib.import_module(self.module)
        p = self.prefix
        return (
            getattr(module, f"{p}DecoderLayer"),
            getattr(module, f"{p}RMSNorm"),
            getattr(module, f"{p}RotaryEmbedding"),
        )


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "transformers.models.llama.modeling_llama", "Llama", "TinyLlama, SmolLM2, Llama 2/3",
                     gguf=True),
        Architecture("mistral", "transformers.models.mistral.modeling_mistral", "Mistral",
                     "Mistral 7B v0.2 and later, without a sliding window", window_from_config=True),
        Architecture("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2", "Qwen2, Qwen2.5"),
        Architecture("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", "Qwen3 dense", qk_norm=True),
    )
}  # fmt: skip


def architecture_of(config: Any) -> Architecture:
    """The table's row for `config`. UnsupportedModel, naming the model type and listing the supported
    ones, for a model type not in the table or a config whose layers use what no row describes:
    sliding-window attention (a `layer_types` entry other than full attention; for a row that reads
    it, a `sliding_window` shorter than the context), tensor-parallel pretraining."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = "; ".join(f"{a.model_type} ({a.examples})" for a in ARCHITECTURES.values())
        raise UnsupportedModel(f"model type {model_type!r} is not supported; supported: {supported}")
    arch = ARCHITECTURES[model_type]
    window = getattr(config, "sliding_window", None) if arch.window_from_config else None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []) or (
        window is not None and window < config.max_position_embeddings  # a window no sequence reaches is none
    ):
        raise UnsupportedModel(f"{model_type}: sliding-window attention layers are not supported yet")
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        raise UnsupportedModel("tensor-parallel pretraining checkpoints (pretraining_tp > 1) are not supported")
    return arch
