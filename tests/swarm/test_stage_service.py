"""A stage drops the KV caches of sessions whose layer map was abandoned (an older epoch, or another
leader's map of the same epoch) and of sessions whose entry peer died: one in-process stage holding
a tiny random Llama's every layer, sent pass frames as entry peers send them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from peer.sampling import SamplingParams
from peer.stage import StageModel
from swarm.config import SwarmConfig
from swarm.errors import MessageRejected
from swarm.frames import Opening, Row, pass_frame
from swarm.guard import FloodLog
from swarm.layer_map import LayerMap, Stage
from swarm.stage_service import StageService
from swarm.tasks import TaskGroup
from swarm.tensors import pack
from swarm.transport import Transport
from tests.helpers import tiny_config

PEER = "a" * 32


def service_for(epoch: int) -> tuple[StageService, SimpleNamespace]:
    """A stage holding every layer; `view.layer_map` is the map it follows (tests move it on)."""
    config = tiny_config()
    stage = StageModel(config, 0, config.num_hidden_layers).eval()
    layer_map = LayerMap(1, epoch, "fp", config.num_hidden_layers, (Stage(PEER, "http://x", 0, 3),))
    view = SimpleNamespace(layer_map=layer_map, url_of=lambda peer_id: None, name_of=lambda peer_id: peer_id)
    transport = Transport(PEER, seal=None, check=None, drops=Counter(), flood=FloodLog(logging.getLogger("t")),  # type: ignore[arg-type]
                          request_timeout_s=1.0, heartbeat_s=1.0,
                          max_frame_bytes=1 << 20)  # fmt: skip

    async def deliver(peer_id: str, url: str | None, body: dict[str, Any]) -> int:
        transport.dispatch(peer_id, body, 0.0, 0)  # every entry peer's frames come back to the test
        return 0

    transport.send = deliver  # type: ignore[method-assign]
    service = StageService(PEER, SwarmConfig(), stage=lambda: stage, view=view, transport=transport,  # type: ignore[arg-type]
                           tasks=TaskGroup(), on_unreachable=lambda peer_id, why: None)  # fmt: skip
    return service, view


def step(service: StageService, view: SimpleNamespace, session: str, entry: str = PEER,
         on: LayerMap | None = None) -> int:  # fmt: skip
    """One step of `session` from `entry` on layer map `on` (default: the one the stage follows); the
    token that comes home (to the test, whoever the entry peer is)."""
    layer_map = on or view.layer_map
    opening = Opening(8, SamplingParams(temperature=0.0))
    row = Row(session, entry, 1, 0, 3, opening)
    frame = pass_frame(layer_map.id, layer_map.epoch, [row], pack(torch.tensor([[1, 2, 3]], dtype=torch.int64)))

    async def run() -> int:
        home: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        service.transport.handlers["tokens"] = lambda sender, body, *_: home.set_result(body["rows"][0][2])
        service.transport.handlers["refused"] = lambda sender, body, *_: home.set_exception(
            MessageRejected(body["reason"], body["message"])
        )
        service.on_pass(entry, frame, 0.0, 0)
        return int(await asyncio.wait_for(home, 60))

    return asyncio.run(run())  # the batcher's worker ends with its queue, so each step may have its own loop


def test_sessions_of_an_abandoned_epoch_are_dropped_and_current_ones_kept() -> None:
    service, view = service_for(epoch=4)
    step(service, view, "old-1")
    step(service, view, "old-2")
    assert service.sessions() == 2

    # The map moves on (same range here, so the executor and its caches would otherwise live on).
    view.layer_map = LayerMap(1, 5, "fp", 3, view.layer_map.stages)
    step(service, view, "new")
    service.drop_other_maps(view.layer_map)

    executor = service.executor()
    assert executor is not None
    assert executor.session_ids() == ["new"]
    assert service.dropped == 2
    service.drop_other_maps(view.layer_map)  # nothing more to drop; the current session stays
    assert executor.session_ids() == ["new"] and service.dropped == 2


def test_another_leaders_map_of_the_same_epoch_drops_the_sessions_and_refuses_their_steps() -> None:
    service, view = service_for(epoch=4)
    step(service, view, "theirs")
    old = view.layer_map
    view.layer_map = dataclasses.replace(old, leader="b" * 32)  # the other side's leader, epoch 4 too
    service.drop_other_maps(view.layer_map)
    assert service.sessions() == 0 and service.dropped == 1
    with pytest.raises(MessageRejected, match="stale_epoch"):
        step(service, view, "late", on=old)  # a step on the first leader's epoch 4 is refused


def test_sessions_of_a_dead_entry_peer_are_dropped_and_others_kept() -> None:
    service, view = service_for(epoch=1)
    step(service, view, "a1", entry="e1")
    step(service, view, "a2", entry="e1")
    step(service, view, "b1", entry="e2")
    service.drop_entry("e1")
    executor = service.executor()
    assert executor is not None and executor.session_ids() == ["b1"] and service.dropped == 2
    service.drop_entry("nobody")
    assert executor.session_ids() == ["b1"] and service.dropped == 2


def test_dropping_forgets_sessions_closed_meanwhile() -> None:
    service, view = service_for(epoch=1)
    step(service, view, "s")
    executor = service.executor()
    assert executor is not None and executor.close_session("s")
    service.drop_other_maps(dataclasses.replace(view.layer_map, epoch=2))
    assert service.dropped == 0 and service.sessions() == 0
