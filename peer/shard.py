"""Build the stage for layers [start, end) from a checkpoint, reading only that stage's tensors.
The stage is first laid out on the meta device (no memory), then each parameter is read from the
tensor source, checked against its expected shape, cast, and assigned in place, so peak memory is
the stage's own weights plus one tensor in flight. Tied embeddings are shared on a stage holding
both ends and read from the embedding table on a last stage that does not."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from peer.checkpoint import TensorSource
from peer.errors import CheckpointError
from peer.quantize import held_as, quantize_weight
from peer.stage import StageModel

log = logging.getLogger(__name__)


def load_stage(
    source: TensorSource,
    config: Any,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    reuse: Mapping[str, torch.Tensor] | None = None,
    quantize: str = "none",
) -> StageModel:
    """Stage [start, end) with its weights read from `source`, on `device` at `dtype`.

    progress(done, total) is called after each tensor, for a progress bar on long loads.
    reuse maps checkpoint names to tensors already held (a previous stage's, see `held_tensors`);
    those are taken as they are instead of being read again (they are held as `quantize` says).
    quantize ("none", "int8" or "int4", `peer.quantize`) holds the projection, head and embedding
    weights quantized, each quantized as it is read, so memory peaks at the quantized stage plus one
    tensor.
    """
    reuse = reuse or {}
    t0 = time.perf_counter()
    with torch.device("meta"):
        stage = StageModel(config, start, end)
    names = stage.checkpoint_names()
    available = source.names()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {n: p.shape for n, p in stage.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for done, (param, ckpt) in enumerate(names.items(), start=1):
        if ckpt == "lm_head.weight" and tied:
            # A tied head is the embedding table, whether or not the checkpoint also stores a copy.
            if "embed_tokens.weight" in state:
                state[param] = state["embed_tokens.weight"]  # one table for both ends
                continue
            ckpt = "model.embed_tokens.weight"
        if ckpt in reuse and tuple(reuse[ckpt].shape) == tuple(expected[param]):
            state[param] = reuse[ckpt]  # a layer this peer already holds: keep it
            continue
        parts = stage.architecture.expert_parts(ckpt, config) if ckpt not in available else None
        if parts is not None:  # experts stored one by one: [E, rows of the parts, D]
            missing = [n for names in parts for n in names if n not in available]
            if missing:
                raise CheckpointError(f"checkpoint has no tensor {missing[0]!r} needed by layers [{start}, {end})")
            tensor = torch.stack([torch.cat([source.read(n, dtype) for n in names]) for names in parts])
        elif ckpt not in available:
            raise CheckpointError(f"checkpoint has no tensor {ckpt!r} needed by layers [{start}, {end})")
        else:
            tensor = source.read(ckpt, dtype)
        if tuple(tensor.shape) != tuple(expected[param]):
            raise CheckpointError(
                f"tensor {ckpt!r} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[param])}"
            )
        state[param] = tensor.to(device=device, dtype=dtype)
        state[param] = quantize_weight(state[param], held_as(param, tuple(tensor.shape), quantize))
        if progress:
            progress(done, len(names))
    stage.load_state_dict(state, strict=True, assign=True)
    if stage.embed_tokens is not None and stage.lm_head is not None and tied:
        stage.lm_head.weight = stage.embed_tokens.weight
    stage.rotary_emb.to(device)
    stage.eval().requires_grad_(False)
    log.info("loaded layers [%d, %d) in %.2f s", start, end, time.perf_counter() - t0)
    return stage


def held_tensors(stage: StageModel, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor of what `stage` holds that a stage [start, end) needs, for `load_stage(reuse=...)`.

    A tied table is offered under both its names, since either end may want it.
    """
    num_layers = stage.config.num_hidden_layers
    end = num_layers if end is None else end
    params = dict(stage.named_parameters(remove_duplicate=False))
    held = {ckpt: params[name].data for name, ckpt in stage.checkpoint_names().items()}
    tied = bool(getattr(stage.config, "tie_word_embeddings", False))
    if tied:
        table = held.get("model.embed_tokens.weight", held.get("lm_head.weight"))
        if table is not None:
            held["model.embed_tokens.weight"] = held["lm_head.weight"] = table

    def needed(name: str) -> bool:
        if name.startswith("model.layers."):
            return start <= int(name.split(".")[2]) < end
        if name == "model.embed_tokens.weight":
            return start == 0 or (tied and end == num_layers)  # a tied head is read from it
        return end == num_layers  # final norm and LM head

    return {name: tensor for name, tensor in held.items() if needed(name)}
