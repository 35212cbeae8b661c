"""Links between peers: the frame cipher drops replayed, reordered, tampered and foreign frames
and counts them; both sides of a handshake derive the same keys, which no other link shares; and
two transports on 127.0.0.1 open a link with a handshake of sealed envelopes, send frames both
ways over it, refuse a peer without the swarm key or a replayed handshake, notice the link closing,
and make their links again under a new key when the keyring retires the old one; the dialler
learns the other clock from probes over the link, within the NTP bound."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from swarm.auth import Keyring, Message, Opener, Sealer
from swarm.errors import MessageRejected
from swarm.guard import FloodLog
from swarm.identity import Identity
from swarm.link import (
    LINK_HEADER,
    LINK_PATH,
    PROBES_ANSWERED,
    REFUSAL_HEADER,
    FrameCipher,
    Link,
    link_keys,
    new_ephemeral,
)
from swarm.transport import Transport

pytestmark = pytest.mark.timeout(120)
LIMIT = 1 << 20


# ---- the frame cipher --------------------------------------------------------------------------------


def pair() -> tuple[FrameCipher, FrameCipher]:
    """The two ends of one link."""
    a_to_b, b_to_a = os.urandom(32), os.urandom(32)
    return FrameCipher(a_to_b, b_to_a), FrameCipher(b_to_a, a_to_b)


def test_frames_open_in_order_on_the_other_end() -> None:
    a, b = pair()
    for i in range(5):
        assert b.open(a.seal({"n": i}), LIMIT) == {"n": i}
    assert a.open(b.seal([1, 2.5, b"x"]), LIMIT) == [1, 2.5, b"x"]


def test_a_replayed_or_reordered_frame_is_dropped_and_the_link_goes_on() -> None:
    a, b = pair()
    first, second, third = a.seal("one"), a.seal("two"), a.seal("three")
    assert b.open(first, LIMIT) == "one"
    assert b.open(third, LIMIT) == "three"
    for stale in (first, second, third):
        with pytest.raises(MessageRejected) as e:
            b.open(stale, LIMIT)
        assert e.value.reason == "replayed"
    assert b.open(a.seal("four"), LIMIT) == "four"


def test_a_tampered_or_foreign_frame_is_forged_and_moves_no_counter() -> None:
    a, b = pair()
    other, _ = pair()
    genuine = a.seal("hello")
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])
    for bad in (tampered, other.seal("from another link"), genuine[:8] + b"\0" * 16 + genuine[24:]):
        with pytest.raises(MessageRejected) as e:
            b.open(bad, LIMIT)
        assert e.value.reason == "forged"
    assert b.open(genuine, LIMIT) == "hello"  # its counter was never taken by the forgeries


@pytest.mark.parametrize(("data", "reason"), [(b"", "malformed"), (b"x" * 23, "malformed"), (b"x" * 100, "oversized")])
def test_short_and_oversized_frames_are_refused(data: bytes, reason: str) -> None:
    _, b = pair()
    with pytest.raises(MessageRejected) as e:
        b.open(data, 64)
    assert e.value.reason == reason


class StubSocket:
    """What a Link sends through, kept for the test to open with the other end's cipher."""

    closed = False

    def __init__(self) -> None:
        self.sent: asyncio.Queue[bytes] = asyncio.Queue()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.put_nowait(data)

    async def close(self, **_: Any) -> None:
        self.closed = True


async def probed() -> tuple[Link, asyncio.Task[float | None], float]:
    """A link measuring its clock with one probe, and the probe's t1 as the other end reads it."""
    ours, theirs = pair()
    ws = StubSocket()
    link = Link(ws, "b", ours, key_fingerprint="k", clock_offset_s=0.0, max_frame_bytes=LIMIT, drops=Counter())  # type: ignore[arg-type]
    measuring = asyncio.create_task(link.measure_clock(1, 60))
    _, probe = theirs.open(await asyncio.wait_for(ws.sent.get(), 30), LIMIT)
    assert probe["kind"] == "clock_probe"
    return link, measuring, probe["t1"]


