"""The GGUF tensor index and dequantization: bit-identical to gguf-py (which transformers uses) for
every tensor type we handle ourselves and the fallback; clear errors for damaged files."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from peer.errors import CheckpointError
from peer.gguf_file import GGUFFile, dequantize

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_dequantize_matches_gguf_py(qtype) -> None:
    x = np.random.default_rng(int(qtype)).standard_normal((6, 96)).astype(np.float32) * 3
    q = x if qtype == T.F32 else gguf.quantize(x, qtype)
    expected = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(q, qtype))).float()
    raw = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(-1).copy())
    assert torch.equal(dequantize(raw, int(qtype), (6, 96)), expected)


def write_gguf(path: Path) -> dict[str, np.ndarray]:
    tensors = {
        "a.weight": np.arange(64, dtype=np.float32).reshape(2, 32),
        "b.weight": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(500)])
    w.add_tensor("a.weight", tensors["a.weight"])
    q = gguf.quantize(tensors["b.weight"], T.Q8_0)
    w.add_tensor("b.weight", q, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors["b.weight"] = gguf.dequantize(q, T.Q8_0)
    return tensors


def test_index_and_read_match_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    expected = write_gguf(path)
    f = GGUFFile(path)
    assert set(f.tensors) == set(expected)
    for name, array in expected.items():
        assert f.tensors[name].shape == array.shape
        assert torch.equal(f.read(name), torch.from_numpy(np.ascontiguousarray(array)))
    f.close()
    f.close()


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path)
    data = path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFFile(tmp_path / "truncated.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        GGUFFile(tmp_path / "magic.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        GGUFFile(tmp_path / "header.gguf")


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_k_quants_dequantize_bitwise_as_gguf_py(qtype) -> None:
    """Q4_K and Q6_K (Gemma 3 270M's Q4_K_M file) from arbitrary block bytes, scales of every kind
    included: the same bits as gguf-py's own dequantization, NaNs and infinities too."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (4, 3 * type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # scales that are NaN or infinite
        expected = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(raw, qtype)))
        ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype), (4, 3 * block))
    assert ours.shape == expected.shape and torch.equal(ours.view(torch.int32), expected.view(torch.int32))


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_an_embedded_models_tensors_match_gguf_py(model: str, request: pytest.FixtureRequest) -> None:
    """Every tensor where gguf-py's reader finds it; dequantized bit for bit as gguf-py does it, for
    the first and last tensor of each type (Gemma 3 270M's file holds F32, Q8_0, Q5_0, Q4_K and Q6_K
    tensors; SmolLM2's F32, Q4_1 and Q6_K)."""
    _, files = request.getfixturevalue(model)
    ours = GGUFFile(files.gguf_path)
    reader = gguf.GGUFReader(str(files.gguf_path))
    assert set(ours.tensors) == {t.name for t in reader.tensors}
    ends: dict[int, list] = {}
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert (mine.offset, mine.ggml_type, mine.nbytes) == (t.data_offset, int(t.tensor_type), t.n_bytes), t.name
        ends.setdefault(int(t.tensor_type), []).append(t)
    for t in (t for kind in ends.values() for t in {kind[0].name: kind[0], kind[-1].name: kind[-1]}.values()):
        expected = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type)))
        assert torch.equal(ours.read(t.name), expected), t.name
    ours.close()


def handmade_gguf(path: Path, *, alignment: int | None, dims: list[int], data_bytes: int = 64) -> None:
    """A minimal GGUF v3 file written byte by byte: optional alignment key, one F32 tensor."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = b"" if alignment is None else string("general.alignment") + struct.pack("<II", 4, alignment)
    info = string("t.weight") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    info += struct.pack("<IQ", 0, 0)  # F32 at offset 0
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0 if alignment is None else 1) + kv + info
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + b"\0" * data_bytes)


def test_hostile_headers_are_refused(tmp_path: Path) -> None:
    ok = tmp_path / "ok.gguf"
    handmade_gguf(ok, alignment=None, dims=[4, 4])
    assert GGUFFile(ok).read("t.weight").shape == (4, 4)
    cases = {
        "zero-alignment": {"alignment": 0, "dims": [4, 4]},
        "huge-dims": {"alignment": None, "dims": [2**40, 2**40]},
        "past-end": {"alignment": None, "dims": [64, 64]},
    }
    for name, kwargs in cases.items():
        path = tmp_path / f"{name}.gguf"
        handmade_gguf(path, **kwargs)
        with pytest.raises(CheckpointError):
            GGUFFile(path)
