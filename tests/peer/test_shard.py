"""Loading a stage reads only the tensors of its layers (plus embeddings on the first stage, norm
and head on the last): shown by recording every read, and by loading a middle stage from a sharded
checkpoint whose other shard files were deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peer.checkpoint import SafetensorsSource, open_checkpoint
from peer.config import StoreConfig
from peer.errors import CheckpointError, LayerRangeError
from peer.kv_cache import SessionKVCache
from peer.model_store import ModelStore
from peer.profile import ModelProfile
from peer.shard import held_tensors, load_stage
from tests.helpers import RecordingSource, expected_reads, layer_of


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rng", [(0, 2), (2, 4), (4, 6), (0, 6), (3, 4)])
def test_stage_reads_only_its_tensors(tiny_llama, tmp_path: Path, tied: bool, rng: tuple[int, int]) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=6, tied=tied)))
    config = files.load_config()
    source = RecordingSource(open_checkpoint(files, config))
    stage = load_stage(source, config, *rng)
    source.close()
    assert set(source.reads) == expected_reads(*rng, layers=6, tied=tied)
    assert len(source.reads) == len(set(source.reads)), "a tensor was read twice"
    # The stage holds exactly its profiled share of weights, no more.
    held = sum(p.numel() * p.element_size() for p in stage.parameters())  # parameters() deduplicates ties
    assert held == ModelProfile.from_config(config).stage_weight_bytes(*rng)


def test_middle_stage_loads_without_other_shards(tiny_llama, tmp_path: Path) -> None:
    src = tiny_llama(layers=6, max_shard_size="60KB")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {f for name, f in weight_map.items() if layer_of(name) in (2, 3)}
    assert len(set(weight_map.values()) - wanted) >= 2, "the checkpoint should be split into several shards"
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in wanted:
        shutil.copy(src / f, partial / f)

    config = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(src)).load_config()
    full_files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(src))
    from_partial = load_stage(SafetensorsSource(tuple(sorted(partial.iterdir()))), config, 2, 4)
    from_full = load_stage(open_checkpoint(full_files, config), config, 2, 4)

    hidden = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    outputs = []
    for stage in (from_partial, from_full):
        cache = SessionKVCache(
            first_layer=2,
            num_layers=2,
            batch=1,
            kv_heads=2,
            head_dim=16,
            max_length=8,
            dtype=torch.float32,
            device="cpu",
        )
        cache.begin_step(0, 5)
        with torch.no_grad():
            outputs.append(stage(hidden, torch.arange(5)[None], cache))
    assert torch.equal(outputs[0], outputs[1])
    # Asking the partial checkpoint for a layer it does not hold fails clearly.
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\."):
        load_stage(SafetensorsSource(tuple(sorted(partial.iterdir()))), config, 1, 2)


def test_shape_mismatch_is_a_clear_error(tiny_llama, tmp_path: Path) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=2)))
    config = files.load_config()
    config.intermediate_size += 8  # the config no longer describes the weights
    with pytest.raises(CheckpointError, match="shape"):
        load_stage(open_checkpoint(files, config), config, 0, 1)


def test_stage_range_is_validated(tiny_llama, tmp_path: Path) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=2)))
    config = files.load_config()
    for bad in ((1, 1), (-1, 1), (0, 3)):
        with pytest.raises(LayerRangeError, match="range"):
            load_stage(open_checkpoint(files, config), config, *bad)


@pytest.mark.parametrize(("stored", "wanted"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_stage_dtype_differs_from_checkpoint(tiny_llama, tmp_path: Path, stored, wanted) -> None:
    """Converting while loading (read with pread, not mapped) gives exactly the converted weights."""
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=2, dtype=stored)))
    config = files.load_config()
    converted = load_stage(open_checkpoint(files, config, wanted), config, 0, 2, dtype=wanted)
    as_stored = load_stage(open_checkpoint(files, config), config, 0, 2, dtype=stored)
    assert {p.dtype for p in converted.parameters()} == {wanted}
    for (name, a), (_, b) in zip(converted.named_parameters(), as_stored.named_parameters(), strict=True):
        assert torch.equal(a, b.to(wanted)), name
    held = sum(p.numel() * p.element_size() for p in converted.parameters())
    assert held == ModelProfile.from_config(config, wanted).stage_weight_bytes(0, 2)


def test_reloading_keeps_the_layers_already_held(tiny_llama, tmp_path: Path) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=6)))
    config = files.load_config()
    source = RecordingSource(open_checkpoint(files, config))
    old = load_stage(source, config, 0, 4)
    source.reads.clear()
    reuse = held_tensors(old, 2, 6)
    assert {layer_of(n) for n in reuse} == {2, 3}  # only what the new range needs is kept
    new = load_stage(source, config, 2, 6, reuse=reuse)
    # Only layers 4 and 5 and the head are read; layers 2 and 3 are the very tensors held before.
    assert set(source.reads) == expected_reads(4, 6, layers=6, tied=False)
    assert new.layers[0].mlp.up_proj.weight.data_ptr() == old.layers[2].mlp.up_proj.weight.data_ptr()
    fresh = load_stage(source, config, 2, 6)
    for a, b in zip(new.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    source.close()


def test_a_tied_table_is_kept_whichever_end_needs_it(tiny_llama, tmp_path: Path) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=6, tied=True)))
    config = files.load_config()
    source = RecordingSource(open_checkpoint(files, config))
    last = load_stage(source, config, 4, 6)  # holds the tied table as its LM head
    source.reads.clear()
    both = load_stage(source, config, 0, 6, reuse=held_tensors(last, 0, 6))
    assert "model.embed_tokens.weight" not in source.reads  # the head's copy served the embeddings
    assert both.embed_tokens is not None and last.lm_head is not None
    assert both.embed_tokens.weight.data_ptr() == last.lm_head.weight.data_ptr()
    source.close()