async def test_an_echo_a_day_off_or_not_finite_is_refused_and_a_true_one_sets_the_offset() -> None:
    link, measuring, t1 = await probed()
    for t2, t3, why in ((1e300, 1e300, "a day off"), (float("inf"), 1.0, "finite"), (5.0, 4.0, "round trip")):
        with pytest.raises(MessageRejected, match=why) as e:
            link.take_echo({"kind": "clock_echo", "t1": t1, "t2": t2, "t3": t3}, time.time())
        assert e.value.reason == "malformed"
    assert not measuring.done() and link.clock_offset_s == 0.0
    link.take_echo({"kind": "clock_echo", "t1": t1 + 1.0, "t2": 1.0, "t3": 1.0}, time.time())  # answers no probe
    ahead = time.time() + 5.0
    link.take_echo({"kind": "clock_echo", "t1": t1, "t2": ahead, "t3": ahead}, time.time())
    offset = await asyncio.wait_for(measuring, 30)
    assert offset == link.clock_offset_s and link.clock_delay_s is not None
    assert abs(offset - 5.0) <= link.clock_delay_s / 2 + 1e-6


async def test_a_link_closing_ends_its_clock_probe_at_once() -> None:
    link, measuring, _ = await probed()
    await link.close()
    with pytest.raises(MessageRejected) as e:
        await asyncio.wait_for(measuring, 30)  # the probe's own timeout is 60 s
    assert e.value.reason == "unreachable"


def test_both_ends_derive_the_same_keys_and_no_other_handshake_does() -> None:
    d_private, d_public = new_ephemeral()
    a_private, a_public = new_ephemeral()
    transcript = d_public + a_public
    dialler = link_keys(d_private, a_public, dialler="d", acceptor="a", transcript=transcript)
    acceptor = link_keys(a_private, d_public, dialler="d", acceptor="a", transcript=transcript)
    assert dialler == acceptor and dialler[0] != dialler[1]
    again_private, again_public = new_ephemeral()
    other = link_keys(again_private, a_public, dialler="d", acceptor="a", transcript=again_public + a_public)
    assert not set(other) & set(dialler)
    with pytest.raises(MessageRejected) as e:
        link_keys(d_private, bytes(32), dialler="d", acceptor="a", transcript=transcript)  # a low-order point
    assert e.value.reason == "malformed"


# ---- two transports ------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A transport with its server: what a node gives the transport, and nothing more."""

    identity: Identity
    keyring: Keyring
    transport: Transport = field(init=False)
    url: str = ""
    frames: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    closed: asyncio.Queue[tuple[str, str | None]] = field(default_factory=asyncio.Queue)  # (peer, why retired)
    runner: web.AppRunner | None = None
    clock_ahead_s: float = 0.0  # this peer's wall clock runs this far ahead of the machine's

    def __post_init__(self) -> None:
        sealer = Sealer(self.identity, self.keyring)
        opener = Opener(self.keyring, max_clock_skew_s=30, replay_window=64, max_message_bytes=LIMIT,
                        peer_id=self.identity.peer_id)  # fmt: skip

        def seal(kind: str, body: dict[str, Any], to: str | None) -> bytes:
            return sealer.seal(kind, body, term=0, incarnation=1, to=to)

        def check(data: bytes) -> Message:
            return opener.open(data)

        self.transport = Transport(self.identity.peer_id, seal=seal, check=check, drops=opener.drops,
                                   flood=FloodLog(logging.getLogger("test")), request_timeout_s=5.0,
                                   heartbeat_s=30.0, max_frame_bytes=LIMIT,
                                   clock=lambda: time.time() + self.clock_ahead_s)  # fmt: skip
        self.transport.handlers["note"] = lambda sender, body, *_: self.frames.put_nowait((sender, body["text"]))
        self.transport.handlers["timed"] = lambda sender, body, wire_s, _: self.frames.put_nowait((sender, wire_s))
        self.transport.on_link_closed.append(lambda peer_id, link: self.closed.put_nowait((peer_id, link.retired)))

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(LINK_PATH, self.transport.accept)
        app.on_shutdown.append(lambda _: self.transport.close_links())
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.transport.close()

    async def next_frame(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.frames.get(), 30)


@pytest.fixture
async def two() -> AsyncIterator[tuple[Peer, Peer]]:
    key = Keyring.of(os.urandom(32))
    a, b = Peer(Identity.generate(), Keyring(key.keys, key.primary)), Peer(Identity.generate(), Keyring(key.keys))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_a_link_carries_frames_both_ways_after_one_handshake(two: tuple[Peer, Peer]) -> None:
    a, b = two
    sent = await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "to b"})
    assert sent is not None and sent.peer_id == b.peer_id and await b.next_frame() == (a.peer_id, "to b")
    # b answers over the link a dialled: it needs no address for a.
    await b.transport.send(a.peer_id, None, {"kind": "note", "text": "to a"})
    assert await a.next_frame() == (b.peer_id, "to a")
    for i in range(20):
        await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": str(i)})
    assert [(await b.next_frame())[1] for _ in range(20)] == [str(i) for i in range(20)]
    assert a.transport.links() == {b.peer_id: 1} and b.transport.links() == {a.peer_id: 1}
    assert sum(a.transport.drops.values()) == 0 and sum(b.transport.drops.values()) == 0


