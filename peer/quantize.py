"""Quantized resident weights, weight-only.

- `int8`: every linear layer's weight, the LM head and the token embedding table are held as int8
  with one float32 scale per output row: symmetric, the row's largest magnitude over 127.5, as
  torchao's `Int8Tensor.from_hp` with `PerRow` granularity makes them (torchao's
  Int8WeightOnlyConfig). That is a quarter of float32 and half of bfloat16, plus 4 bytes a row. On
  CPU the product runs through PyTorch's int8 weight-only kernel (`torch._weight_int8pack_mm`,
  bfloat16 or float16 activations), elsewhere on the weight dequantized a slice at a time (see
  `linear`).
- `int4` (CPU only): the decoder layers' projection weights are held as 4-bit integers with a scale
  and a zero point per group of INT4_GROUP_SIZE inputs, asymmetric, as torchao's groupwise affine
  quantization for the tinygemm layout computes them (`get_groupwise_affine_qparams`:
  w ~ (q - 8) * scale + zero, q in [0, 15]), packed and multiplied by PyTorch's CPU int4 kernel
  (`torch._weight_int4pack_mm_for_cpu`). Scales and zeros are in the stage's dtype. The embedding
  table, the LM head and the value and down projections (INT4_KEPT_AT_INT8) are held as int8, as
  llama.cpp's Q4_K_M keeps its output tensor, and attn_v and ffn_down in part of the layers, at 6
  bits; so is a projection of a shape the kernel does not take (`int4_fits`). Phi-3's fused
  qkv_proj holds its value rows at 4 bits with the rest.

Norms, biases, rotary tables and a mixture's expert tensors stay in the stage's dtype, and so do the
activations. Quantized weights change the numbers: quality is measured as perplexity against the
unquantized model (scripts/bench.py), not token for token."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8", "int4")
SCALE_BYTES = 4  # int8: one float32 scale per output row
INT4_GROUP_SIZE = 32  # int4: input elements sharing a scale and a zero point (llama.cpp's Q4_0 block)
INT4_INNER_K_TILES = 8  # the packing argument torchao passes PyTorch's int4 kernels
INT4_ROW_MULTIPLE = 16  # PyTorch's CPU int4 packing takes weights of a multiple of 16 rows
# Projections int4 leaves at int8, as Q4_K_M does: on Gemma 3 270M they take perplexity from 1.27 to
# 1.11 x float32's (scripts/bench.py quantize) for 16 % more layer bytes.
INT4_KEPT_AT_INT8 = (".v_proj.", ".down_proj.")
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


def held_as(name: str, shape: tuple[int, ...], mode: str) -> str:
    """How the stage parameter `name` of `shape` is held under the setting `mode`: "none" (the
    stage's dtype), "int8" or "int4" (see the module docstring for which weights get which)."""
    if mode == "none" or not quantizable(name):
        return "none"
    kept = any(k in name for k in INT4_KEPT_AT_INT8)
    return "int4" if mode == "int4" and name.startswith("layers.") and not kept and int4_fits(shape) else "int8"


def int4_fits(shape: tuple[int, ...]) -> bool:
    """Whether a weight [N, K] can be held as int4: K a multiple of INT4_GROUP_SIZE, N of INT4_ROW_MULTIPLE."""
    rows, cols = shape
    return cols % INT4_GROUP_SIZE == 0 and rows % INT4_ROW_MULTIPLE == 0


def quantize_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """`weight` [N, K] held as `mode`: "int8", torchao's Int8Tensor (int8 [N, K] and float32 scales
    [N, 1]); "int4", an `Int4Weight` (scales and zeros in weight's dtype); "none" returns it
    unchanged. ValueError for an unknown mode or a shape int4 cannot hold (`int4_fits`)."""
    if mode == "none":
        return weight
    if mode == "int4":
        return int4_weight(weight)
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    int8_tensor, per_row = _torchao()
    return int8_tensor.from_hp(weight, per_row())


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a weight `quantize_weight` made (int8 or int4)."""
    return hasattr(weight, "qdata")


def is_int4(weight: torch.Tensor) -> bool:
    """True for an `Int4Weight`."""
    return hasattr(weight, "scale_and_zero")


def quantized_bytes(shape: tuple[int, ...], mode: str = "int8", dtype: torch.dtype = torch.float32) -> int:
    """Bytes a weight of `shape` [N, K] holds as `mode` at stage dtype `dtype`: int8, N * K int8
    values and N float32 scales; int4, N * K / 2 bytes of packed values and a scale and a zero in
    `dtype` per group of INT4_GROUP_SIZE inputs of each row."""
    rows, cols = shape
    if mode == "int4":
        return rows * cols // 2 + rows * (cols // INT4_GROUP_SIZE) * 2 * torch.empty((), dtype=dtype).element_size()
    return rows * cols + rows * SCALE_BYTES


def held_bytes(weight: Any) -> int:
    """Bytes a stage parameter holds: its quantized data and scales, or its own elements."""
    if not is_quantized(weight):
        return weight.numel() * weight.element_size()
    parts = (weight.qdata, weight.scale_and_zero) if is_int4(weight) else (weight.qdata, weight.scale)
    return sum(t.numel() * t.element_size() for t in parts)


def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) for a quantized `weight` [N, K]; result [..., N] in x's dtype.

    int4: PyTorch's CPU int4 kernel. int8: on CPU with bfloat16 or float16 activations and K a
    multiple of KERNEL_WIDTH_MULTIPLE, PyTorch's int8 weight-only kernel; otherwise the weight is
    dequantized (q * scale, in float32, rounded to x's dtype) DEQUANTIZE_CHUNK_ELEMENTS at a time,
    so no full-precision copy of a large weight (an LM head) is ever made."""
    k = x.shape[-1]
    if is_int4(weight):
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, k).contiguous(), weight.qdata, INT4_GROUP_SIZE, weight.scale_and_zero.to(x.dtype)
        ).view(*x.shape[:-1], -1)
        return out if bias is None else out + bias
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


