"""The model profile, from the config alone, matches the parameter bytes of real Hugging Face
models and the KV-cache bytes a stage actually allocates."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peer.errors import UnsupportedModel
from peer.profile import ModelProfile
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4},
        {"attention_bias": True, "mlp_bias": True},
        {"head_dim": 32},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_profile_matches_parameter_bytes(overrides, dtype) -> None:
    config = tiny_config(**overrides)
    model = LlamaForCausalLM(config).to(dtype)
    profile = ModelProfile.from_config(config, dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * elt
    assert profile.layer_bytes == layer
    assert profile.embedding_bytes == model.model.embed_tokens.weight.numel() * elt
    assert profile.norm_bytes == model.model.norm.weight.numel() * elt
    assert profile.head_bytes == model.lm_head.weight.numel() * elt
    # A single stage of the whole model holds what the model holds (ties counted once).
    assert profile.total_weight_bytes == sum(p.numel() for p in model.parameters()) * elt
    # Stages split the layers; an untied or split model needs the head besides the embeddings.
    split = profile.stage_weight_bytes(0, 1) + profile.stage_weight_bytes(1, 3)
    assert split == profile.total_weight_bytes + (profile.head_bytes if config.tie_word_embeddings else 0)


def test_kv_bytes_per_token() -> None:
    profile = ModelProfile.from_config(tiny_config(head_dim=32), torch.float16)
    assert profile.kv_bytes_per_token_per_layer == 2 * 2 * 32 * 2
    assert profile.kv_bytes(1, 3, tokens=10, batch=2) == 2 * 10 * 2 * profile.kv_bytes_per_token_per_layer


def test_tinyllama_shape() -> None:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    )
    profile = ModelProfile.from_config(config, torch.float32)
    assert profile.layer_bytes == 4 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048)
    assert profile.kv_bytes_per_token_per_layer == 2 * 4 * 64 * 4


def test_unsupported_architecture() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModel, match="gpt2"):
        ModelProfile.from_config(GPT2Config())
