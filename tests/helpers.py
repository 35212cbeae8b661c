"""Helpers shared by tests: a tensor source that records its reads, and the names a stage needs."""

from __future__ import annotations

import re

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
