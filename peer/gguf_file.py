"""The tensor index of a GGUF file and fast dequantization of its tensors. gguf-py's GGUFReader
builds Python objects for every metadata value (SmolLM2's 100,000-entry vocabulary takes seconds);
a stage only needs where each tensor lies, so this reads the header, keeps the scalar metadata,
skips the arrays, and memory-maps the data. The common formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are dequantized with
torch in the same float32 arithmetic as gguf-py; others fall back to gguf-py itself. Metadata such
as the config and tokenizer is converted by transformers in `peer.model_store`, not here."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peer.errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types this module dequantizes itself: name, elements per block, bytes per block.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file, and how to read them."""

    name: str
    shape: tuple[int, ...]  # numpy / torch order (ggml stores dimensions reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = int(self.take("Q"))
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> int | float | bool | str | None:
        """Read a scalar or string (returned) or skip an array (returns None)."""
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = int(self.take("I")), int(self.take("Q"))
        if etype in _SCALARS:
            self.pos += count * struct.calcsize("<" + _SCALARS[etype])
        else:
            for _ in range(count):
                self.skip_value(etype)
        return None


class GGUFFile:
    """Tensor index and memory map of one GGUF file (format versions 2 and 3)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGML_QUANT_SIZES

        self.path = path
        self.metadata: dict[str, int | float | bool | str] = {}  # scalar and string keys; arrays skipped
        try:
            with open(path, "rb") as f:
                self._map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot map {path}: {e}") from e
        try:
            with memoryview(self._map) as view:
                self.tensors = self._index(view, GGML_QUANT_SIZES)
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, ArithmeticError) as e:
            self.close()
            raise CheckpointError(f"{path} is not a valid GGUF file: {e}") from e

    def _index(self, data: memoryview, sizes: dict) -> dict[str, GGUFTensor]:
        cur = _Cursor(data)
        if bytes(data[:4]) != MAGIC:
            raise ValueError("bad magic")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = int(cur.take("Q")), int(cur.take("Q"))
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string()
            value = cur.skip_value(int(cur.take("I")))
            if value is not None:
                self.metadata[key] = value
            if key == "general.alignment" and isinstance(value, int):
                if value <= 0 or value % 8:
                    raise ValueError(f"invalid general.alignment {value}")
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [int(cur.take("Q")) for _ in range(int(cur.take("I")))]
            infos.append((name, tuple(reversed(dims)), int(cur.take("I")), int(cur.take("Q"))))
        start = -(-cur.pos // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, rel in infos:
            block, type_size = sizes[ggml_type]
            elements = math.prod(shape)
            if not shape or shape[-1] % block:
                raise ValueError(f"tensor {name} has shape {shape}, not whole blocks of {block}")
            nbytes = elements * type_size // block
            if start + rel + nbytes > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            tensors[name] = GGUFTensor(name, shape, ggml_type, start + rel, nbytes)
        return tensors

    def read(self, name: str) -> torch.Tensor:
        """One tensor dequantized to float32 in numpy/torch shape (a fresh tensor, not a view)."""
        if self._map is None:
            raise CheckpointError(f"{self.path} is closed")
        t = self.tensors[name]
        raw = torch.from_numpy(np.frombuffer(self._map, np.uint8, t.nbytes, t.offset).copy())
        # The copy is ours now: let the mapped pages go, so loading peaks at one tensor, not the stage.
        page_start = t.offset - t.offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, page_start, t.offset + t.nbytes - page_start)
        return dequantize(raw, t.ggml_type, t.shape)

    def close(self) -> None:
        """Unmap the file; safe to call twice."""
        if self._map is not None:
            self._map.close()
            self._map = None


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).to(torch.float32)


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from its raw uint8 bytes, bit-identical to gguf-py's dequantize."""
    if ggml_type == F32:
        return raw.view(torch.float32).reshape(shape)
    if ggml_type == F16:
        return raw.view(torch.float16).to(torch.float32).reshape(shape)
    if ggml_type == BF16:
        return raw.view(torch.bfloat16).to(torch.float32).reshape(shape)
    if ggml_type == Q8_0:  # blocks of 32: f16 scale, 32 x int8
        blocks = raw.reshape(-1, 34)
        return (blocks[:, 2:].view(torch.int8).to(torch.float32) * _f16(blocks[:, :2])).reshape(shape)
    if ggml_type in (Q4_0, Q4_1):  # blocks of 32: f16 scale [, f16 min], 16 bytes of nibbles
        header = 2 if ggml_type == Q4_0 else 4
        blocks = raw.reshape(-1, header + 16)
        qs = blocks[:, header:]
        # Low nibbles are elements 0..15 of the block, high nibbles 16..31.
        nibbles = torch.cat((qs & 0x0F, qs >> 4), dim=1)
        d = _f16(blocks[:, :2])
        if ggml_type == Q4_0:
            return (d * (nibbles.to(torch.int8) - 8).to(torch.float32)).reshape(shape)
        return (d * nibbles.to(torch.float32) + _f16(blocks[:, 2:4])).reshape(shape)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    rows = raw.numpy().reshape(*shape[:-1], shape[-1] // block * type_size)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(rows, GGMLQuantizationType(ggml_type))))
