"""A persistent link between two peers: one WebSocket, authenticated once, then cheap frames both
ways. The handshake is two sealed envelopes (`swarm.auth`: signed by each peer's Ed25519 identity
and encrypted under the swarm key) carrying fresh X25519 keys: the dialler's rides in a header of
the upgrade request (`LINK_HEADER`, so that nothing unauthenticated is ever read from the socket as
a message, and a refusal is a plain HTTP error), the acceptor's is the link's first message. Their
shared secret, bound to both peer ids and both ephemeral keys, gives one ChaCha20-Poly1305 key per
direction. After that a data
frame costs one AEAD seal and no signature: its nonce is its counter, which must grow on every
frame, so a frame replayed, reordered or copied from another link is dropped and counted. A link
also learns the other clock's offset, first from the handshake, then from a few probes over the
open link (NTP's on-wire exchange, RFC 5905 section 8: the probe with the shortest round trip
wins), so a receiver can tell how long a frame spent on the wire. It knows bytes and WebSockets;
who may open a link, and what frames mean, is the transport's and the data plane's business."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import WSMsgType, web
from aiohttp.client_ws import ClientWebSocketResponse
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm.errors import MessageRejected

log = logging.getLogger(__name__)

LINK_PATH = "/swarm/link"
LINK_HEADER = "X-Swarm-Link"  # the dialler's handshake envelope, base64
REFUSAL_HEADER = "X-Swarm-Refused"  # on a refused upgrade: the reason, as the dialler may act on it
COUNTER_BYTES = 8  # a frame starts with its counter, big-endian; the AEAD nonce is 4 zero bytes and it
EPHEMERAL_BYTES = 32  # an X25519 public key
KEY_INFO = b"swarm-inference link keys v1"
# WebSocket close codes (4000-4999 are the application's): the dialler did not prove it holds the
# link's key; the link ends because the swarm key it was made under is no longer held; a newer link
# to the same peer replaces it. The last two are deliberate: either side replays at once.
CLOSE_REFUSED = 4001
CLOSE_REKEY = 4002
CLOSE_REPLACED = 4003
RETIRED = {CLOSE_REKEY: "swarm key retired", CLOSE_REPLACED: "replaced by a newer link"}
CLOCK_PROBES = 4  # round trips a dialler times after the handshake to learn the other clock's offset
PROBES_ANSWERED = 4 * CLOCK_PROBES  # probes one link answers at most: the dialler's, and some to spare
MAX_CLOCK_OFFSET_S = 86400.0  # an offset beyond a day is an error, not a clock
Clock = Callable[[], float]  # wall-clock seconds (time.time)
WebSocket = web.WebSocketResponse | ClientWebSocketResponse


def new_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair for one handshake: the private key and the raw public key."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def ephemeral_of(raw: Any) -> bytes:
    """A handshake's X25519 public key, checked."""
    if not isinstance(raw, bytes) or len(raw) != EPHEMERAL_BYTES:
        raise MessageRejected("malformed", f"a link key is {EPHEMERAL_BYTES} bytes")
    return raw


def link_keys(
    private: X25519PrivateKey, their_public: bytes, *, dialler: str, acceptor: str, transcript: bytes
) -> tuple[bytes, bytes]:
    """The (dialler-to-acceptor, acceptor-to-dialler) frame keys of a link. `transcript` is the
    dialler's ephemeral public key followed by the acceptor's, so each link's keys are its own.
    MessageRejected("malformed") for a public key that is not one (the all-zero shared secret)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError as e:  # a low-order point: no secret at all
        raise MessageRejected("malformed", f"link key: {e}") from e
    info = KEY_INFO + b"\0" + dialler.encode() + b"\0" + acceptor.encode() + b"\0" + transcript
    both = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(shared)
    return both[:32], both[32:]


class FrameCipher:
    """Seals the frames one way and opens those of the other way on one link."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._sent = 0  # the last counter sealed
        self._received = 0  # the highest counter opened

    def seal(self, body: Any) -> bytes:
        """The wire bytes of one frame: its counter, then the sealed msgpack of `body`."""
        self._sent += 1
        counter = self._sent.to_bytes(COUNTER_BYTES, "big")
        return counter + self._send.encrypt(bytes(12 - COUNTER_BYTES) + counter, msgpack.packb(body), counter)

    def open(self, data: bytes, max_bytes: int) -> Any:
        """The body of a frame from the other side; MessageRejected (forged, replayed, oversized,
        malformed) otherwise, and then nothing changes."""
        if len(data) > max_bytes:
            raise MessageRejected("oversized", f"a frame of {len(data)} bytes > {max_bytes}")
        if len(data) < COUNTER_BYTES + 16:
            raise MessageRejected("malformed", "a frame is a counter and a sealed body")
        counter = data[:COUNTER_BYTES]
        number = int.from_bytes(counter, "big")
        if number <= self._received:
            raise MessageRejected("replayed", f"frame {number} after frame {self._received}")
        try:
            plain = self._recv.decrypt(bytes(12 - COUNTER_BYTES) + counter, data[COUNTER_BYTES:], counter)
        except InvalidTag as e:
            raise MessageRejected("forged", "a frame that does not open under its link's key") from e
        self._received = number
        try:
            return msgpack.unpackb(plain, raw=False, max_bin_len=max_bytes)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise MessageRejected("malformed", f"a frame that is not msgpack: {e}") from e