def int4_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] as an `Int4Weight`: torchao's groupwise affine qparams and quantization for
    the tinygemm layout (float zero points), packed by PyTorch for its CPU int4 kernel."""
    from torchao.quantization.utils import (
        get_groupwise_affine_qparams,
        groupwise_affine_quantize_tensor_from_qparams,
        pack_tinygemm_scales_and_zeros,
    )

    rows, cols = weight.shape
    if not int4_fits((rows, cols)):
        raise ValueError(
            f"int4 holds weights of a multiple of {INT4_ROW_MULTIPLE} rows and {INT4_GROUP_SIZE} columns, "
            f"not [{rows}, {cols}]"
        )
    scales, zeros = get_groupwise_affine_qparams(weight, 4, INT4_GROUP_SIZE, dtype=weight.dtype)
    values = groupwise_affine_quantize_tensor_from_qparams(weight, scales, zeros, 4, INT4_GROUP_SIZE)  # int32 [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.cpu(), INT4_INNER_K_TILES)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scales, zeros, dtype=weight.dtype)  # [K / G, N, 2]
    return _int4_class()(packed, scale_and_zero, weight.dtype, (rows, cols))


@functools.cache
def _int4_class() -> Any:
    """The `Int4Weight` tensor class, defined on first use on torchao's base class (peer/__init__
    quiets torchao's start-up)."""
    from torchao.utils import TorchAOBaseTensor

    class Int4Weight(TorchAOBaseTensor):
        """A weight [N, K] held as PyTorch's packed int4 (uint8 [N, K / 2]) and per-group scales and
        zeros [K / INT4_GROUP_SIZE, N, 2]; torchao's base class gives it detach, to and state dicts.
        Defined on first use, it cannot be pickled (peers never pickle tensors: swarm.tensors)."""

        tensor_data_names: ClassVar[list[str]] = ["qdata", "scale_and_zero"]
        tensor_attribute_names: ClassVar[list[str]] = ["dtype", "logical_shape"]

        def __new__(cls, qdata: torch.Tensor, scale_and_zero: torch.Tensor, dtype: torch.dtype, logical_shape: Any):
            return torch.Tensor._make_wrapper_subclass(
                cls, logical_shape, dtype=dtype, device=qdata.device, requires_grad=False
            )

        def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, dtype: torch.dtype, logical_shape: Any):
            super().__init__()
            self.qdata, self.scale_and_zero = qdata, scale_and_zero
            self.logical_shape = tuple(logical_shape)

        def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
            """The weight [N, K] the kernel multiplies by: the kernel applied to the identity [K, K],
            O(K * K * N) work, meant for tests and checks (seconds for a [2048, 5632] weight)."""
            k = self.logical_shape[1]
            eye = torch.eye(k, dtype=self.dtype, device=self.qdata.device)
            product = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qdata, INT4_GROUP_SIZE, self.scale_and_zero)
            return product.t().contiguous().to(output_dtype or self.dtype)

    return Int4Weight


@functools.cache
def _torchao() -> tuple[Any, Any]:
    """torchao's Int8Tensor and PerRow, imported on first use (peer/__init__ quiets its start-up)."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    return Int8Tensor, PerRow
