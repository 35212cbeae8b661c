"""Peers in one process on 127.0.0.1 (no mDNS): a restarted higher-ranked peer adopts the current
layer map and takes over with a higher term; term and incarnation persist across restarts; a peer
too small for one layer stands by; a swarm too small for the model says so with the bytes; a
member that fails a direct probe is declared dead at once, one that answers is left alone, and a
peer that was itself stalled restarts its members' deadlines instead of killing them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from swarm.auth import Keyring
from swarm.daemon import PeerServer
from swarm.identity import STATE_FILE, Identity
from swarm.membership import Event, MemberInfo, State
from swarm.node import Node
from tests.swarm.inproc import hostport, members, peer, until

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
    from swarm.daemon import advertised_hosts

    def config(**node: object) -> SwarmConfig:
        return swarm_config_from_dict({"node": node, "discovery": {"mdns": False}})

    assert advertised_hosts(config(host="127.0.0.1")) == ["127.0.0.1"]
    assert advertised_hosts(config(host="localhost")) == ["127.0.0.1"]
    assert advertised_hosts(config(host="127.0.0.1", advertise_host="127.0.0.2")) == ["127.0.0.2"]
    with pytest.raises(ConfigError, match="--advertise-host"):
        advertised_hosts(config(host="::1"))  # IPv6 is refused clearly, without any lookup


async def test_a_starting_peer_answers_status_with_503(tmp_path: Path, model_dir: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from swarm.api import make_app
    from swarm.daemon import build_node
    from tests.swarm.inproc import make_config

    node = build_node(make_config(tmp_path, model_dir, "a", []), Keyring(), show_progress=False)
    async with TestClient(TestServer(make_app(node), host="127.0.0.1")) as client:
        resp = await client.get("/swarm/status")
        assert resp.status == 503 and (await resp.json())["error"]["type"] == "starting"
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["ready"] is False
    await node.close()


# ---- direct failure detection ------------------------------------------------------------------------

# No gossip round after the first, no election and no expiry of its own during a test: a member's
# fate is decided by the checks under test alone.
STILL: dict[str, Any] = {
    "gossip": {"interval_s": 30.0, "suspect_after_s": 60.0, "dead_after_s": 120.0},
    "election": {"startup_grace_s": 120.0},
}


async def first_round_done(server: PeerServer) -> None:
    """Wait for the node's first gossip round, which runs at once at start; the next is long after."""
    await until(lambda: server.node.membership is not None and server.node.membership.me.heartbeat > 0, "a round")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admit_stranger(node: Node, url: str, *, quiet_s: float = 0.0) -> str:
    """Admit a made-up member at `url` whose heartbeat last went up `quiet_s` ago; its peer id."""
    assert node.membership is not None
    info = dataclasses.replace(node.membership.me, peer_id=Identity.generate().peer_id, node_id="stranger", url=url)
    assert node.membership.admit(info, node.clock() - quiet_s) == [Event(info.peer_id, "joined")]
    return info.peer_id


