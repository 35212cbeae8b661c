"""Read individual tensors from a checkpoint without loading the rest of it. Safetensors files and
GGUF files are both memory-mapped; a tensor's bytes are touched only when it is read. Both sources
speak Hugging Face names (`model.layers.3.self_attn.q_proj.weight`) and return tensors in Hugging
Face layout, so GGUF tensors are dequantized here and what llama.cpp's converter did to them for
the architecture (`peer.architectures.GGUFLayout`) undone. This module knows file formats; which
tensors a stage needs is `peer.shard`'s business."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import torch

from peer.architectures import GGUFLayout, architecture_of
from peer.errors import CheckpointError, UnsupportedModel
from peer.gguf_file import GGUFFile
from peer.model_store import ModelFiles

# torch dtypes -> the names safetensors headers use.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# GGUF (llama.cpp) names of the tensors outside the layers -> Hugging Face names; the layers' own
# names depend on the architecture (`peer.architectures.GGUFLayout`).
_GGUF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class TensorSource(Protocol):
    """Named tensors of one checkpoint, read one at a time."""

    def names(self) -> frozenset[str]:
        """Hugging Face names of every tensor in the checkpoint."""
        ...

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in Hugging Face layout, converted to `dtype` if given (else as stored or dequantized)."""
        ...

    def close(self) -> None:
        """Release file handles and mappings; safe to call twice."""
        ...


class SafetensorsSource:
    """Tensors of one or more safetensors files (a sharded checkpoint's index order).

    A file whose tensors are all stored in the stage dtype is memory-mapped and its tensors used in
    place (no copy). A file that needs converting is read with pread instead, so a converted
    tensor's source bytes are freed at once rather than staying mapped until the load ends.
    """

    def __init__(self, files: tuple[Path, ...], dtype: torch.dtype | None = None) -> None:
        from safetensors import safe_open

        self._handles: list[Any] = []
        self._where: dict[str, tuple[Any, str]] = {}
        stored = _SAFETENSORS_DTYPES.get(dtype) if dtype is not None else None
        try:
            for path in files:
                handle = safe_open(str(path), framework="pt")  # reads the header only
                if stored is not None and any(handle.get_slice(k).get_dtype() != stored for k in handle.keys()):  # noqa: SIM118
                    handle = safe_open(str(path), framework="pt", backend="pread")
                self._handles.append(handle)
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    # Checkpoints saved from a bare LlamaModel lack the "model." prefix.
                    hf = key if key.startswith(("model.", "lm_head.")) else f"model.{key}"
                    self._where[hf] = (handle, key)
        except Exception as e:
            self.close()
            raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from e

    def names(self) -> frozenset[str]:
        return frozenset(self._where)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            handle, key = self._where[name]
        except KeyError as e:
            raise CheckpointError(f"checkpoint has no tensor {name!r}") from e
        if dtype is None or handle.get_slice(key).get_dtype() == _SAFETENSORS_DTYPES.get(dtype):
            return handle.get_tensor(key)
        return handle.get_tensor(key).to(dtype)  # read with pread: the stored copy is freed at once

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()


class GGUFSource:
    """Tensors of a llama.cpp GGUF file, dequantized to float32 as they are read, with what llama.cpp's
    converter did to them undone as `layout` describes (Q/K row permutation, norm weight offsets)."""

    def __init__(self, path: Path, layout: GGUFLayout, num_heads: int, num_kv_heads: int) -> None:
        self._file: GGUFFile | None = GGUFFile(path)  # reads the header and tensor index only
        self._layout = layout
        self._heads = {"attn_q": num_heads, "attn_k": num_kv_heads} if layout.permuted_qk else {}
        self._tensors: dict[str, tuple[str, str]] = {}
        for gguf_name in self._file.tensors:
            hf, kind = _gguf_to_hf(gguf_name, layout)
            if hf is not None:
                self._tensors[hf] = (gguf_name, kind)
        # Fused expert parameters: model.layers.N.<param> from blk.N.<kind>.weight of each of its kinds.
        self._joined: dict[str, tuple[str, ...]] = {}
        for layer in {int(m.group(1)) for n in self._file.tensors if (m := _GGUF_NAME.match(n))}:
            for param, kinds in layout.experts.items():
                parts = tuple(f"blk.{layer}.{kind}.weight" for kind in kinds)
                if all(p in self._file.tensors for p in parts):
                    self._joined[f"model.layers.{layer}.{param}"] = parts

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors) | frozenset(self._joined)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._joined and self._file is not None:  # experts [E, rows, K]: joined along rows
            joined = torch.cat([self._file.read(part) for part in self._joined[name]], dim=1)
            return joined if dtype is None else joined.to(dtype)
        if name not in self._tensors or self._file is None:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        gguf_name, kind = self._tensors[name]
        weights = self._file.read(gguf_name)
        if kind in self._heads:
            weights = unpermute_rope_rows(weights, self._heads[kind])
        if self._layout.norm_offset and kind.endswith("norm") and gguf_name.endswith(".weight"):
            weights = weights - self._layout.norm_offset  # float32, as transformers' GGUF loader subtracts
        return weights if dtype is None else weights.to(dtype)

    def close(self) -> None:
        self._tensors.clear()
        self._joined.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


def _gguf_to_hf(name: str, layout: GGUFLayout) -> tuple[str | None, str]:
    m = _GGUF_NAME.match(name)
    if m:
        layer, kind, suffix = m.groups()
        if kind not in layout.layer_names:
            return None, kind
        return f"model.layers.{layer}.{layout.layer_names[kind]}.{suffix}", kind
    base, _, suffix = name.rpartition(".")
    return (f"{_GGUF_GLOBAL[base]}.{suffix}", base) if base in _GGUF_GLOBAL else (None, base)


def unpermute_rope_rows(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary halves back to split halves).

    weights: [n_heads * head_dim, ...]; within each head llama.cpp stores rows as (dim/2, 2), HF as (2, dim/2).
    """
    half = weights.shape[0] // n_heads // 2
    return weights.reshape(n_heads, half, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def open_checkpoint(files: ModelFiles, config: Any, dtype: torch.dtype | None = None) -> TensorSource:
    """Open the tensor source of a resolved model for stages of `dtype`; close it when they are built.
    UnsupportedModel where `check_readable` refuses it."""
    check_readable(files, config)
    layout = architecture_of(config).gguf
    if files.format == "gguf" and layout is not None:
        return GGUFSource(files.gguf_path, layout, config.num_attention_heads, config.num_key_value_heads)
    return SafetensorsSource(files.weights, dtype)


def check_readable(files: ModelFiles, config: Any) -> None:
    """UnsupportedModel for a checkpoint whose format is not read here for its architecture (a GGUF
    file of a row without GGUF support); a peer calls it at start, before it takes any layers."""
    if files.format == "gguf" and architecture_of(config).gguf is None:
        raise UnsupportedModel(
            f"GGUF files of {config.model_type} models are not read yet; use the model's safetensors checkpoint"
        )
