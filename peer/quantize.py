"""Quantized resident weights. With `int8`, every linear layer's weight, the LM head and the token
embedding table are held as int8 with one float32 scale per output row: symmetric, the row's
largest magnitude over 127.5, as torchao's `Int8Tensor.from_hp` with `PerRow` granularity makes
them (torchao's Int8WeightOnlyConfig). That is a quarter of float32 and half of bfloat16, plus
4 bytes a row. Norms, biases, rotary tables and a mixture's expert tensors stay in the stage's
dtype. Activations stay in the stage's dtype too; on CPU the product runs through PyTorch's
int8 weight-only kernel (`torch._weight_int8pack_mm`, bfloat16 or float16 activations), elsewhere
on the weight dequantized a slice at a time (see `linear`). Quantized weights change the numbers: quality is
measured as perplexity against the unquantized model (scripts/bench.py), not token for token."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8")
SCALE_BYTES = 4  # one float32 scale per output row
# PyTorch's CPU int8 kernel with bfloat16 activations is wrong, or crashes, for input widths that
# are not a multiple of 16 (torch 2.13); other widths take the dequantizing path.
KERNEL_WIDTH_MULTIPLE = 16
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 22  # weight elements dequantized at a time on the other path


def quantizable(name: str) -> bool:
    """Whether a stage parameter is held quantized: 2-D projection weights of the decoder layers,
    the LM head and the embedding table (not norms, biases, routers or 3-D expert tensors)."""
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return True
    if not name.endswith("_proj.weight") or not name.startswith("layers."):
        return False
    return ".experts." not in name


def quantize_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """`weight` [N, K] held as `mode` ("int8": torchao's Int8Tensor, int8 [N, K] and float32 scales
    [N, 1]); "none" returns it unchanged. ValueError for an unknown mode."""
    if mode == "none":
        return weight
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    int8_tensor, per_row = _torchao()
    return int8_tensor.from_hp(weight, per_row())


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a weight `quantize_weight` made (an int8 tensor with per-row scales)."""
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def quantized_bytes(shape: tuple[int, ...]) -> int:
    """Bytes an int8 weight of `shape` [N, K] holds: N * K int8 values and N float32 scales."""
    rows, cols = shape
    return rows * cols + rows * SCALE_BYTES


def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) for an int8 `weight` [N, K]; result [..., N] in x's dtype.

    On CPU with bfloat16 or float16 activations and K a multiple of KERNEL_WIDTH_MULTIPLE, PyTorch's
    int8 weight-only kernel; otherwise the weight is dequantized (q * scale, in float32, rounded to
    x's dtype) DEQUANTIZE_CHUNK_ELEMENTS at a time, so no full-precision copy of a large weight (an
    LM head) is ever made."""
    k = x.shape[-1]
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and k % KERNEL_WIDTH_MULTIPLE == 0:
        scales = weight.scale.reshape(-1).to(x.dtype)
        out = torch._weight_int8pack_mm(x.reshape(-1, k), weight.qdata, scales).view(*x.shape[:-1], -1)
    else:
        rows = max(1, DEQUANTIZE_CHUNK_ELEMENTS // k)
        out = torch.cat(
            [
                F.linear(x, (weight.qdata[i : i + rows].to(torch.float32) * weight.scale[i : i + rows]).to(x.dtype))
                for i in range(0, weight.qdata.shape[0], rows)
            ],
            dim=-1,
        )
    return out if bias is None else out + bias


def embedding(ids: torch.Tensor, weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an int8 embedding table, dequantized in float32 and rounded to `dtype`."""
    return (weight.qdata[ids].to(torch.float32) * weight.scale[ids]).to(dtype)


@functools.cache
def _torchao() -> tuple[Any, Any]:
    """torchao's Int8Tensor and PerRow, imported on first use (peer/__init__ quiets its start-up)."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    return Int8Tensor, PerRow
