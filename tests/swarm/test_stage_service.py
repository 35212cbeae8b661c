"""A stage drops the KV caches of sessions whose layer map was abandoned (an older epoch, or another
leader's map of the same epoch) and of sessions whose entry peer died: one in-process stage holding
a tiny random Llama's every layer, stepped through `StageService.step` as entry peers would."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from peer.stage import StageModel
from swarm.auth import Message
from swarm.config import SwarmConfig
from swarm.errors import MessageRejected
from swarm.layer_map import LayerMap, Stage
from swarm.node import Checked
from swarm.stage_service import StageService, route_json
from swarm.tensors import pack
from tests.helpers import tiny_config

PEER = "a" * 32


def service_for(epoch: int) -> tuple[StageService, SimpleNamespace]:
    config = tiny_config()
    stage = StageModel(config, 0, config.num_hidden_layers).eval()
    layer_map = LayerMap(1, epoch, "fp", config.num_hidden_layers, (Stage(PEER, "http://x", 0, 3),))
    node = SimpleNamespace(
        peer_id=PEER,
        node_id="a",
        config=SwarmConfig(),
        layer_map=layer_map,
        host=SimpleNamespace(stage=stage, range=(0, config.num_hidden_layers)),
    )
    return StageService(node), node  # type: ignore[arg-type]


def step(
    service: StageService, node: SimpleNamespace, session: str, entry: str = PEER, on: LayerMap | None = None
) -> int:
    """One step of `session` from `entry` on layer map `on` (default: the one the stage follows)."""
    layer_map = on or node.layer_map
    body = {
        "session": session,
        "epoch": layer_map.epoch,
        "map": layer_map.id,
        "route": route_json(list(layer_map.stages)),
        "start": 0,
        "input": pack(torch.tensor([[1, 2, 3]], dtype=torch.int64)),
        "open": {"max_length": 8, "sampling": {"temperature": 0.0}},
    }
    msg = Message("step", entry, PEER, b"", 1, 1, 0, 0.0, body)
    reply = asyncio.run(service.step(Checked(msg, None, None)))  # type: ignore[arg-type]
    return int(reply["token"])


def test_sessions_of_an_abandoned_epoch_are_dropped_and_current_ones_kept() -> None:
    service, node = service_for(epoch=4)
    step(service, node, "old-1")
    step(service, node, "old-2")
    assert service.sessions() == 2

    # The map moves on (same range here, so the executor and its caches would otherwise live on).
    node.layer_map = LayerMap(1, 5, "fp", 3, node.layer_map.stages)
    step(service, node, "new")
    service.drop_other_maps(node.layer_map)

    executor = service.executor()
    assert executor is not None
    assert executor.session_ids() == ["new"]
    assert service.dropped == 2
    service.drop_other_maps(node.layer_map)  # nothing more to drop; the current session stays
    assert executor.session_ids() == ["new"] and service.dropped == 2


def test_another_leaders_map_of_the_same_epoch_drops_the_sessions_and_refuses_their_steps() -> None:
    service, node = service_for(epoch=4)
    step(service, node, "theirs")
    old = node.layer_map
    node.layer_map = dataclasses.replace(old, leader="b" * 32)  # the other side's leader, epoch 4 too
    service.drop_other_maps(node.layer_map)
    assert service.sessions() == 0 and service.dropped == 1
    with pytest.raises(MessageRejected, match="stale_epoch"):
        step(service, node, "late", on=old)  # a step on the first leader's epoch 4 is refused


def test_sessions_of_a_dead_entry_peer_are_dropped_and_others_kept() -> None:
    service, node = service_for(epoch=1)
    step(service, node, "a1", entry="e1")
    step(service, node, "a2", entry="e1")
    step(service, node, "b1", entry="e2")
    service.drop_entry("e1")
    executor = service.executor()
    assert executor is not None and executor.session_ids() == ["b1"] and service.dropped == 2
    service.drop_entry("nobody")
    assert executor.session_ids() == ["b1"] and service.dropped == 2


def test_dropping_forgets_sessions_closed_meanwhile() -> None:
    service, node = service_for(epoch=1)
    step(service, node, "s")
    executor = service.executor()
    assert executor is not None and executor.close_session("s")
    service.drop_other_maps(dataclasses.replace(node.layer_map, epoch=2))
    assert service.dropped == 0 and service.sessions() == 0
