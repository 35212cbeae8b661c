"""Quantized resident weights (`peer.quantize`, `--quantize int8` and `int4`): with int8 every
projection, head and embedding weight is held as int8 with a float32 scale per row, within half a
step of the original; with int4 the layers' projections are 4-bit groups within half a step of
theirs, the tables int8; the stage computes with exactly those weights, on the CPU kernels
(bfloat16 activations) and at float32; the profile counts the bytes a stage then holds; a tied
table stays one table; bad settings are refused. Speed, memory and perplexity are
scripts/bench.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peer import quantize
from peer.checkpoint import open_checkpoint
from peer.config import ConfigError, ModelConfig, StoreConfig
from peer.kv_cache import SessionKVCache
from peer.model_store import ModelStore
from peer.pipeline import LocalPipeline
from peer.profile import ModelProfile, head_dim
from peer.resources import resolve_dtype
from peer.shard import load_stage
from tests.peer.test_architectures import VARIANTS, randomised, tiny_config


@pytest.fixture(scope="module", params=["llama-tied", "gemma3_text", "phi3"])
def checkpoint(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type = request.param.removesuffix("-tied")
    extra = {**VARIANTS[model_type], **({"tie_word_embeddings": True} if "tied" in request.param else {})}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"quantize-{request.param}")
    randomised(AutoModelForCausalLM.from_config(tiny_config(model_type, **extra))).save_pretrained(path)
    return path


def load(path: Path, tmp_path: Path, start: int, end: int, dtype: torch.dtype, mode: str):
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(path))
    config = files.load_config()
    source = open_checkpoint(files, config, dtype)
    try:
        return load_stage(source, config, start, end, dtype=dtype, quantize=mode)
    finally:
        source.close()


def test_weights_are_int8_rows_within_half_a_step(checkpoint: Path, tmp_path: Path) -> None:
    plain = load(checkpoint, tmp_path, 0, 4, torch.float32, "none")
    held = load(checkpoint, tmp_path, 0, 4, torch.float32, "int8")
    originals = dict(plain.named_parameters(remove_duplicate=False))
    quantized = [name for name, p in held.named_parameters(remove_duplicate=False) if quantize.is_quantized(p)]
    assert quantized and set(quantized) == {n for n in originals if quantize.quantizable(n)}
    assert any("norm" in n for n in originals) and not any("norm" in n for n in quantized)
    for name, p in held.named_parameters(remove_duplicate=False):
        w = originals[name].detach()
        if name not in quantized:
            assert torch.equal(p, w), name
            continue
        assert p.qdata.dtype == torch.int8 and p.qdata.shape == w.shape and p.scale.shape == (w.shape[0], 1)
        step = p.scale.float()
        assert torch.all((p.qdata.float() * step - w).abs() <= step / 2 + 1e-6), name


def test_int4_weights_are_groups_within_half_a_step(checkpoint: Path, tmp_path: Path) -> None:
    """The layers' projections as 4-bit groups (each within half its group's step of the original),
    the embedding table and the head as int8 rows, the rest as they were."""
    plain = load(checkpoint, tmp_path, 0, 4, torch.float32, "none")
    held = load(checkpoint, tmp_path, 0, 4, torch.float32, "int4")
    originals = dict(plain.named_parameters(remove_duplicate=False))
    int4 = {name for name, p in held.named_parameters(remove_duplicate=False) if quantize.is_int4(p)}
    projections = {n for n in originals if n.startswith("layers.") and quantize.quantizable(n)}
    projections -= {n for n in projections if n.endswith((".v_proj.weight", ".down_proj.weight"))}
    assert int4 and int4 == projections
    for name, p in held.named_parameters(remove_duplicate=False):
        w = originals[name].detach()
        if name in int4:
            scales = p.scale_and_zero[..., 0].float()  # [K / G, N]
            step = scales.t().repeat_interleave(quantize.INT4_GROUP_SIZE, dim=1)  # [N, K]
            assert p.qdata.dtype == torch.uint8 and p.qdata.numel() * 2 == w.numel()
            assert torch.all((p.dequantize(torch.float32) - w).abs() <= step / 2 + 1e-5), name
        elif quantize.quantizable(name):
            assert p.qdata.dtype == torch.int8 and name not in projections
        else:
            assert torch.equal(p, w), name


def test_int4_holds_only_what_its_kernel_takes() -> None:
    """A projection whose input width is not a multiple of the group size, or whose rows are not a
    multiple of 16, is held as int8; so are the value and down projections, as llama.cpp's Q4_K_M
    keeps them at more bits."""
    g = quantize.INT4_GROUP_SIZE
    assert quantize.held_as("layers.0.mlp.up_proj.weight", (64, 4 * g), "int4") == "int4"
    assert quantize.held_as("layers.0.mlp.up_proj.weight", (64, 4 * g + 8), "int4") == "int8"
    assert quantize.held_as("layers.0.mlp.up_proj.weight", (40, 4 * g), "int4") == "int8"
    assert quantize.held_as("lm_head.weight", (64, 4 * g), "int4") == "int8"
    assert quantize.held_as("layers.3.self_attn.v_proj.weight", (64, 4 * g), "int4") == "int8"  # as Q4_K_M
    assert quantize.held_as("layers.0.input_layernorm.weight", (4 * g,), "int4") == "none"
    for shape in [(16, 4 * g + 8), (40, 4 * g)]:
        with pytest.raises(ValueError, match=r"int4 holds weights of a multiple of 16 rows"):
            quantize.quantize_weight(torch.zeros(shape), "int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_table_stays_one_table(tmp_path: Path, tiny_llama, mode: str) -> None:
    stage = load(tiny_llama(layers=2, tied=True), tmp_path, 0, 2, torch.bfloat16, mode)
    assert stage.embed_tokens is not None and stage.lm_head is not None
    assert stage.lm_head.weight is stage.embed_tokens.weight and quantize.is_quantized(stage.lm_head.weight)


def dequantized(held, path: Path, tmp_path: Path, dtype: torch.dtype):
    """A plain stage at `dtype` holding `held`'s quantized weights dequantized (int8: q * scale)."""
    plain = load(path, tmp_path, held.start, held.end, dtype, "none")
    with torch.no_grad():
        for name, p in held.named_parameters():
            if quantize.is_int4(p):
                plain.get_parameter(name).copy_(p.dequantize(torch.float32).to(dtype))
            elif quantize.is_quantized(p):
                plain.get_parameter(name).copy_((p.qdata.float() * p.scale.float()).to(dtype))
    return plain