OnFrame = Callable[["Link", Any, float, int], Awaitable[None] | None]


class Link:
    """One authenticated WebSocket to `peer_id`, either side may send on. `run()` reads frames until
    the socket closes, handing each opened body to `on_frame(link, body, wire_s, size)`; frames that
    fail to open are counted in `drops` and skipped. `closed` is set when it ends, however."""

    def __init__(
        self,
        ws: WebSocket,
        peer_id: str,
        cipher: FrameCipher,
        *,
        key_fingerprint: str,
        clock_offset_s: float,
        max_frame_bytes: int,
        drops: Counter[str],
        clock: Clock = time.time,
    ) -> None:
        self.ws = ws
        self.peer_id = peer_id
        self.key_fingerprint = key_fingerprint  # the swarm key the handshake was sealed under
        self.clock_offset_s = clock_offset_s  # the other clock minus ours, in seconds
        # The round trip, less the other side's time holding it, of the probe the offset came from
        # (None: the handshake's estimate); the offset is off by at most half of it.
        self.clock_delay_s: float | None = None
        self.clock_known = asyncio.Event()  # the dialler's side: set once the probes' offset is agreed
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.drops = drops
        self.closed = asyncio.Event()
        # Why this peer closed it on purpose (a retired swarm key, a newer link), if it did: the steps
        # sent over it were not lost to a fault, and may go again at once.
        self.retired: str | None = None
        self._cipher = cipher
        self._send_lock = asyncio.Lock()  # counters reach the wire in the order they were sealed
        self._probe: tuple[float, asyncio.Future[tuple[float, float, float]]] | None = None  # t1, its answer
        self._echoing = False  # an answer to the other side's probe is on its way
        self._probes_answered = 0

    @property
    def open(self) -> bool:
        """Whether frames can still be sent on it."""
        return not self.closed.is_set() and not self.ws.closed

    async def send(self, body: Any) -> int:
        """Seal and send one frame, stamped with the send time in the other side's clock; the bytes
        sent. MessageRejected("unreachable") once the link is closed."""
        async with self._send_lock:
            return await self._send_now(body)

    async def _send_now(self, body: Any) -> int:
        """`send`, the send lock held by the caller."""
        if not self.open:
            raise MessageRejected("unreachable", f"the link to {self.peer_id} is closed")
        data = self._cipher.seal([self.clock() + self.clock_offset_s, body])
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as e:  # the reader sees the socket end and closes the link
            raise MessageRejected("unreachable", f"the link to {self.peer_id}: {e}") from e
        return len(data)

    async def run(self, on_frame: OnFrame) -> None:
        """Read frames until the link closes."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    if msg.type is WSMsgType.CLOSE and self.retired is None and msg.data in RETIRED:
                        self.retired = RETIRED[msg.data]  # the other side closed it on purpose
                    break
                if msg.type is WSMsgType.ERROR:  # a frame over the size limit, or a broken one: the link ends
                    self.drops["oversized" if "size" in str(msg.data).lower() else "malformed"] += 1
                    break
                if msg.type is not WSMsgType.BINARY:
                    self.drops["malformed"] += 1
                    continue
                try:
                    sent, body = self._unwrap(self._cipher.open(msg.data, self.max_frame_bytes))
                except MessageRejected as e:
                    self.drops[e.reason] += 1
                    log.debug("frame from %s dropped: %s", self.peer_id, e)
                    continue
                done = on_frame(self, body, max(0.0, self.clock() - sent), len(msg.data))
                if done is not None:
                    await done
        except (ConnectionError, asyncio.TimeoutError) as e:
            log.debug("link to %s broke: %s", self.peer_id, e)
        finally:
            await self.close()

    async def measure_clock(self, probes: int, timeout_s: float) -> float | None:
        """Time up to `probes` round trips and keep the offset of the shortest, as NTP does (RFC 5905,
        section 8): t1 sent and t4 back in our clock, t2 received and t3 answered in theirs; offset =
        ((t2 - t1) + (t3 - t4)) / 2, delay = (t4 - t1) - (t3 - t2). t1 and t3 are read as the probe
        and its answer go out, behind any frame queued before them; t4 as the answer is taken in.
        Sets clock_offset_s and clock_delay_s and returns the offset (seconds); None, changing
        nothing, if no answer came within `timeout_s` (a peer that does not answer probes).
        MessageRejected("unreachable") if the link closes."""
        best: tuple[float, float] | None = None  # delay, offset
        for _ in range(probes):
            answer: asyncio.Future[tuple[float, float, float]] = asyncio.get_running_loop().create_future()
            try:
                async with self._send_lock:
                    t1 = self.clock()
                    self._probe = (t1, answer)
                    await self._send_now({"kind": "clock_probe", "t1": t1})
                t2, t3, t4 = await asyncio.wait_for(answer, timeout_s)
            except asyncio.TimeoutError:
                break  # keep what the probes before it gave
            finally:
                self._probe = None
            delay, offset = (t4 - t1) - (t3 - t2), ((t2 - t1) + (t3 - t4)) / 2
            if best is None or delay < best[0]:
                best = (delay, offset)
        if best is None:
            return None
        self.clock_delay_s, self.clock_offset_s = max(0.0, best[0]), best[1]
        return self.clock_offset_s

    def take_probe(self, body: dict[str, Any]) -> float:
        """The other side's clock probe: its t1, to answer with `echo`. One answer at a time, and
        at most PROBES_ANSWERED on a link: a peer that floods probes gets MessageRejected("flood")
        and no answer; one without a finite t1, "malformed"."""
        t1 = body.get("t1")
        if not (isinstance(t1, float) and math.isfinite(t1)):
            raise MessageRejected("malformed", "a clock probe carries its sending time t1")
        if self._echoing or self._probes_answered >= PROBES_ANSWERED:
            raise MessageRejected("flood", f"a clock probe beyond {PROBES_ANSWERED}, or before the last was answered")
        self._echoing, self._probes_answered = True, self._probes_answered + 1
        return t1

    async def echo(self, t1: float, received_s: float) -> None:
        """Answer a probe taken with `take_probe`: t2 its arrival, t3 read as the answer goes out."""
        try:
            async with self._send_lock:
                body = {"kind": "clock_echo", "t1": t1, "t2": received_s, "t3": self.clock()}
                self._echoing = False  # the next probe may be answered behind this one, not dropped
                await self._send_now(body)
        finally:
            self._echoing = False

    def take_echo(self, body: dict[str, Any], received_s: float) -> None:
        """The other side's answer to our probe, received at `received_s`: taken if it answers the
        probe in flight (same t1), held no longer than the round trip and gives an offset under
        MAX_CLOCK_OFFSET_S; an answer to no probe (a late one) is ignored, and an impossible one is
        MessageRejected("malformed")."""
        if self._probe is None or self._probe[1].done() or body.get("t1") != self._probe[0]:
            return
        t1, answer = self._probe
        t2, t3 = body.get("t2"), body.get("t3")
        if not (isinstance(t2, float) and isinstance(t3, float) and math.isfinite(t2) and math.isfinite(t3)):
            raise MessageRejected("malformed", "a clock echo carries finite t2 and t3")
        offset = ((t2 - t1) + (t3 - received_s)) / 2
        if not (t3 >= t2 and received_s - t1 >= t3 - t2 and abs(offset) < MAX_CLOCK_OFFSET_S):
            raise MessageRejected("malformed", "a clock echo held longer than its round trip, or a day off")
        answer.set_result((t2, t3, received_s))

    def first_frame(self, data: bytes) -> Any:
        """Open the other side's first frame (before `run`): proof that it holds the link's key."""
        return self._unwrap(self._cipher.open(data, self.max_frame_bytes))[1]

    async def close(self, code: int = 1000, why: str = "") -> None:
        """Close the socket (on purpose: `retired` says why); safe to call twice: only the first call's
        code goes out (the reader, woken by it, must not send a plain close ahead of it)."""
        if self.closed.is_set():
            return
        if why:
            self.retired = why
        self.closed.set()
        if self._probe is not None and not self._probe[1].done():  # a probe waiting for its answer
            self._probe[1].set_exception(MessageRejected("unreachable", f"the link to {self.peer_id} closed"))
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
                await self.ws.close(code=code, message=why.encode()[:120])

    @staticmethod
    def _unwrap(frame: Any) -> tuple[float, Any]:
        if not (isinstance(frame, list) and len(frame) == 2 and isinstance(frame[0], float)):
            raise MessageRejected("malformed", "a frame is [sent_s, body]")
        if not math.isfinite(frame[0]):
            raise MessageRejected("malformed", "a frame's sending time is not finite")
        return frame[0], frame[1]