async def test_the_dialler_learns_the_other_clock_from_probes_and_tells_it() -> None:
    """Two clocks 7 s apart: the probes' offset is off by at most half their round trip (the NTP
    bound), the other side takes its opposite, and frames both ways read a wire time well under
    the 7 s an unmeasured offset would add."""
    key = Keyring.of(os.urandom(32))
    a = Peer(Identity.generate(), Keyring(key.keys, key.primary))
    b = Peer(Identity.generate(), Keyring(key.keys), clock_ahead_s=7.0)
    await a.start()
    await b.start()
    try:
        link = await a.transport.connect(b.peer_id, b.url)
        await asyncio.wait_for(link.clock_known.wait(), 30)
        assert link.clock_delay_s is not None and link.clock_delay_s >= 0
        assert abs(link.clock_offset_s - 7.0) <= link.clock_delay_s / 2 + 1e-6
        await a.transport.send(b.peer_id, b.url, {"kind": "timed"})  # after the offset frame, on one link
        sender, wire_s = await b.next_frame()
        back = b.transport.link_to(a.peer_id)
        assert sender == a.peer_id and back is not None and back.clock_offset_s == -link.clock_offset_s
        await b.transport.send(a.peer_id, None, {"kind": "timed"})
        _, wire_back_s = await a.next_frame()
        assert 0 <= wire_s < 7.0 and 0 <= wire_back_s < 7.0
        assert sum(a.transport.drops.values()) == 0 and sum(b.transport.drops.values()) == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_clock_echo_that_answers_no_probe_changes_nothing(two: tuple[Peer, Peer]) -> None:
    a, b = two
    link = await a.transport.connect(b.peer_id, b.url)
    await asyncio.wait_for(link.clock_known.wait(), 30)
    offset, delay = link.clock_offset_s, link.clock_delay_s
    back = b.transport.link_to(a.peer_id)
    assert back is not None
    await back.send({"kind": "clock_echo", "t1": 1.0, "t2": 2.0, "t3": 3.0})
    await b.transport.send(a.peer_id, None, {"kind": "note", "text": "after"})
    assert await a.next_frame() == (b.peer_id, "after")
    assert (link.clock_offset_s, link.clock_delay_s) == (offset, delay) and a.transport.faults == 0


async def test_a_link_answers_probes_one_at_a_time_and_only_so_many(two: tuple[Peer, Peer]) -> None:
    a, b = two
    link = await a.transport.connect(b.peer_id, b.url)
    await asyncio.wait_for(link.clock_known.wait(), 30)  # b answered: it holds the link
    back = b.transport.link_to(a.peer_id)
    assert back is not None
    # Probes sent back to back: one answer is in flight at a time, the rest are dropped.
    for i in range(8):
        await back.send({"kind": "clock_probe", "t1": float(i)})
    await b.transport.send(a.peer_id, None, {"kind": "note", "text": "burst"})
    assert await a.next_frame() == (b.peer_id, "burst")  # frames are taken in order: every probe was seen
    burst_dropped = a.transport.drops["flood"]  # how many depends on how the frames arrived
    assert burst_dropped <= 7
    # An honest prober, each probe after the last answer, is answered up to the link's limit.
    answered = PROBES_ANSWERED - (8 - burst_dropped)
    assert await asyncio.wait_for(back.measure_clock(answered, 30), 60) is not None
    await back.send({"kind": "clock_probe", "t1": 1.0})  # one beyond the limit
    await b.transport.send(a.peer_id, None, {"kind": "note", "text": "after"})
    assert await a.next_frame() == (b.peer_id, "after")
    assert a.transport.drops["flood"] == burst_dropped + 1 and a.transport.faults == 0
    assert len(a.transport.tasks) <= 3  # the link's reader and its clock probe; no answer left behind


async def test_a_frame_to_this_peer_itself_skips_the_wire(two: tuple[Peer, Peer]) -> None:
    a, _ = two
    assert await a.transport.send(a.peer_id, None, {"kind": "note", "text": "self"}) is None
    assert await a.next_frame() == (a.peer_id, "self")
    assert a.transport.links() == {}