def logits_of(stage) -> torch.Tensor:
    config, ids = stage.config, torch.tensor([[3, 17, 42, 99, 5, 250, 7]])
    cache = SessionKVCache(first_layer=0, num_layers=stage.end, batch=1, kv_heads=config.num_key_value_heads,
                           head_dim=head_dim(config), max_length=8, dtype=stage.compute_dtype,
                           device="cpu")  # fmt: skip
    cache.begin_step(0, ids.shape[1])
    with torch.no_grad():
        return stage(ids, torch.arange(7)[None], cache, all_logits=True)[0].float()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_stage_computes_with_the_quantized_weights(checkpoint: Path, tmp_path: Path, mode: str) -> None:
    """At float32 logits equal those of a stage holding the dequantized weights as plain tensors,
    within 1e-4; on the CPU kernels (bfloat16 activations) they are no further from those float32
    logits than a plain bfloat16 stage with the same weights is."""
    reference = logits_of(dequantized(load(checkpoint, tmp_path, 0, 4, torch.float32, mode), checkpoint,
                                      tmp_path, torch.float32))  # fmt: skip
    library = logits_of(load(checkpoint, tmp_path, 0, 4, torch.float32, mode))
    assert torch.allclose(library, reference, atol=1e-4, rtol=0)
    held = load(checkpoint, tmp_path, 0, 4, torch.bfloat16, mode)
    kernel, plain = logits_of(held), logits_of(dequantized(held, checkpoint, tmp_path, torch.bfloat16))
    assert (kernel - reference).abs().max() <= 2 * (plain - reference).abs().max()


