"""A stage drops the KV caches of sessions whose layer-map epoch was abandoned: one in-process
stage holding a tiny random Llama's every layer, stepped through `StageService.step` as the
entry peer would, then told of a newer epoch."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from peer.stage import StageModel
from swarm.auth import Message
from swarm.config import SwarmConfig
from swarm.layer_map import LayerMap, Stage
from swarm.node import Checked
from swarm.stage_service import StageService, route_json
from swarm.tensors import pack
from tests.peer.test_profile import tiny_config

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


def step(service: StageService, node: SimpleNamespace, session: str) -> int:
    layer_map = node.layer_map
    body = {
        "session": session,
        "epoch": layer_map.epoch,
        "route": route_json(list(layer_map.stages)),
        "start": 0,
        "input": pack(torch.tensor([[1, 2, 3]], dtype=torch.int64)),
        "open": {"max_length": 8, "sampling": {"temperature": 0.0}},
    }
    msg = Message("step", PEER, PEER, b"", 1, 1, 0, 0.0, body)
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
    service.drop_before(5)

    executor = service.executor()
    assert executor is not None
    assert executor.session_ids() == ["new"]
    assert service.dropped == 2
    service.drop_before(5)  # nothing more to drop; the current session stays
    assert executor.session_ids() == ["new"] and service.dropped == 2


def test_dropping_forgets_sessions_closed_meanwhile() -> None:
    service, node = service_for(epoch=1)
    step(service, node, "s")
    executor = service.executor()
    assert executor is not None and executor.close_session("s")
    service.drop_before(2)
    assert service.dropped == 0 and service.sessions() == 0