def count_probes(node: Node, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The peer ids `node` gossips with from now on, one entry per exchange."""
    probed: list[str] = []
    real = node._gossip_to

    async def counted(info: MemberInfo) -> str | None:
        probed.append(info.peer_id)
        return await real(info)

    monkeypatch.setattr(node, "_gossip_to", counted)
    return probed


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A listener on 127.0.0.1 that accepts connections and never answers; its URL."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client gives up and hangs up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def dead_in_digest(node: Node) -> dict[str, bool]:
    assert node.membership is not None
    return {entry["info"]["peer_id"]: entry["dead"] for entry in node.membership.digest()}


async def test_check_peer_declares_a_member_refusing_connections_dead_at_once(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="swarm")
    async with peer(tmp_path, model_dir, "a", None, **STILL) as a:
        await first_round_done(a)
        node = a.node
        assert node.membership is not None
        # Its heartbeat is fresh: only the refused probe condemns it.
        gone = admit_stranger(node, f"http://127.0.0.1:{closed_port()}")
        probes = count_probes(node, monkeypatch)
        assert await node.check_peer(gone, "step to stage 1: Connection refused") is True
        assert probes == [gone]
        assert node.membership.state_of(gone) is State.DEAD
        assert dead_in_digest(node)[gone] is True  # the news goes out with the next digest
        (line,) = [r.getMessage() for r in caplog.records if f"peer {gone} (stranger) dead:" in r.getMessage()]
        assert "unreachable on the data path (step to stage 1: Connection refused)" in line
        assert "probe refused" in line
        # Asked again: already dead, and nobody is probed twice.
        assert await node.check_peer(gone, "step to stage 1: Connection refused") is True
        assert probes == [gone]


async def test_check_peer_waits_for_a_quiet_heartbeat_before_a_timeout_kills(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with peer(tmp_path, model_dir, "a", None, **STILL) as a, silent_server() as url:
        await first_round_done(a)
        node = a.node
        assert node.membership is not None
        probes = count_probes(node, monkeypatch)
        # A slow peer whose heartbeat still advances is not dead: it may be busy with a long step.
        busy = admit_stranger(node, url)
        assert await node.check_peer(busy, "no reply to a step") is False
        assert probes == [busy] and node.membership.state_of(busy) is State.ALIVE
        # Silent to the probe and quiet beyond the suspect timeout: dead. Two checks at once share one probe.
        stuck = admit_stranger(node, url, quiet_s=node.config.gossip.suspect_after_s + 1)
        first, second = await asyncio.gather(
            node.check_peer(stuck, "no reply to a step"), node.check_peer(stuck, "no reply to a close")
        )
        assert first is True and second is True
        assert probes.count(stuck) == 1  # then the news goes to the live: busy
        assert node.membership.state_of(stuck) is State.DEAD and node.membership.state_of(busy) is State.ALIVE


async def test_check_peer_leaves_a_member_that_answers_alive(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(32)
    async with (
        peer(tmp_path, model_dir, "a", key, **STILL) as a,
        peer(tmp_path, model_dir, "b", key, [hostport(a)], **STILL) as b,
    ):
        a_id, b_id = a.node.peer_id, b.node.peer_id
        await until(lambda: b_id in members(a) and a_id in members(b), "a and b to meet")
        await first_round_done(a)
        await first_round_done(b)
        assert a.node.membership is not None
        probes = count_probes(a.node, monkeypatch)
        assert await a.node.check_peer(b_id, "no reply to a step") is False
        assert probes == [b_id] and a.node.membership.state_of(b_id) is State.ALIVE
        # Something answers at an impostor's address, but not as that peer: an answer all the same,
        # so no proof of death.
        misdirected = b.node.drops["misdirected"]
        impostor = admit_stranger(a.node, b.url)
        assert await a.node.check_peer(impostor, "no reply to a step") is False
        assert b.node.drops["misdirected"] == misdirected + 1  # the probe did reach b
        assert a.node.membership.state_of(impostor) is State.ALIVE


async def test_check_peer_of_itself_or_an_unknown_peer_probes_nobody(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with peer(tmp_path, model_dir, "a", None, **STILL) as a:
        await first_round_done(a)
        node = a.node
        probes = count_probes(node, monkeypatch)
        assert await node.check_peer(node.peer_id, "no reply to a step") is False
        assert await node.check_peer(Identity.generate().peer_id, "no reply to a step") is False
        assert probes == []
        assert node.membership is not None and node.membership.state_of(node.peer_id) is State.ALIVE


async def test_a_gossip_round_after_this_peer_stalled_kills_nobody(tmp_path: Path, model_dir: Path) -> None:
    async with peer(tmp_path, model_dir, "a", None, **STILL) as a:
        await first_round_done(a)
        node = a.node
        assert node.membership is not None
        long_ago = node.config.gossip.dead_after_s + 5
        url = f"http://127.0.0.1:{closed_port()}"
        # This peer's last round was long ago (it was stopped): the members' silence is its own.
        spared = admit_stranger(node, url, quiet_s=long_ago)
        node._last_round = node.clock() - long_ago
        node._gossip_round()
        assert node.membership.state_of(spared) is State.ALIVE
        assert node.membership.quiet_for(spared, node.clock()) < node.config.gossip.suspect_after_s
        # Without the stall, the same silence is fatal.
        silent = admit_stranger(node, url, quiet_s=long_ago)
        node._gossip_round()
        assert node.membership.state_of(silent) is State.DEAD
        assert node.membership.state_of(spared) is State.ALIVE


# ---- identity and incarnations -----------------------------------------------------------------------


def copy_state(tmp_path: Path, src: str, dst: str) -> None:
    import shutil

    shutil.copytree(tmp_path / f"state-{src}", tmp_path / f"state-{dst}")


async def test_a_copy_of_a_live_peers_identity_is_refused_and_stops(tmp_path: Path, model_dir: Path, caplog) -> None:
    key = os.urandom(32)
    caplog.set_level(logging.WARNING, logger="swarm")
    async with peer(tmp_path, model_dir, "a", key) as a, peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
        await until(lambda: a.node.ready() and b.node.ready() and len(members(a)) == 1, "a swarm of two")
        assert b.node.membership is not None
        known = b.node.membership.members[a.node.peer_id].info
        copy_state(tmp_path, "b", "copy")
        async with peer(tmp_path, model_dir, "copy", key, [hostport(a)]) as copy:
            assert copy.node.peer_id == b.node.peer_id
            await until(lambda: copy.node.failed.is_set(), "the copy to be told it is one")
            said = f"peer id {b.node.peer_id} is alive at {b.url}; was its identity key copied?"
            assert copy.node.fatal is not None and said in copy.node.fatal
            assert any(said in r.getMessage() for r in caplog.records if r.name == "swarm")  # a logged it
            # The original keeps its place: same process, same address, alive, in the map.
            assert a.node.membership is not None
            held = a.node.membership.members[b.node.peer_id]
            assert held.state is State.ALIVE and held.info.instance == b.node.membership.me.instance
            assert held.info.url == b.url and a.node.layer_map is not None
            assert b.node.peer_id in a.node.layer_map.peer_ids()
        assert a.node.membership.members[b.node.peer_id].info.instance == b.node.membership.me.instance
        assert known.peer_id == a.node.peer_id


async def test_a_restart_at_another_address_is_let_in_at_once(tmp_path: Path, model_dir: Path) -> None:
    """A peer that comes back on another port before its old self is declared dead: the old address
    is asked, nobody answers there, and the new process takes the peer id's place."""
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "a", key) as a:
        async with peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
            await until(lambda: a.node.ready() and len(a.node.layer_map.stages) == 2, "a swarm of two")  # type: ignore[union-attr]
            old = b.node.membership.me  # type: ignore[union-attr]
        async with peer(tmp_path, model_dir, "b", key, [hostport(a)]) as again:
            assert again.url != old.url and again.node.peer_id == old.peer_id
            member = a.node.membership.members[old.peer_id]  # type: ignore[union-attr]
            await until(lambda: member.info.instance == again.node.membership.me.instance, "the new process")  # type: ignore[union-attr]
            assert not again.node.failed.is_set()
            await until(lambda: a.node.ready() and again.node.ready(), "ready again")


