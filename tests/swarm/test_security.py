"""Peers in one process, on 127.0.0.1 without mDNS, attacked over their real HTTP endpoint: a peer
with another swarm key is never admitted, a peer serving another model is refused with a clear
log line, and forged, replayed, stale, malformed and oversized messages of every kind (gossip,
election, layer map) are dropped and counted without changing the receiver's state."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from swarm.auth import Keyring, Sealer, key_fingerprint, write_keyring
from swarm.daemon import PeerServer
from swarm.identity import Identity
from swarm.membership import MemberInfo
from swarm.node import MSG_PATH, Node
from tests.swarm.inproc import hostport, members, peer, until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def model_dir(tiny_llama) -> Path:
    return tiny_llama(layers=4)


async def test_a_peer_with_another_swarm_key_is_never_admitted(tmp_path: Path, model_dir: Path) -> None:
    key, other_key = os.urandom(32), os.urandom(32)
    async with (
        peer(tmp_path, model_dir, "a", key) as a,
        peer(tmp_path, model_dir, "intruder", other_key, [hostport(a)]) as intruder,
        peer(tmp_path, model_dir, "friend", key, [hostport(a)]) as friend,
    ):
        # The friend, with the right key, is admitted both ways (so admission does work here) ...
        await until(lambda: friend.node.peer_id in members(a) and a.node.peer_id in members(friend), "friend")
        # ... while every hello of the intruder is dropped (sealed under a key we do not hold),
        # however often it retries.
        await until(lambda: a.node.drops["unknown_key"] >= 3, "three dropped hellos")
        assert intruder.node.peer_id not in members(a) | members(friend)
        assert members(intruder) == set()
        # Nor does the intruder learn anything: our replies fail its own check. (Alone, it may have
        # elected itself and mapped the model onto itself; nothing of ours is in that map.)
        own = intruder.node.layer_map
        assert own is None or {s.peer_id for s in own.stages} == {intruder.node.peer_id}
        assert intruder.node.election.leader in (None, intruder.node.peer_id)


async def test_a_peer_serving_another_model_is_refused(
    tmp_path: Path, model_dir: Path, tiny_llama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm")
    key = os.urandom(32)
    other_model = tiny_llama(layers=4, seed=1)  # same shape, other weights: another fingerprint
    async with (
        peer(tmp_path, model_dir, "a", key) as a,
        peer(tmp_path, other_model, "b", key, [hostport(a)]) as b,
    ):
        await until(lambda: a.node.drops["wrong_model"] >= 2, "refused hellos")
        assert b.node.peer_id not in members(a) and a.node.peer_id not in members(b)
        refusals = [r.getMessage() for r in caplog.records if "refusing peer" in r.getMessage()]
        assert any(b.node.peer_id in m and "model fingerprint" in m for m in refusals), refusals
        assert len(refusals) == len(set(refusals)), "a refused peer is logged once, not on every retry"


class Attacker:
    """Holds the swarm key (or not) and seals hand-made messages to a target peer."""

    def __init__(
        self, target: Node, key: bytes | None, *, priority: int = -1, clock: Callable[[], float] | None = None
    ) -> None:
        self.identity = Identity.generate()
        ring = Keyring.of(key)
        self.sealer = Sealer(self.identity, ring, clock=clock) if clock else Sealer(self.identity, ring)
        self.target = target
        assert target.membership is not None
        self.info = MemberInfo(
            peer_id=self.identity.peer_id,
            node_id="attacker",
            url="http://127.0.0.1:9",  # nothing listens there
            incarnation=1,
            heartbeat=1,
            priority=priority,
            usable_bytes=1 << 30,
            device="cpu",
            fingerprint=target.model.fingerprint,
            epoch=0,
            start=0,
            end=0,
            ready=True,
        )

    def seal(self, kind: str, body: dict[str, Any], term: int = 0, to: str | None = "target") -> bytes:
        common = {"info": self.info.to_dict(), "leader": None, "leader_priority": None}
        to = self.target.peer_id if to == "target" else to
        return self.sealer.seal(kind, {**common, **body}, term=term, incarnation=self.info.incarnation, to=to)

    def read(self, reply: bytes) -> dict[str, Any]:
        """The signed part of a reply sealed to us, decrypted with our key (no other check)."""
        header, nonce, sealed = msgpack.unpackb(reply)
        cipher = self.sealer.keyring.cipher(msgpack.unpackb(header)["key"])
        assert cipher is not None
        signed, _ = msgpack.unpackb(cipher.decrypt(nonce, sealed, header))
        head: dict[str, Any] = msgpack.unpackb(signed)
        return head


async def post(server: PeerServer, data: bytes) -> tuple[int, dict[str, Any] | None]:
    async with aiohttp.ClientSession() as session, session.post(server.url + MSG_PATH, data=data) as resp:
        raw = await resp.read()
        return resp.status, (await resp.json() if resp.content_type == "application/json" else None) or (
            {"reply": raw} if resp.status == 200 else None
        )


def snapshot(node: Node) -> tuple[Any, ...]:
    assert node.membership is not None
    return (
        node.election.term,
        node.election.leader,
        node.layer_map,
        sorted((m.info.peer_id, m.info.incarnation, m.state) for m in node.membership.members.values()),
    )


def layer_map_from(leader_id: str, node: Node, term: int, epoch: int) -> dict[str, Any]:
    layers = node.model.profile.num_layers
    return {
        "term": term,
        "epoch": epoch,
        "model": node.model.fingerprint,
        "num_layers": layers,
        "leader": leader_id,
        "stages": [{"peer_id": leader_id, "url": "http://127.0.0.1:9", "start": 0, "end": layers}],
    }


async def test_forged_replayed_and_stale_messages_are_dropped_and_counted(tmp_path: Path, model_dir: Path) -> None:
    key = os.urandom(32)
    # Long timings: nothing of the peer's own changes mid-test except what the attacker causes.
    slow = {"gossip": {"interval_s": 5.0, "suspect_after_s": 50.0, "dead_after_s": 100.0}}
    async with peer(tmp_path, model_dir, "a", key, election={"startup_grace_s": 60.0}, **slow) as a:
        node = a.node
        insider = Attacker(node, key)
        cases: list[tuple[str, bytes, int, str]] = []
        # Gossip: a genuine message is accepted once; the same bytes again are a replay.
        gossip = insider.seal("gossip", {"digest": [{"info": insider.info.to_dict(), "dead": False}]})
        assert (await post(a, gossip))[0] == 200
        # Election: a genuine ELECTION from a lower-ranked peer is answered OK, then replayed.
        election = insider.seal("election", {})
        status, body = await post(a, election)
        assert status == 200 and body is not None and insider.read(body["reply"])["kind"] == "ok"
        before = snapshot(node)
        cases.append(("gossip replayed", gossip, 409, "replayed"))
        cases.append(("election replayed", election, 409, "replayed"))
        # Forgeries: another key; a flipped byte; another identity's signature over our claim.
        outsider = Attacker(node, os.urandom(32))
        for kind, body in (("gossip", {"digest": []}), ("election", {}), ("layer_map", {"map": None})):
            cases.append((f"{kind} under another key", outsider.seal(kind, body), 401, "unknown_key"))
            header, nonce, sealed = msgpack.unpackb(insider.seal(kind, body))
            flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
            cases.append((f"{kind} tampered", msgpack.packb([header, nonce, flipped]), 401, "forged"))
        # Stale: stamped a minute in the past, beyond the 30 s allowed skew.
        late = Attacker(node, key, clock=lambda: time.time() - 60)
        cases.append(("gossip stamped a minute ago", late.seal("gossip", {"digest": []}), 409, "stale"))
        # A layer map from a peer that is not the leader of its term is refused.
        not_leader = insider.seal("layer_map", {"map": layer_map_from(insider.info.peer_id, node, 0, 9)})
        cases.append(("layer map from a non-leader", not_leader, 409, "not_leader"))
        # Sealed for another peer (captured on its way there), or for nobody though not a hello.
        for kind, body in (("gossip", {"digest": []}), ("election", {}), ("layer_map", {"map": None})):
            cases.append((f"{kind} sealed for another peer", insider.seal(kind, body, to="f" * 16), 409, "misdirected"))
            cases.append((f"{kind} sealed for nobody", insider.seal(kind, body, to=None), 409, "misdirected"))
        # The target's own answer to us, reflected back at it.
        status, body = await post(a, insider.seal("hello", {}))
        assert status == 200 and body is not None
        cases.append(("its own reply reflected", body["reply"], 409, "misdirected"))
        for what, data, want_status, reason in cases:
            counted = node.drops[reason]
            status, body = await post(a, data)
            assert status == want_status, what
            assert body is not None and body["error"]["type"] == reason, (what, body)
            assert node.drops[reason] == counted + 1, what
            assert snapshot(node) == before, f"{what} changed the peer's state"

        # A genuine leader's layer map is followed once; its replay is dropped and changes nothing.
        leader = Attacker(node, key, priority=10)
        coordinator = leader.seal("coordinator", {}, term=node.election.term + 5)
        status, body = await post(a, coordinator)
        assert status == 200 and node.election.leader == leader.info.peer_id
        term = node.election.term
        layer_map = leader.seal("layer_map", {"map": layer_map_from(leader.info.peer_id, node, term, 7)}, term=term)
        assert (await post(a, layer_map))[0] == 200
        assert node.layer_map is not None and node.layer_map.epoch == 7
        followed = snapshot(node)
        replays = node.drops["replayed"]
        for data in (coordinator, layer_map):
            status, body = await post(a, data)
            assert status == 409 and body is not None and body["error"]["type"] == "replayed"
        assert node.drops["replayed"] == replays + 2
        assert snapshot(node) == followed
        # And a COORDINATOR of a stale term, however genuine, is refused.
        stale = Attacker(node, key, priority=20).seal("coordinator", {}, term=term - 1)
        status, body = await post(a, stale)
        assert status == 200 and body is not None and leader.read(body["reply"])["kind"] == "refuse"
        assert node.election.leader == leader.info.peer_id and node.election.term == term

        # Everything dropped is visible in the status document.
        async with aiohttp.ClientSession() as session, session.get(a.url + "/swarm/status") as resp:
            dropped = (await resp.json())["dropped_messages"]
        assert dropped["forged"] >= 3 and dropped["unknown_key"] >= 3
        assert dropped["replayed"] >= 4 and dropped["stale"] >= 1
        assert dropped["not_leader"] >= 1


async def test_malformed_and_oversized_bodies_get_clear_errors(tmp_path: Path, model_dir: Path) -> None:
    key = os.urandom(32)
    async with peer(tmp_path, model_dir, "a", key, security={"max_message_bytes": 64 * 1024}) as a:
        node = a.node
        before = snapshot(node)
        insider = Attacker(node, key)
        bad_info = dataclasses.replace(insider.info, start=5, end=2).to_dict()
        cases = [
            (b"\xc1 not msgpack", 400, "malformed"),
            (msgpack.packb({"a": 1}), 400, "malformed"),
            (msgpack.packb([b"x", b"y"]), 400, "malformed"),
            (insider.seal("no_such_kind", {}), 400, "malformed"),
            (
                insider.sealer.seal("gossip", {"info": bad_info}, term=0, incarnation=1, to=node.peer_id),
                400,
                "malformed",
            ),
            (insider.seal("gossip", {"digest": "not a list"}), 400, "malformed"),
            (b"\x00" * (64 * 1024 + 1), 413, "oversized"),
        ]
        for data, want_status, reason in cases:
            counted = node.drops[reason]
            status, body = await post(a, data)
            assert status == want_status and body is not None and body["error"]["type"] == reason, body
            assert node.drops[reason] == counted + 1
        # The malformed-info gossip was dropped before it could admit anyone; the peer still serves.
        assert snapshot(node)[:3] == before[:3] and insider.info.peer_id not in members(a)
        async with aiohttp.ClientSession() as session, session.get(a.url + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"


# ---- keyrings reloaded on a running peer ----------------------------------------------------------------


async def test_a_running_peer_reloads_its_keyring_file(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    ring = tmp_path / "ring.key"
    write_keyring(ring, Keyring.of(old))
    async with peer(tmp_path, model_dir, "a", old, security={"swarm_key_file": str(ring)}) as a:
        node = a.node
        announced: list[str] = []

        async def announce(fingerprint: str) -> None:
            announced.append(fingerprint)

        node.on_new_primary = announce
        assert not node.reload_keys()  # unchanged
        write_keyring(ring, Keyring([old, new], primary=old))
        assert node.reload_keys() and node.keyring.fingerprints == [key_fingerprint(old), key_fingerprint(new)]
        # Both keys open now; the old one still seals.
        for key in (old, new):
            status, _ = await post(a, Attacker(node, key).seal("election", {}))
            assert status == 200
        write_keyring(ring, Keyring([old, new], primary=new))
        assert node.reload_keys() and node.key_fingerprint == key_fingerprint(new)
        await until(lambda: announced == [key_fingerprint(new)], "the new primary to be announced")
        status, body = await post(a, Attacker(node, new).seal("election", {}))
        assert (
            status == 200
            and body is not None
            and msgpack.unpackb(msgpack.unpackb(body["reply"])[0])["key"] == (key_fingerprint(new))
        )  # its reply is sealed under the new key
        # A broken edit keeps the keys in force, with one warning per change of the file.
        ring.write_text("*not a key\n")
        with caplog.at_level(logging.WARNING, logger="swarm.node"):
            assert not node.reload_keys() and not node.reload_keys()
        assert node.key_fingerprint == key_fingerprint(new)
        assert sum("keeping the current swarm keys" in r.getMessage() for r in caplog.records) == 1
        write_keyring(ring, Keyring.of(new))
        assert node.reload_keys()
        status, body = await post(a, Attacker(node, old).seal("election", {}))
        assert status == 401 and body is not None and body["error"]["type"] == "unknown_key"
        async with aiohttp.ClientSession() as session, session.get(a.url + "/swarm/status") as resp:
            assert (await resp.json())["swarm_keys"] == {
                "primary": key_fingerprint(new), "accepted": [key_fingerprint(new)], "secure": True,
            }  # fmt: skip


async def test_a_peer_with_few_connections_allowed_answers_one_more_with_503(tmp_path: Path, model_dir: Path) -> None:
    async with peer(tmp_path, model_dir, "a", os.urandom(32), serving={"max_connections": 2}) as a:
        host, port = hostport(a).split(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
        for reader, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection(host, int(port))
        assert (await reader.read()).startswith(b"HTTP/1.1 503")
        writer.close()
        for _, w in held:
            w.close()
        assert a.node.flood.total["too_many_connections"] == 1


async def test_a_streamed_body_is_cut_off_at_its_limit_and_leaves_no_bytes_counted(
    tmp_path: Path, model_dir: Path
) -> None:
    limits = {"security": {"max_message_bytes": 64 * 1024}, "serving": {"max_activation_bytes": 1 << 20}}
    async with peer(tmp_path, model_dir, "a", os.urandom(32), **limits) as a:

        async def endless() -> Any:
            for _ in range(1000):  # 64 MiB if it were read to the end; no Content-Length
                yield b"\x00" * (64 * 1024)

        async with aiohttp.ClientSession() as session:
            for path in (MSG_PATH,):
                try:
                    async with session.post(a.url + path, data=endless()) as resp:
                        assert resp.status == 413 and (await resp.json())["error"]["type"] == "oversized"
                except aiohttp.ClientError:
                    pass  # the peer may close the connection before the client has sent everything
        assert a.node.inbound_bytes == 0 and a.node.drops["oversized"] == 1