@pytest.mark.parametrize("width", [64, 40, 168])  # the CPU kernel takes multiples of 16; the rest dequantize
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_an_int8_product_is_the_dequantized_product(width: int, dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(width)
    q = quantize.quantize_weight(torch.randn(48, width, generator=gen), "int8")
    x, bias = torch.randn(rows, width, generator=gen).to(dtype), torch.randn(48, generator=gen).to(dtype)
    reference = F.linear(x.float(), q.qdata.float() * q.scale, bias.float())
    got = quantize.linear(x, q, bias).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, 48) and (got - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("width", [32, 96, 160])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_an_int4_product_is_the_dequantized_product(width: int, dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(width)
    q = quantize.quantize_weight(torch.randn(48, width, generator=gen).to(dtype), "int4")
    x, bias = torch.randn(rows, width, generator=gen).to(dtype), torch.randn(48, generator=gen).to(dtype)
    reference = F.linear(x.float(), q.dequantize(torch.float32), bias.float())
    got = quantize.linear(x, q, bias).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, 48) and (got - reference).abs().max() <= tolerance * reference.abs().max()


def test_a_large_weight_is_dequantized_a_slice_at_a_time(monkeypatch) -> None:
    """Off the CPU kernel no full-precision copy of the weight is made: slices of the chunk size."""
    monkeypatch.setattr(quantize, "DEQUANTIZE_CHUNK_ELEMENTS", 64 * 10)
    gen = torch.Generator().manual_seed(1)
    q = quantize.quantize_weight(torch.randn(48, 64, generator=gen), "int8")
    x = torch.randn(3, 64, generator=gen)
    widths: list[int] = []
    linear = F.linear

    def recording(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        widths.append(w.shape[0])
        return linear(a, w, b)

    monkeypatch.setattr(quantize.F, "linear", recording)
    got = quantize.linear(x, q, None)
    assert widths == [10, 10, 10, 10, 8]
    assert torch.allclose(got, linear(x, q.qdata.float() * q.scale), atol=1e-5, rtol=0)


def test_an_int8_embedding_row_is_the_dequantized_row() -> None:
    gen = torch.Generator().manual_seed(0)
    q = quantize.quantize_weight(torch.randn(48, 64, generator=gen), "int8")
    ids = torch.tensor([3, 0, 47])
    assert torch.equal(quantize.embedding(ids, q, torch.float32), q.qdata[ids].float() * q.scale[ids])


@pytest.mark.parametrize("rng", [(0, 2), (1, 3), (2, 4), (0, 4)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_profile_counts_what_a_quantized_stage_holds(checkpoint: Path, tmp_path: Path, rng, mode: str) -> None:
    stage = load(checkpoint, tmp_path, *rng, torch.bfloat16, mode)
    held = sum(quantize.held_bytes(p) for p in stage.parameters())  # parameters() deduplicates a tied table
    profile = ModelProfile.from_config(stage.config, torch.bfloat16, mode)
    assert held == profile.stage_weight_bytes(*rng)
    plain = ModelProfile.from_config(stage.config, torch.float32)
    assert profile.stage_weight_bytes(*rng) < 0.3 * plain.stage_weight_bytes(*rng) + 4096
    if mode == "int4":  # the layers' projections at half a byte and a group's scale and zero
        int8 = ModelProfile.from_config(stage.config, torch.bfloat16, "int8")
        assert profile.layer_bytes < 0.75 * int8.layer_bytes


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_pipeline_generates(tmp_path: Path, tiny_llama, mode: str) -> None:
    stage = load(tiny_llama(layers=2), tmp_path, 0, 2, torch.bfloat16, mode)
    tokens = list(LocalPipeline([stage]).generate("q", [5, 6, 7], 6))
    assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantize must be one of none, int8, int4"):
        ModelConfig(quantize="int3")
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        quantize.quantize_weight(torch.zeros(2, 32), "fp8")
    with pytest.raises(ValueError, match="unknown quantization"):
        ModelProfile.from_config(tiny_config("llama"), torch.float32, "int3")
    assert resolve_dtype("auto", "cpu", "int8") == torch.bfloat16  # the CPU kernel's activations
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cpu", "int8") == torch.float32
    assert resolve_dtype("auto", "cpu", "int4") == torch.bfloat16
    with pytest.raises(ConfigError, match="int4 weights run on the CPU only"):
        resolve_dtype("auto", "cuda", "int4")
