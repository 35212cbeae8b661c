"""How this peer's messages travel. Control-plane messages are sealed envelopes (`swarm.auth`) sent
as one HTTP POST each, their replies read within a byte limit. The data plane runs over persistent
links (`swarm.link`): one WebSocket per pair of peers, dialled on first use and reused, each
authenticated once by a handshake of two sealed envelopes. Frames are handed to the handler
registered for their `kind`; a frame to this peer itself skips the wire. `STATUS` is the one table
from a refusal's reason to its HTTP status. The transport knows envelopes, links and frame kinds;
what a message means, and whether its sender may send it, it leaves to the node (`check`) and the
handlers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from swarm.auth import Message
from swarm.errors import MessageRejected
from swarm.guard import FloodLog
from swarm.link import (
    CLOCK_PROBES,
    CLOSE_REFUSED,
    CLOSE_REKEY,
    CLOSE_REPLACED,
    LINK_HEADER,
    LINK_PATH,
    MAX_CLOCK_OFFSET_S,
    REFUSAL_HEADER,
    Clock,
    FrameCipher,
    Link,
    WebSocket,
    ephemeral_of,
    link_keys,
    new_ephemeral,
)
from swarm.tasks import TaskGroup

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
# HTTP status (or, on a link, the refusal sent back) for each reason a peer message is refused.
STATUS = {
    "malformed": 400,
    "forged": 401,
    "unknown_key": 401,
    "oversized": 413,
    "not_ready": 503,
    "cache_full": 503,
    "unreachable": 502,
    "stage_failed": 500,
}
LINKS_PER_PEER = 2  # links kept to one peer (both sides may dial at once); an older one beyond is closed
MAX_LINKS = 512  # links open at once, however many peers a hostile network brings

Handler = Callable[[str, dict[str, Any], float, int], None]  # (sender peer id, body, wire_s, bytes)
# Opens a handshake envelope and checks its sender as any peer message is checked (raising
# MessageRejected, counted); the checked message.
Check = Callable[[bytes], Message]
Seal = Callable[[str, dict[str, Any], "str | None"], bytes]  # (kind, body, recipient) -> envelope


def status_of(reason: str) -> int:
    """The HTTP status for a refusal's reason (409, a conflict with this peer's state, by default)."""
    return STATUS.get(reason, 409)


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, refusing more than `limit` bytes (ValueError)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ValueError(f"reply of {resp.content_length} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"reply exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Transport:
    """Posts sealed messages and keeps this peer's links; `close()` ends both (safe twice)."""

    def __init__(
        self,
        peer_id: str,
        *,
        seal: Seal,
        check: Check,
        drops: Counter[str],
        flood: FloodLog,
        request_timeout_s: float,
        heartbeat_s: float,
        max_frame_bytes: int,
        clock: Clock = time.time,
    ) -> None:
        self.peer_id = peer_id
        self.clock = clock  # wall-clock seconds, as frames are stamped
        self._seal = seal
        self._check = check
        self.drops = drops  # shared with the node: every dropped message and frame, by reason
        self.flood = flood
        self.request_timeout_s = request_timeout_s  # a handshake (and a control request) takes at most this
        self.heartbeat_s = heartbeat_s  # a link with no answer to its ping for this long is closed
        self.max_frame_bytes = max_frame_bytes
        self.handlers: dict[str, Handler] = {}  # frame kind -> what takes it in
        self.faults = 0  # frames whose handler failed with something other than a refusal (a bug)
        self.frames_sent: Counter[str] = Counter()  # frames sent over links, by kind (our own kinds only)
        # Called with the peer id and the link when a link to it closes (a stage then tells the entries
        # of the steps it sent that way; an entry fails the steps waiting on that peer).
        self.on_link_closed: list[Callable[[str, Link], None]] = []
        self.tasks = TaskGroup()
        self._links: dict[str, list[Link]] = {}  # peer id -> its open links, oldest first
        self._dialling: dict[str, asyncio.Future[Link]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.closed = False

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client session (made on first use, inside the event loop)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def close_links(self) -> None:
        """Close every link and take no new ones (the server is stopping); control requests still go."""
        self.closed = True
        links = [link for peer_links in self._links.values() for link in peer_links]
        await asyncio.gather(*(link.close(1001, "going away") for link in links))

    async def close(self) -> None:
        """Close every link and the client session; safe to call twice."""
        await self.close_links()
        await self.tasks.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- control-plane requests ---------------------------------------------------------------------

    async def post(self, url: str, data: bytes, limit: int) -> tuple[int, bytes]:
        """POST one envelope; the status and the body (at most `limit` bytes). Raises what aiohttp
        raises for an unreachable peer, asyncio.TimeoutError, or ValueError for an oversized reply."""
        if self.tasks.closed:
            raise aiohttp.ClientConnectionError("this peer is closing")
        async with self.session.post(url, data=data, headers={"Content-Type": MSGPACK}) as resp:
            return resp.status, await read_bounded(resp, limit)

    # ---- links --------------------------------------------------------------------------------------

    def link_to(self, peer_id: str) -> Link | None:
        """The newest open link to `peer_id`, if there is one."""
        links = [link for link in self._links.get(peer_id, ()) if link.open]
        return links[-1] if links else None

    def links(self) -> dict[str, int]:
        """Open links by peer id (for status)."""
        return {p: sum(link.open for link in links) for p, links in self._links.items() if links}

    async def send(self, peer_id: str, url: str | None, body: dict[str, Any]) -> Link | None:
        """Send a frame to `peer_id` over its link, dialling `url` if there is none; the link it went
        on (None to this peer itself: the handler runs at once). MessageRejected("unreachable") when
        no link can be had, the other side's refusal of the link included."""
        if peer_id == self.peer_id:
            self.dispatch(peer_id, body, 0.0, 0)
            return None
        link = self.link_to(peer_id)
        if link is None and url is None:
            raise MessageRejected("unreachable", f"no link to {peer_id}, and no address to dial")
        link = link or await self.connect(peer_id, str(url))
        await link.send(body)
        self.frames_sent[str(body.get("kind"))] += 1
        return link

    async def connect(self, peer_id: str, url: str) -> Link:
        """An open link to `peer_id`: the one there is, or a new one dialled at `url`."""
        return self.link_to(peer_id) or await self._dial_once(peer_id, url)

    async def _dial_once(self, peer_id: str, url: str) -> Link:
        pending = self._dialling.get(peer_id)
        if pending is None:
            spawned = self.tasks.spawn(self._dial(peer_id, url), expected=(MessageRejected,))
            if spawned is None:
                raise MessageRejected("unreachable", "this peer is closing")
            pending = spawned
            self._dialling[peer_id] = pending
            pending.add_done_callback(lambda task: self._dialled(peer_id, task))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():  # the dial, not this caller, was cancelled: this peer is closing
                raise MessageRejected("unreachable", "this peer is closing") from None
            raise

    def _dialled(self, peer_id: str, task: asyncio.Task[Link]) -> None:
        self._dialling.pop(peer_id, None)
        if not task.cancelled():
            task.exception()  # seen here: every caller may have given up on it

    async def _dial(self, peer_id: str, url: str) -> Link:
        if self.closed:
            raise MessageRejected("unreachable", "this peer is closing")
        where = f"peer {peer_id} at {url}"
        private, public = new_ephemeral()
        hello = base64.b64encode(self._seal("link", {"eph": public}, peer_id)).decode()
        t0 = self.clock()
        try:
            ws = await self.session.ws_connect(
                url + LINK_PATH,
                headers={LINK_HEADER: hello},
                heartbeat=self.heartbeat_s,
                max_msg_size=self.max_frame_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.request_timeout_s),
            )
        except aiohttp.WSServerHandshakeError as e:
            raise _refusal(e, where) from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise MessageRejected("unreachable", f"{where}: {e or type(e).__name__}") from e
        try:
            msg = await ws.receive(timeout=self.request_timeout_s)
            t2 = self.clock()
            if msg.type is not WSMsgType.BINARY:
                raise MessageRejected("unreachable", f"{where} closed the link before answering its handshake")
            reply = self._check(msg.data)
            if reply.sender != peer_id or reply.kind != "link_ok" or not isinstance(reply.body, dict):
                raise MessageRejected("misdirected", f"{where}: a {reply.kind} from {reply.sender} answered the link")
            their = ephemeral_of(reply.body.get("eph"))
            send_key, recv_key = link_keys(private, their, dialler=self.peer_id, acceptor=peer_id,
                                           transcript=public + their)  # fmt: skip
            # The other clock minus ours, as NTP estimates it: its stamp against the middle of the round trip.
            offset = reply.timestamp_s - (t0 + t2) / 2
            link = self._link(ws, peer_id, FrameCipher(send_key, recv_key), reply.key_fingerprint, offset)
            # The first frame: the acceptor learns its side of the offset, and that we hold the key.
            await link.send({"kind": "clock", "offset_s": -offset})
            if self.closed:
                raise MessageRejected("unreachable", "this peer is closing")
        except BaseException as e:
            await ws.close()
            if isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
                raise MessageRejected("unreachable", f"{where}: handshake: {e or type(e).__name__}") from e
            if isinstance(e, MessageRejected) and e.reason != "unreachable":  # the hop refused: a new one may not
                raise MessageRejected("unreachable", f"{where}: {e}") from e
            raise
        self._add(link)
        self.tasks.spawn(self._serve(link))
        self.tasks.spawn(self._measure_clock(link), expected=(MessageRejected, asyncio.TimeoutError))
        log.debug("link to %s at %s open (clock offset %.1f ms at the handshake)", peer_id, url, 1000 * offset)
        return link

    async def _measure_clock(self, link: Link) -> None:
        """The dialler's side: probe the clock over the open link (the handshake's estimate carries the
        connect and the other side's work on it: on one machine, more than a hop takes), then tell the
        other side its offset."""
        offset = await link.measure_clock(CLOCK_PROBES, self.request_timeout_s)
        if offset is None:
            log.debug("link to %s: no answer to a clock probe; the handshake's offset stays", link.peer_id)
            return
        await link.send({"kind": "clock", "offset_s": -offset})
        link.clock_known.set()
        log.debug("link to %s: clock offset %.3f ms (round trip %.3f ms)", link.peer_id, 1000 * offset,
                  1000 * (link.clock_delay_s or 0.0))  # fmt: skip

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """The server side of LINK_PATH: the handshake in the upgrade request (a refusal is an HTTP
        error with the reason), then frames until the link closes. The link serves only once the
        dialler's first frame opens under its key: a copied handshake header gets nowhere."""
        try:
            hello = self._hello(request.headers.get(LINK_HEADER))
            private, public = new_ephemeral()
            their = ephemeral_of(hello.body.get("eph"))
            recv_key, send_key = link_keys(private, their, dialler=hello.sender, acceptor=self.peer_id,
                                           transcript=their + public)  # fmt: skip
        except MessageRejected as e:
            self.flood.refused(e.reason, f"a link from {request.remote}: {e}")
            body = {"error": {"type": e.reason, "message": str(e)}}
            return web.json_response(body, status=status_of(e.reason), headers={REFUSAL_HEADER: e.reason})
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, max_msg_size=self.max_frame_bytes)
        await ws.prepare(request)  # not a WebSocket upgrade: a 400, and nothing was taken in
        await ws.send_bytes(self._seal("link_ok", {"eph": public}, hello.sender))
        link = self._link(ws, hello.sender, FrameCipher(send_key, recv_key), hello.key_fingerprint, 0.0)
        try:
            first = await ws.receive(timeout=self.request_timeout_s)
            if first.type is not WSMsgType.BINARY:
                raise MessageRejected("malformed", "the link's first frame must be the dialler's clock")
            clock = link.first_frame(first.data)
            if not isinstance(clock, dict) or clock.get("kind") != "clock":
                raise MessageRejected("malformed", "the link's first frame must be the dialler's clock")
            self._on_frame(link, clock, 0.0, len(first.data))
        except (MessageRejected, asyncio.TimeoutError) as e:
            reason = e.reason if isinstance(e, MessageRejected) else "malformed"
            self.drops[reason] += 1
            self.flood.refused(reason, f"a link from {request.remote} whose first frame did not come or open: {e}")
            await link.close(CLOSE_REFUSED, "no proof of the link key")
            return ws
        if self.closed:
            await link.close(1001, "going away")
            return ws
        self._add(link)
        await self._serve(link)
        return ws

    def _hello(self, header: str | None) -> Message:
        """The dialler's handshake envelope, opened and checked (what is dropped is counted)."""
        if self.closed:
            raise MessageRejected("not_ready", "this peer is closing")
        if not header:
            self.drops["malformed"] += 1
            raise MessageRejected("malformed", f"a link is opened with its handshake in the {LINK_HEADER} header")
        try:
            data = base64.b64decode(header, validate=True)
        except (binascii.Error, ValueError) as e:
            self.drops["malformed"] += 1
            raise MessageRejected("malformed", f"the {LINK_HEADER} header is not base64") from e
        hello = self._check(data)  # counts what it drops
        if hello.kind != "link" or hello.recipient != self.peer_id or not isinstance(hello.body, dict):
            self.drops["misdirected"] += 1
            raise MessageRejected("misdirected", "a link is opened with a link message to this peer")
        return hello

    def _link(self, ws: WebSocket, peer_id: str, cipher: FrameCipher, key: str, offset: float) -> Link:
        return Link(ws, peer_id, cipher, key_fingerprint=key, clock_offset_s=offset,
                    max_frame_bytes=self.max_frame_bytes, drops=self.drops, clock=self.clock)  # fmt: skip

    def _add(self, link: Link) -> None:
        """Take `link` into the table, closing older links to its peer beyond LINKS_PER_PEER."""
        links = [old for old in self._links.get(link.peer_id, []) if old.open]
        for old in links[: max(0, len(links) - LINKS_PER_PEER + 1)]:
            self.tasks.spawn(old.close(CLOSE_REPLACED, "replaced"))
        self._links[link.peer_id] = [*links[-(LINKS_PER_PEER - 1) :], link] if LINKS_PER_PEER > 1 else [link]
        while sum(len(v) for v in self._links.values()) > MAX_LINKS:
            oldest = next(iter(self._links))
            for old in self._links.pop(oldest):
                self.tasks.spawn(old.close(CLOSE_REPLACED, "too many links"))

    async def _serve(self, link: Link) -> None:
        try:
            await link.run(self._on_frame)
        finally:
            links = self._links.get(link.peer_id, [])
            if link in links:
                links.remove(link)
            if not links:
                self._links.pop(link.peer_id, None)
            if not self.closed:  # every link: the steps sent over it may be lost, whatever links remain
                for callback in self.on_link_closed:
                    try:
                        callback(link.peer_id, link)
                    except Exception:
                        log.exception("link-closed callback failed")

    def _on_frame(self, link: Link, body: Any, wire_s: float, size: int) -> None:
        kind = body.get("kind") if isinstance(body, dict) else None
        if kind not in ("clock", "clock_probe", "clock_echo"):
            self.dispatch(link.peer_id, body, wire_s, size)
            return
        received_s = self.clock()
        try:
            if kind == "clock":  # the dialler's estimate of our offset
                offset = body.get("offset_s")
                if not (isinstance(offset, float) and math.isfinite(offset) and abs(offset) < MAX_CLOCK_OFFSET_S):
                    raise MessageRejected("malformed", "a clock offset is a float under a day")
                link.clock_offset_s = offset
            elif kind == "clock_probe":
                t1 = link.take_probe(body)
                self.tasks.spawn(link.echo(t1, received_s), expected=(MessageRejected,))
            else:
                link.take_echo(body, received_s)
        except MessageRejected as e:
            self.drops[e.reason] += 1
            self.flood.refused(e.reason, f"a {kind} frame from {link.peer_id}: {e}")

    def dispatch(self, sender: str, body: Any, wire_s: float, size: int) -> None:
        """Hand one frame to the handler of its kind; a refusal is counted, never raised."""
        try:
            if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
                raise MessageRejected("malformed", "a frame is a map with a kind")
            handler = self.handlers.get(body["kind"])
            if handler is None:
                raise MessageRejected("malformed", f"unknown frame kind {str(body['kind'])[:32]!r}")
            handler(sender, body, wire_s, size)
        except MessageRejected as e:
            self.drops[e.reason] += 1
            self.flood.refused(e.reason, f"a frame from {sender}: {e}")
        except Exception:
            self.faults += 1
            log.exception("a frame from %s could not be taken in", sender)

    def drop_keys(self, held: list[str]) -> None:
        """Close the links made under swarm keys no longer `held` (fingerprints): the keyring rotated
        one out, and what was agreed under it no longer counts. They are dialled again under a key held."""
        for links in list(self._links.values()):
            for link in links:
                if link.key_fingerprint not in held:
                    self.tasks.spawn(link.close(CLOSE_REKEY, "swarm key retired"))


# Reasons a refused link's upgrade may give (anything else in the header is reported as "refused").
HANDSHAKE_REFUSALS = frozenset({*STATUS, "replayed", "stale", "misdirected", "wrong_model", "duplicate_identity"})


def _refusal(error: aiohttp.WSServerHandshakeError, where: str) -> MessageRejected:
    """A link the other side refused, as the data plane sees it: that hop cannot be used now
    ("unreachable", so that the sessions on it move to a pipeline that works), with the reason."""
    reason = error.headers.get(REFUSAL_HEADER, "") if error.headers is not None else ""
    if reason not in HANDSHAKE_REFUSALS:
        reason = "refused"
    return MessageRejected("unreachable", f"{where} refused the link ({reason}): HTTP {error.status}")