async def test_a_peer_without_the_swarm_key_is_refused_at_the_handshake(two: tuple[Peer, Peer]) -> None:
    _, b = two
    stranger = Peer(Identity.generate(), Keyring.of(os.urandom(32)))
    try:
        with pytest.raises(MessageRejected) as e:
            await stranger.transport.send(b.peer_id, b.url, {"kind": "note", "text": "let me in"})
        assert e.value.reason == "unreachable" and "(unknown_key)" in str(e.value)
        assert b.transport.drops["unknown_key"] == 1 and b.frames.empty() and b.transport.links() == {}
    finally:
        await stranger.stop()


async def test_a_copied_replayed_or_missing_handshake_opens_no_usable_link(two: tuple[Peer, Peer]) -> None:
    """The handshake header travels in the clear: whoever copies it gets an upgrade, but the link
    serves nobody until the dialler's first frame opens under the link's key, which needs the
    dialler's ephemeral private key; sent again, it is refused as replayed."""
    import base64

    import aiohttp

    a, b = two
    hello = base64.b64encode(a.transport._seal("link", {"eph": new_ephemeral()[1]}, b.peer_id)).decode()
    answers = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(b.url + LINK_PATH, headers={LINK_HEADER: hello}) as copied:
            assert (await copied.receive(timeout=30)).type is aiohttp.WSMsgType.BINARY  # the acceptor's half
            await copied.send_bytes((1).to_bytes(8, "big") + os.urandom(40))  # a "first frame" without the key
            closing = await copied.receive(timeout=30)
            assert closing.type is aiohttp.WSMsgType.CLOSE and b.transport.link_to(a.peer_id) is None
        for headers in ({LINK_HEADER: hello}, {}, {LINK_HEADER: "not base64!"}):
            try:
                async with session.ws_connect(b.url + LINK_PATH, headers=headers):
                    answers.append((101, "ok"))
            except aiohttp.WSServerHandshakeError as e:
                answers.append((e.status, (e.headers or {}).get(REFUSAL_HEADER)))
    assert answers == [(409, "replayed"), (400, "malformed"), (400, "malformed")]
    assert b.transport.drops["forged"] == 1  # the copy's frame did not open under the link's key
    assert b.transport.drops["replayed"] == 1 and b.transport.drops["malformed"] == 2
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "the real one"})  # a fresh handshake
    assert await b.next_frame() == (a.peer_id, "the real one")


async def test_an_oversized_frame_ends_the_link_and_is_counted(two: tuple[Peer, Peer]) -> None:
    a, b = two
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "fine"})
    await b.next_frame()
    link = a.transport.link_to(b.peer_id)
    assert link is not None
    await link.ws.send_bytes(b"x" * (LIMIT + 1))
    assert (await asyncio.wait_for(b.closed.get(), 30))[0] == a.peer_id
    assert b.transport.drops["oversized"] == 1


async def test_a_closed_link_is_reported_and_the_next_frame_dials_again(two: tuple[Peer, Peer]) -> None:
    a, b = two
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "one"})
    await b.next_frame()
    link = b.transport.link_to(a.peer_id)
    assert link is not None
    await link.close()
    assert await asyncio.wait_for(a.closed.get(), 30) == (b.peer_id, None)  # a fault, as far as a can tell
    assert await asyncio.wait_for(b.closed.get(), 30) == (a.peer_id, None)
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "two"})
    assert await b.next_frame() == (a.peer_id, "two")


async def test_links_made_under_a_retired_key_are_made_again_under_the_new_one(two: tuple[Peer, Peer]) -> None:
    a, b = two
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "old key"})
    await b.next_frame()
    old = a.transport.link_to(b.peer_id)
    assert old is not None
    new_key = os.urandom(32)
    for peer in (a, b):  # both take the new key as primary, and drop the old one
        peer.keyring.replace(Keyring([new_key], new_key))
    a.transport.drop_keys(a.keyring.fingerprints)  # a reloads its keyring first: it closes the link
    await asyncio.wait_for(old.closed.wait(), 30)
    # Both ends know the link was retired on purpose (b from a's close code): steps on it replay at once.
    assert (await asyncio.wait_for(a.closed.get(), 30))[1] == "swarm key retired"
    assert (await asyncio.wait_for(b.closed.get(), 30))[1] == "swarm key retired"
    await a.transport.send(b.peer_id, b.url, {"kind": "note", "text": "new key"})
    assert await b.next_frame() == (a.peer_id, "new key")
    link = a.transport.link_to(b.peer_id)
    assert link is not None and link is not old and link.key_fingerprint == a.keyring.primary_fingerprint