async def test_a_peer_known_by_a_higher_incarnation_is_told_and_rejoins(tmp_path: Path, model_dir: Path) -> None:
    """A peer restarted from an older copy of its state (a lower incarnation than the swarm last saw)
    is told so, moves past it, and rejoins without another restart."""
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "a", key) as a:

        def knows(peer_id: str, instance: str) -> bool:
            member = a.node.membership.members.get(peer_id)  # type: ignore[union-attr]
            return member is not None and member.info.instance == instance

        for _ in range(2):  # incarnations 1 and 2, each taken in by a
            async with peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
                b_id, me = b.node.peer_id, b.node.membership.me  # type: ignore[union-attr]
                await until(lambda: knows(b_id, me.instance), "b known")  # noqa: B023
        await until(lambda: a.node.membership.state_of(b_id) is State.DEAD, "b dead")  # type: ignore[union-attr]
        (tmp_path / "state-b" / STATE_FILE).write_text(json.dumps({"term": 0, "incarnation": 0}))
        async with peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
            assert b.node.membership.me.incarnation == 1  # type: ignore[union-attr]
            await until(lambda: a.node.membership.state_of(b_id) is State.ALIVE, "b back")  # type: ignore[union-attr]
            assert b.node.membership.me.incarnation == 3  # type: ignore[union-attr]
            assert json.loads((tmp_path / "state-b" / STATE_FILE).read_text())["incarnation"] == 3
            assert not b.node.failed.is_set()


