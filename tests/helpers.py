"""Helpers shared by tests: a tensor source that records its reads, the names a stage needs,
Hugging Face's own greedy continuation of prompts (the reference the swarm's output must equal),
and a tiny Llama config."""

from __future__ import annotations

import re
from typing import Any

import torch

from peer.checkpoint import TensorSource


class RecordingSource:
    """Wraps a tensor source and records the name of every tensor read."""

    def __init__(self, inner: TensorSource) -> None:
        self.inner = inner
        self.reads: list[str] = []

    def names(self) -> frozenset[str]:
        return self.inner.names()

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.reads.append(name)
        return self.inner.read(name, dtype)

    def close(self) -> None:
        self.inner.close()


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def expected_reads(start: int, end: int, layers: int, tied: bool) -> set[str]:
    names = {f"model.layers.{i}.{p}" for i in range(start, end) for p in LAYER_PARAMS}
    if start == 0:
        names.add("model.embed_tokens.weight")
    if end == layers:
        names |= {"model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"}
    return names


LAYER_PARAMS = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]


def hf_greedy(files: Any, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Hugging Face's own greedy continuation of each prompt (up to and with the first end-of-sequence
    token), from the same model files the swarm serves (`ModelFiles` of a GGUF model)."""
    from transformers import AutoModelForCausalLM

    from peer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    model = AutoModelForCausalLM.from_pretrained(
        str(files.gguf_path.parent), gguf_file=files.gguf_path.name, dtype=torch.float32
    ).eval()
    out = {}
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
            new = [int(t) for t in gen[0, len(ids) :]]
            stop = next((i for i, t in enumerate(new) if t in tokenizer.eos_token_ids), None)
            out[prompt] = new[: stop + 1] if stop is not None else new
    return out


def tiny_config(**overrides: Any) -> Any:
    """A tiny Llama config (3 layers, hidden 64), with `overrides`."""
    from transformers import LlamaConfig

    base = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**base, **overrides})


def byte_grammars() -> tuple[Any, Any]:
    """Grammars (`peer.grammar`) over a byte-level vocabulary of 257 tokens, an end-of-sequence
    token (id 0) and one token per byte, and its Hugging Face tokenizer: for grammar tests with no
    real tokenizer, and for tiny random models of vocab 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from peer.grammar import Grammars

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    inner = Tokenizer(models.BPE(vocab, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>")
    return Grammars(hf, len(vocab), [0]), hf
