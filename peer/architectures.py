"""What differs between the decoder-only architectures a stage can hold, in one table: the classes
transformers itself uses for each architecture's decoder layer, RMSNorm and rotary embedding, the
few switches the stage's arithmetic reads, and how llama.cpp's converter laid the architecture out
in GGUF. A stage runs transformers' own modules and weights for every architecture here; nothing is
copied per architecture.

What the architectures here share (a residual block of RMSNorm, attention with rotary positions,
RMSNorm and gated MLP) is the stage's code; what they do not share is a field of a row:

- Fused projections (Phi-3): one matrix for queries, keys and values, one for the MLP's gate and up.
- QK norms (Qwen3, Gemma 3): an RMSNorm over each head's queries and keys before the rotation.
- Sandwich norms (Gemma 3): the attention and MLP outputs are normed before they join the residual,
  and the MLP's input has its own norm.
- Scaled embeddings (Gemma): embeddings times sqrt(hidden_size), rounded to the weights' dtype.
- Rotary tables per layer type (Gemma 3): sliding and global layers rotate with different bases.
- Sliding windows: a layer whose attention module says so (Qwen2/3 `layer_types`, Gemma 3's sliding
  layers), or every layer with `config.sliding_window` (Mistral), attends to its last `window`
  positions only; see `Architecture.layer_window`.
- Final logit soft-capping: `tanh(logits / cap) * cap` where the config sets a cap (Gemma 2 style).
- Mixtures of experts (Qwen3-MoE): the MLP is transformers' own sparse block (router and experts),
  run over every token of a pass; its experts' weights, one 3-D tensor per projection in memory,
  are stacked from the per-expert tensors checkpoints store (`Architecture.experts`).

Each row's rotation is its module's own `apply_rotary_pos_emb` (Phi-3's rotates part of each head).
An architecture whose layers need more than the table can say (attention soft-capping, layers of
different sizes) is refused by `architecture_of` until it has its row."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peer.errors import UnsupportedModel

# llama.cpp's per-layer tensor names (gguf-py's constants.py, MODEL_TENSORS) -> module paths in a
# transformers decoder layer, as the Llama converter lays them out.
_GGUF_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_PHI3_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",  # gate rows first, then up rows, as transformers' Phi3MLP splits them
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GGUF_SANDWICH_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's convert_hf_to_gguf.py stores an architecture, so it can be undone on reading."""

    layer_names: Mapping[str, str]  # GGUF tensor kind in blk.N -> module path in the decoder layer
    permuted_qk: bool = False  # Q/K rows permuted for llama.cpp's interleaved RoPE (its Llama converter)
    norm_offset: float = 0.0  # added to every RMSNorm weight (its Gemma converters store 1 + w)
    # A fused expert parameter in the layer -> the GGUF kinds ([E, rows, K] each) it joins along rows.
    experts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """One decoder-only architecture: transformers' module names and what sets it apart."""

    model_type: str  # config.model_type
    module: str  # transformers' modeling module, e.g. "transformers.models.qwen3.modeling_qwen3"
    prefix: str  # its class names' prefix, e.g. "Qwen3"
    examples: str  # model families users know it by, for messages
    fused_projections: bool = False  # qkv_proj for q/k/v and gate_up_proj for the MLP (Phi-3)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before the rotation
    sandwich_norms: bool = False  # post-attention, pre- and post-feedforward norms (Gemma 2/3)
    scaled_embeddings: bool = False  # embeddings times sqrt(hidden_size) in the weights' dtype (Gemma)
    rope_by_layer_type: bool = False  # the rotary embedding is called with the layer's type (Gemma 3)
    window_from_config: bool = False  # config.sliding_window, when set, limits every layer's attention
    # Mixture of experts: each fused expert parameter -> the per-expert projections a checkpoint stores
    # for it (experts.E.<name>.weight), concatenated by rows, then stacked over E.
    experts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gguf: GGUFLayout | None = field(default=None)  # None: GGUF files of it are not read

    def classes(self) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
        """(decoder layer, RMSNorm, rotary embedding) classes, from transformers."""
        module = importlib.import_module(self.module)
        p = self.prefix
        return (
            getattr(module, f"{p}DecoderLayer"),
            getattr(module, f"{p}RMSNorm"),
            getattr(module, f"{p}RotaryEmbedding"),
        )

    def rotation(self) -> Any:
        """The module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) -> (q, k), from transformers."""
        return importlib.import_module(self.module).apply_rotary_pos_emb

    def layer_window(self, config: Any, attention: nn.Module) -> int | None:
        """How many positions (the query's own included) a layer's queries attend to, as transformers'
        sliding_window_overlay counts them (key > query - window); None for no limit."""
        if self.window_from_config:
            return getattr(config, "sliding_window", None)
        return getattr(attention, "sliding_window", None)

    def expert_parts(self, name: str, config: Any) -> list[list[str]] | None:
        """For a fused expert parameter's checkpoint name (model.layers.N.mlp.experts.gate_up_proj),
        the names it is made of, per expert; None for any other name."""
        prefix, _, param = name.rpartition(".experts.")
        if not prefix or param not in self.experts:
            return None
        parts = self.experts[param]
        return [[f"{prefix}.experts.{e}.{part}.weight" for part in parts] for e in range(config.num_experts)]

    def rope_key(self, config: Any, layer_idx: int) -> str | None:
        """Which rotary table a layer uses: its layer type where tables differ by type, else the one."""
        return config.layer_types[layer_idx] if self.rope_by_layer_type else None


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "transformers.models.llama.modeling_llama", "Llama", "TinyLlama, SmolLM2, Llama 2/3",
                     gguf=GGUFLayout(_GGUF_LLAMA_NAMES, permuted_qk=True)),
        Architecture("mistral", "transformers.models.mistral.modeling_mistral", "Mistral", "Mistral 7B",
                     window_from_config=True, gguf=GGUFLayout(_GGUF_LLAMA_NAMES, permuted_qk=True)),
        Architecture("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2", "Qwen2, Qwen2.5",
                     gguf=GGUFLayout(_GGUF_LLAMA_NAMES)),
        Architecture("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", "Qwen3 dense", qk_norm=True,
                     gguf=GGUFLayout({**_GGUF_LLAMA_NAMES, **_GGUF_QK_NORMS})),
        Architecture("phi3", "transformers.models.phi3.modeling_phi3", "Phi3", "Phi-3, Phi-3.5, Phi-4 mini",
                     fused_projections=True, window_from_config=True, gguf=GGUFLayout(_GGUF_PHI3_NAMES)),
        Architecture("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe",
                     "Qwen3 mixtures of experts, e.g. Qwen3-30B-A3B", qk_norm=True,
                     experts={"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
                     gguf=GGUFLayout({**_GGUF_LLAMA_NAMES, **_GGUF_QK_NORMS, "ffn_gate_inp": "mlp.gate"},
                                     experts={"mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
                                              "mlp.experts.down_proj": ("ffn_down_exps",)})),
        Architecture("gemma3_text", "transformers.models.gemma3.modeling_gemma3", "Gemma3", "Gemma 3 text models",
                     qk_norm=True, sandwich_norms=True, scaled_embeddings=True, rope_by_layer_type=True,
                     gguf=GGUFLayout({**_GGUF_LLAMA_NAMES, **_GGUF_QK_NORMS, **_GGUF_SANDWICH_NAMES},
                                     norm_offset=1.0)),
    )
}  # fmt: skip


def architecture_of(config: Any) -> Architecture:
    """The table's row for `config`. UnsupportedModel, naming the model type and listing the supported
    ones, for a model type not in the table, or a config using what no row describes: attention
    logit soft-capping (SDPA has none), bidirectional attention, tensor-parallel pretraining."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = "; ".join(f"{a.model_type} ({a.examples})" for a in ARCHITECTURES.values())
        hint = " (for Gemma 3, give its text model: model_type gemma3_text)" if model_type == "gemma3" else ""
        raise UnsupportedModel(f"model type {model_type!r} is not supported{hint}; supported: {supported}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModel(f"{model_type}: attention logit soft-capping is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(f"{model_type}: bidirectional attention (an encoder) is not a decoder-only model")
    if ARCHITECTURES[model_type].experts and (config.mlp_only_layers or config.decoder_sparse_step != 1):
        raise UnsupportedModel(
            f"{model_type}: dense layers among the expert layers (mlp_only_layers, decoder_sparse_step) are not "
            "supported yet: the memory profile assumes layers of one size"
        )
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        raise UnsupportedModel("tensor-parallel pretraining checkpoints (pretraining_tp > 1) are not supported")
    return ARCHITECTURES[model_type]
