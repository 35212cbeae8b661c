"""Tensors on the wire: a tensor becomes a msgpack-ready mapping of dtype name, shape and raw
bytes (never pickle, never lists of floats), and back, with every field checked against hostile
input before a byte is interpreted: known dtype, sane shape, byte count matching the shape, and
the caller's expectations of dtype and shape. It knows nothing of sessions or stages."""

from __future__ import annotations

import math
from typing import Any

import torch

from swarm.errors import MessageRejected

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_DIMS = 4


def pack(tensor: torch.Tensor) -> dict[str, Any]:
    """{dtype, shape, data} of a CPU copy of `tensor`, its bytes in native (little-endian) order."""
    name = NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"cannot send a {tensor.dtype} tensor")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return {"dtype": name, "shape": list(tensor.shape), "data": flat.view(torch.uint8).numpy().tobytes()}


def unpack(
    raw: Any,
    *,
    dtype: torch.dtype | None = None,
    shape: tuple[int | None, ...] | None = None,
    max_bytes: int,
) -> torch.Tensor:
    """The tensor in a hostile {dtype, shape, data} mapping; `shape` may leave dimensions as None."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data"}:
        raise MessageRejected("malformed", "a tensor is {dtype, shape, data}")
    name, dims, data = raw["dtype"], raw["shape"], raw["data"]
    if not isinstance(name, str) or name not in DTYPES:
        raise MessageRejected("malformed", f"tensor dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if (
        not isinstance(dims, list)
        or not 0 < len(dims) <= MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in dims)
    ):
        raise MessageRejected("malformed", f"tensor shape must be 1 to {MAX_DIMS} non-negative integers")
    if not isinstance(data, bytes):
        raise MessageRejected("malformed", "tensor data must be bytes")
    got = DTYPES[name]
    expected_bytes = math.prod(dims) * torch.empty((), dtype=got).element_size()
    if expected_bytes > max_bytes or len(data) != expected_bytes:
        raise MessageRejected(
            "malformed", f"tensor of shape {dims} {name} needs {expected_bytes} bytes, got {len(data)}"
        )
    if dtype is not None and got != dtype:
        raise MessageRejected("mismatch", f"expected a {NAMES.get(dtype, dtype)} tensor, got {name}")
    if shape is not None and (
        len(shape) != len(dims) or any(want is not None and want != d for want, d in zip(shape, dims, strict=True))
    ):
        raise MessageRejected("mismatch", f"expected a tensor of shape {list(shape)}, got {dims}")
    if expected_bytes == 0:
        return torch.empty(dims, dtype=got)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(got).reshape(dims)