async def test_dead_members_are_retried_so_a_partition_heals(tmp_path: Path, model_dir: Path) -> None:
    """Two peers that each declared the other dead (their link was down) take each other back."""
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "a", key) as a, peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
        await until(lambda: a.node.ready() and b.node.ready() and len(members(a)) == 1, "a swarm of two")
        assert a.node.membership is not None and b.node.membership is not None
        incarnations = (a.node.membership.me.incarnation, b.node.membership.me.incarnation)
        # What each sees when the link between them is cut: the other declared dead.
        a.node._on_events(a.node.membership.declare_dead(b.node.peer_id, a.node.clock(), "link cut"))
        b.node._on_events(b.node.membership.declare_dead(a.node.peer_id, b.node.clock(), "link cut"))
        await until(
            lambda: (
                a.node.membership.state_of(b.node.peer_id) is State.ALIVE  # type: ignore[union-attr]
                and b.node.membership.state_of(a.node.peer_id) is State.ALIVE
            ),  # type: ignore[union-attr]
            "both alive again",
        )
        # Each refuted the rumour of its death with a higher incarnation.
        assert (a.node.membership.me.incarnation, b.node.membership.me.incarnation) > incarnations
        await until(lambda: a.node.ready() and b.node.ready() and a.node.layer_map == b.node.layer_map, "one map")


async def test_a_peer_that_guessed_its_address_takes_the_one_another_reached_it_at(
    tmp_path: Path, model_dir: Path
) -> None:
    async with peer(tmp_path, model_dir, "a", None) as a:
        node = a.node
        assert node.membership is not None
        node._learn_url, node._own_addresses = True, {"198.18.0.7", "198.19.0.1"}
        node.observed("203.0.113.5")  # not one of ours (a NAT between us): says nothing, learning goes on
        node.observed("127.0.0.1")  # a peer on this machine, reached over loopback: likewise
        assert node.url == a.url and node._learn_url
        node.observed("198.18.0.7")
        port = a.url.rsplit(":", 1)[1]
        assert node.url == node.membership.me.url == f"http://198.18.0.7:{port}"
        node.observed("198.19.0.1")  # once learnt, kept
        assert node.url == f"http://198.18.0.7:{port}"


async def test_a_copy_reached_by_a_hello_does_not_take_the_originals_place(tmp_path: Path, model_dir: Path) -> None:
    """A member says hello to the copy's own address (a seed naming the copy's machine): the answer
    is judged like a message, so the copy is refused, and the original stays."""
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "a", key) as a, peer(tmp_path, model_dir, "b", key, [hostport(a)]) as b:
        await until(lambda: a.node.ready() and b.node.ready() and len(members(a)) == 1, "a swarm of two")
        assert a.node.membership is not None and b.node.membership is not None
        original = b.node.membership.me
        copy_state(tmp_path, "b", "copy")
        async with peer(tmp_path, model_dir, "copy", key) as copy:  # joins no one
            a.node._introduce(copy.url)
            await until(lambda: copy.node.failed.is_set(), "the copy to be told it is one")
            held = a.node.membership.members[original.peer_id]
            assert held.info.instance == original.instance and held.info.url == b.url
            assert held.state is State.ALIVE and not b.node.failed.is_set()
