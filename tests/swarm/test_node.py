"""Peers in one process on 127.0.0.1 (no mDNS): a restarted higher-ranked peer adopts the current
layer map and takes over with a higher term; term and incarnation persist across restarts; a peer
too small for one layer stands by; a swarm too small for the model says so with the bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from swarm.identity import STATE_FILE
from tests.swarm.test_security import hostport, members, peer, until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def model_dir(tiny_llama) -> Path:
    return tiny_llama(layers=6, hidden=128, intermediate=512)


async def test_a_restarted_higher_ranked_peer_adopts_the_map_and_takes_over(tmp_path: Path, model_dir: Path) -> None:
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "low", key, node={"priority": 0}) as low:
        async with peer(tmp_path, model_dir, "high", key, [hostport(low)], node={"priority": 5}) as high:
            await until(lambda: low.node.ready() and low.node.election.leader == high.node.peer_id, "high to lead")
            high_id = high.node.peer_id
            first_term = high.node.election.term
        # high is gone without a word; low notices, leads alone with a higher term and a new map.
        await until(lambda: low.node.election.is_leader and low.node.ready(), "low to lead alone")
        alone = low.node.layer_map
        assert alone is not None and [s.peer_id for s in alone.stages] == [low.node.peer_id]
        assert low.node.election.term > first_term
        saved = json.loads((tmp_path / "state-high" / STATE_FILE).read_text())
        assert saved["term"] == first_term and saved["incarnation"] == 1

        async with peer(tmp_path, model_dir, "high", key, [hostport(low)], node={"priority": 5}) as again:
            assert again.node.peer_id == high_id  # same state directory, same identity
            assert again.node.membership is not None and again.node.membership.me.incarnation == 2
            await until(
                lambda: again.node.election.is_leader and low.node.election.leader == high_id and low.node.ready(),
                "the restarted peer to lead a ready swarm",
            )
            # A higher term than the one low led alone under, agreed by both.
            assert again.node.election.term == low.node.election.term > alone.term
            # It started from the map the swarm followed, so its own map's epoch comes after it.
            final = again.node.layer_map
            assert final is not None and final.epoch > alone.epoch
            assert {s.peer_id for s in final.stages} == {high_id, low.node.peer_id}
            assert again.node.max_epoch >= alone.epoch


async def test_a_peer_too_small_for_one_layer_stands_by(tmp_path: Path, tiny_llama) -> None:
    key = os.urandom(32)
    # Layers of about 2 MiB in bfloat16 (4 MiB in float32): a 1 MiB cap holds none, on any device.
    model_dir = tiny_llama(layers=6, hidden=256, intermediate=1024)
    async with (
        peer(tmp_path, model_dir, "big", key, resources={"max_memory_mb": 64}) as big,
        peer(tmp_path, model_dir, "tiny", key, [hostport(big)], resources={"max_memory_mb": 1}) as tiny,
    ):
        await until(lambda: tiny.node.peer_id in members(big) and big.node.ready() and tiny.node.ready(), "ready")
        status = tiny.node.status()
        assert [s["peer_id"] for s in status["layer_map"]["stages"]] == [big.node.peer_id]
        assert status["loaded"] is None and status["ready"]
        assert tiny.node.host is not None and tiny.node.host.range is None


async def test_a_swarm_too_small_for_the_model_says_what_it_needs(tmp_path: Path, model_dir: Path) -> None:
    async with peer(tmp_path, model_dir, "small", None, resources={"max_memory_mb": 2}) as small:
        await until(lambda: small.node.status()["errors"], "the partition error")
        status = small.node.status()
        assert not status["ready"] and status["layer_map"] is None
        (error,) = status["errors"]
        assert "cannot hold the model" in error and "needs" in error and f"{2 * 1024 * 1024} bytes" in error


async def test_a_failed_load_is_retried_until_it_succeeds(tmp_path: Path, model_dir: Path) -> None:
    async with peer(tmp_path, model_dir, "a", None) as a:
        host = a.node.host
        assert host is not None
        await until(lambda: a.node.ready(), "the first load")
        # The next range change fails once (a disk hiccup), then works.
        real_load, failures = host.load, []

        def flaky(start: int, end: int) -> float:
            if not failures:
                failures.append((start, end))
                raise OSError("simulated read error")
            return real_load(start, end)

        host.load = flaky  # type: ignore[method-assign]
        host.unload()
        a.node._reconcile()
        await until(lambda: a.node.load_error is not None, "the failure to be reported")
        assert "simulated read error" in a.node.status()["errors"][0] and not a.node.ready()
        await until(lambda: a.node.ready() and a.node.load_error is None, "the retried load")
        assert failures and host.range == (0, 6)


def test_the_advertised_address_is_an_ipv4_address() -> None:
    from peer.errors import ConfigError
    from swarm.config import SwarmConfig, swarm_config_from_dict
    from swarm.daemon import advertised_host

    def config(**node: object) -> SwarmConfig:
        return swarm_config_from_dict({"node": node, "discovery": {"mdns": False}})

    assert advertised_host(config(host="127.0.0.1")) == "127.0.0.1"
    assert advertised_host(config(host="localhost")) == "127.0.0.1"
    assert advertised_host(config(host="127.0.0.1", advertise_host="127.0.0.2")) == "127.0.0.2"
    with pytest.raises(ConfigError, match="--advertise-host"):
        advertised_host(config(host="::1"))  # IPv6 is refused clearly, without any lookup


async def test_a_starting_peer_answers_status_with_503(tmp_path: Path, model_dir: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from swarm.api import make_app
    from swarm.daemon import build_node
    from tests.swarm.test_security import make_config

    node = build_node(make_config(tmp_path, model_dir, "a", []), None, show_progress=False)
    async with TestClient(TestServer(make_app(node), host="127.0.0.1")) as client:
        resp = await client.get("/swarm/status")
        assert resp.status == 503 and (await resp.json())["error"]["type"] == "starting"
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["ready"] is False
    await node.close()
