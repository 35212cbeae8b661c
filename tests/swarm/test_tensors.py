"""Tensors on the wire: every supported dtype and shape comes back bit for bit, unsupported dtypes
are refused on the way out, and every field of a hostile mapping is checked on the way in, with
"malformed" for a mapping that is not a tensor and "mismatch" for one the caller did not expect."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import MessageRejected
from swarm.tensors import DTYPES, MAX_DIMS, pack, unpack

LIMIT = 1 << 20
SHAPES = [(7,), (3, 5), (1, 4, 6), (2, 3, 1, 5), (0,), (2, 0, 3), (1, 0)]


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values of `dtype`, with negatives, for a tensor of `shape`."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-(1 << 62), 1 << 62, shape, dtype=dtype, generator=g)
    return (torch.randn(shape, generator=g) * 1000).to(dtype)


def good(**changes: Any) -> dict[str, Any]:
    """A valid packed float32 [2, 3] tensor with some fields replaced."""
    return {**pack(torch.arange(6, dtype=torch.float32).reshape(2, 3)), **changes}


def rejected(raw: Any, reason: str, **kwargs: Any) -> MessageRejected:
    kwargs.setdefault("max_bytes", LIMIT)
    with pytest.raises(MessageRejected) as info:
        unpack(raw, **kwargs)
    assert info.value.reason == reason
    return info.value


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(shape, dtype)
    packed = pack(tensor)
    assert packed["dtype"] == next(name for name, d in DTYPES.items() if d == dtype)
    assert packed["shape"] == list(shape)
    assert isinstance(packed["data"], bytes)
    assert len(packed["data"]) == tensor.numel() * tensor.element_size()
    back = unpack(packed, dtype=dtype, shape=shape, max_bytes=LIMIT)
    assert back.dtype == dtype
    assert back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_round_trip_keeps_special_float_bits() -> None:
    values = [float("inf"), float("-inf"), -0.0, 0.0, 1e-40, 65504.0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tensor = torch.tensor(values, dtype=dtype)
        back = unpack(pack(tensor), max_bytes=LIMIT)
        assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8)), dtype
    nan = torch.tensor([float("nan")])
    assert torch.isnan(unpack(pack(nan), max_bytes=LIMIT)).all()


def test_pack_takes_views_and_strided_tensors() -> None:
    base = sample((4, 6), torch.float32)
    for view in (base.t(), base[:, ::2], base[1:3], base.unsqueeze(0).expand(2, 4, 6)):
        back = unpack(pack(view), max_bytes=LIMIT)
        assert torch.equal(back, view)


def test_unpacked_tensor_does_not_alias_the_message() -> None:
    packed = pack(torch.zeros(4, dtype=torch.float32))
    back = unpack(packed, max_bytes=LIMIT)
    back += 1  # writable, and the message bytes stay as they were
    assert packed["data"] == bytes(16)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPES.values())),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=MAX_DIMS).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> None:
    tensor = sample(shape, dtype, seed)
    back = unpack(pack(tensor), dtype=dtype, shape=shape, max_bytes=LIMIT)
    assert back.dtype == dtype
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.int32, torch.float64, torch.complex64])
def test_pack_refuses_unsupported_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="cannot send"):
        pack(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"bytes",
        [1, 2, 3],
        "float32",
        {},
        {"dtype": "float32", "shape": [2, 3]},
        {"shape": [2, 3], "data": bytes(24)},
        {"dtype": "float32", "data": bytes(24)},
        good(extra=1),
    ],
    ids=["none", "bytes", "list", "str", "empty", "no-data", "no-dtype", "no-shape", "extra-key"],
)
def test_unpack_rejects_non_tensor_mappings(raw: Any) -> None:
    rejected(raw, "malformed")


@pytest.mark.parametrize("name", ["float64", "int8", "bool", "Float32", "", None, 4, b"float32"])
def test_unpack_rejects_unknown_dtype_names(name: Any) -> None:
    rejected(good(dtype=name), "malformed")


@pytest.mark.parametrize(
    "dims",
    [
        (2, 3),
        "2,3",
        None,
        6,
        [],
        [True, 3],
        [2, False],
        [2, -3],
        [-1],
        [2.0, 3],
        ["2", 3],
        [1, 1, 1, 2, 3],
        [2**31],
    ],
    ids=str,
)
def test_unpack_rejects_bad_shapes(dims: Any) -> None:
    rejected(good(shape=dims), "malformed")


@pytest.mark.parametrize("data", [bytearray(24), memoryview(bytes(24)), "x" * 24, None, list(range(24))], ids=str)
def test_unpack_rejects_data_that_is_not_bytes(data: Any) -> None:
    rejected(good(data=data), "malformed")


@pytest.mark.parametrize("length", [0, 23, 25, 48])
def test_unpack_rejects_data_of_the_wrong_length(length: int) -> None:
    rejected(good(data=bytes(length)), "malformed")


def test_unpack_rejects_data_for_an_empty_shape() -> None:
    rejected(good(shape=[0, 3], data=bytes(4)), "malformed")


def test_unpack_checks_the_byte_limit_before_the_data() -> None:
    # float32 [2, 3] is 24 bytes: allowed at exactly 24, refused at 23, and a huge claimed shape is
    # refused on its size alone, before its (absent) bytes are looked at.
    assert unpack(good(), max_bytes=24).shape == (2, 3)
    rejected(good(), "malformed", max_bytes=23)
    error = rejected(good(shape=[2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1], data=b""), "malformed")
    assert "bytes" in str(error)


def test_unpack_rejects_the_wrong_dtype_as_a_mismatch() -> None:
    raw = pack(torch.zeros(2, 3, dtype=torch.float16))
    rejected(raw, "mismatch", dtype=torch.float32)
    rejected(raw, "mismatch", dtype=torch.bfloat16)
    assert unpack(raw, dtype=torch.float16, max_bytes=LIMIT).dtype == torch.float16


@pytest.mark.parametrize("expected", [(1, None), (2, None, 3), (3, 3), (None, 2), (2,), (None, None, None)], ids=str)
def test_unpack_rejects_the_wrong_shape_as_a_mismatch(expected: tuple[int | None, ...]) -> None:
    rejected(good(), "mismatch", shape=expected)


@pytest.mark.parametrize("expected", [(2, 3), (None, 3), (2, None), (None, None)], ids=str)
def test_unpack_accepts_shapes_matching_with_wildcards(expected: tuple[int | None, ...]) -> None:
    back = unpack(good(), shape=expected, max_bytes=LIMIT)
    assert torch.equal(back, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_malformed_is_reported_before_mismatch() -> None:
    # A wrong byte count is malformed even when the dtype is also not the one expected.
    rejected(good(data=bytes(5)), "malformed", dtype=torch.int64)


@pytest.mark.parametrize("dtype", [["float32"], {"x": 1}, 5, None])
def test_a_dtype_that_is_not_a_name_is_malformed(dtype: object) -> None:
    with pytest.raises(MessageRejected) as e:
        unpack({"dtype": dtype, "shape": [1], "data": b"\0" * 4}, max_bytes=100)
    assert e.value.reason == "malformed"
