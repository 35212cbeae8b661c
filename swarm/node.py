"""One peer of the swarm's control plane. The node owns this peer's membership view, election
state, layer map and the stage host, and wires them to the network: it answers authenticated
peer messages (hello, gossip, election, coordinator, layer map), runs the gossip and election
timers, introduces itself to seeds and mDNS finds, and, when it leads, partitions the layers and
broadcasts the map. The decisions themselves live in membership, election and partitioner; here
are the side effects: sockets, timers, persistence, loading and one log line per swarm event."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from peer.errors import SwarmError
from peer.profile import ModelProfile
from peer.resources import MIB, Resources
from peer.tokenizer import Tokenizer
from swarm.auth import PROTOCOL_VERSION, Keyring, Message, Opener, Sealer, load_keyring
from swarm.config import SwarmConfig
from swarm.discovery import Announcement
from swarm.election import Announce, Elect, Election, Rank
from swarm.entry import Entry
from swarm.errors import Answered, LayerMapError, MessageRejected, SwarmTooSmall
from swarm.guard import FloodLog, file_stamp
from swarm.identity import Identity, PersistentState, StateFile
from swarm.layer_map import LayerMap, Stage, next_map, should_follow
from swarm.membership import Claim, Event, MemberInfo, Membership, State, judge_claim, parse_digest
from swarm.netif import interfaces
from swarm.partitioner import Candidate, Share, partition
from swarm.stage_host import StageHost
from swarm.stage_service import StageService
from swarm.tasks import TaskGroup, wait_event
from swarm.transport import Transport
from swarm.view import Signal

log = logging.getLogger("swarm")

MSG_PATH = "/swarm/msg"
# The election loop sleeps until its next deadline (at most this long; woken at once when a message
# changes the election): no timer fires while nothing is due, so an idle peer does not interrupt
# the peers that compute on the same cores.
ELECTION_IDLE_S = 1.0
MAX_INTRODUCTIONS = 256  # addresses waiting for a hello (seeds, mDNS finds, hearsay)
HELLO_BACKOFF_MAX_S = 30.0
MAX_HELLO_FAILURES = 8  # an address (not a seed) that fails this many hellos in a row is forgotten
MAX_IMPOSTORS = 64  # (peer id, instance) pairs refused as copies of a live peer, remembered at most
# Incarnations a refusal as replayed may move this peer past, per process: enough to step over every
# window a receiver keeps (auth.INCARNATIONS_KEPT), while a stranger's forged refusals stop there.
MAX_BEHIND = 8
LOAD_RETRY_MAX_S = 60.0  # a failed load is retried with doubling waits up to this


@dataclass(frozen=True)
class Checked:
    """A message that passed authentication and the common checks, not yet taken in."""

    msg: Message
    info: MemberInfo  # the sender's own account of itself
    leader_rank: Rank | None  # the leader the sender follows, if it knows one
    remote: str | None = None  # the address the message came from, as this peer's socket saw it


@dataclass(frozen=True)
class ModelIdentity:
    """The model this peer serves and what the partitioner needs to know of it."""

    spec: str
    fingerprint: str
    profile: ModelProfile


class Node:
    """The control plane of one peer; `start()` after its HTTP server is bound, `close()` to leave."""

    def __init__(
        self,
        config: SwarmConfig,
        *,
        identity: Identity,
        state_file: StateFile | None,
        keyring: Keyring,
        model: ModelIdentity,
        resources: Resources,
        host: StageHost | None,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.peer_id = identity.peer_id
        self.node_id = config.node.node_id or identity.peer_id[:8]
        self.state_file = state_file
        self.model = model
        self.resources = resources
        self.host = host
        self.tokenizer = tokenizer
        self.clock = clock
        self.rng = rng or random.Random()
        self.keyring = keyring  # shared by the sealer and the opener; reloaded from its file in place
        sec = config.security
        self._keyring_file = Path(sec.swarm_key_file).expanduser() if sec.swarm_key_file else None
        self._keyring_stamp: bytes | None = None  # unknown: the first check compares the file's keys
        self.sealer = Sealer(identity, keyring, sec.cluster)
        self.opener = Opener(
            keyring,
            sec.cluster,
            max_clock_skew_s=sec.max_clock_skew_s,
            replay_window=sec.replay_window,
            max_message_bytes=sec.max_message_bytes,
            peer_id=identity.peer_id,
        )
        self.drops = self.opener.drops  # every dropped message, by reason
        self.flood = FloodLog(log)  # refused traffic: the first of each kind logged, the rest counted
        # Called with the new primary key's fingerprint after a reload changed it (re-announce over mDNS).
        self.on_new_primary: Callable[[str], Coroutine[Any, Any, None]] | None = None
        # Called to browse mDNS again while members are dead (their records may have expired).
        self.on_browse: Callable[[], Coroutine[Any, Any, None]] | None = None
        # A data-plane envelope: the activations plus room for the envelope and the sender's info.
        self.data_limit = config.serving.max_activation_bytes + 64 * 1024
        # Bytes of request bodies being read and not yet authenticated, at most inbound_limit at once.
        self.inbound_bytes = 0
        self.inbound_limit = 2 * self.data_limit
        persisted = state_file.load() if state_file else PersistentState()
        # Every start is a new incarnation, written before anyone hears of it.
        self.persisted = PersistentState(term=persisted.term, incarnation=persisted.incarnation + 1)
        if state_file is not None:
            state_file.save(self.persisted)
        self.rank: Rank = (config.node.priority, self.peer_id)
        self.election = Election(self.rank, config.election, self.rng, term=self.persisted.term, now=clock())
        self.url = ""
        self._learn_url = False
        self._own_addresses: set[str] = set()  # this machine's non-loopback addresses
        self.membership: Membership | None = None
        self.layer_map: LayerMap | None = None
        self.max_epoch = 0  # highest layer-map epoch heard of anywhere
        self.partition_error: str | None = None
        self.load_error: str | None = None
        self._ready_epoch: int | None = None
        self._leader_seen: tuple[int, str | None] = (self.election.term, None)
        self._introductions: dict[str, float] = {}  # url -> earliest next hello (monotonic s)
        self._hello_failures: dict[str, int] = {}
        self._load_retry: tuple[float, float] | None = None  # (when, wait) for a failed load
        self._retry_dead: dict[str, tuple[float, float]] = {}  # dead peer id -> (next retry, wait)
        self._browse: tuple[float, float] | None = None  # (next mDNS browse, wait) while any is dead
        self._refused_models: set[str] = set()
        self._told_dtype: set[str] = set()  # peers computing in another dtype, logged once each
        self._told_protocol: set[str] = set()  # peers found speaking another protocol, logged once each
        self._impostors: dict[tuple[str, str], str] = {}  # (peer id, instance) of a copy -> the holder's url
        self._verifying: set[str] = set()  # peer ids whose holder is being asked whether it is still there
        self._behind_at = -math.inf  # when a refusal last moved this peer's incarnation on
        self._behind_count = 0  # and how often it did (plain JSON: anyone can send one; bounded)
        # Set when this peer must stop: another process holds its identity (`fatal` says so).
        self.failed = asyncio.Event()
        self.fatal: str | None = None
        self.tasks = TaskGroup()  # every background task; cancelled by close()
        # Notified when the layer map, a stage's readiness or the membership may have changed.
        self.changes = Signal()
        self._loops: list[asyncio.Task[None]] = []
        self._loading: asyncio.Task[None] | None = None
        self._checks: dict[str, asyncio.Task[bool]] = {}  # peer id -> its probe in flight
        self._last_round: float | None = None  # when the gossip loop last ran
        self._election_wake = asyncio.Event()  # set when the election's state (and deadline) changed
        self._closed = False
        self._stopping = False
        self.transport = Transport(
            self.peer_id,
            seal=lambda kind, body, to: self._seal(kind, body, to=to),
            check=self._check_link,
            drops=self.drops,
            flood=self.flood,
            request_timeout_s=config.gossip.request_timeout_s,
            heartbeat_s=config.serving.link_heartbeat_s,
            max_frame_bytes=self.data_limit,
        )
        self.service = StageService(
            self.peer_id,
            config,
            stage=lambda: host.stage if host is not None else None,
            grammars=lambda: host.grammars if host is not None else None,
            view=self,
            transport=self.transport,
            tasks=self.tasks,
            on_unreachable=lambda peer_id, why: self._spawn(self.check_peer(peer_id, why)),
        )
        self.entry = Entry(
            self.peer_id,
            config,
            view=self,
            transport=self.transport,
            tasks=self.tasks,
            tokenizer=tokenizer,
            context_tokens=model.profile.max_position_embeddings,
            vocab_size=model.profile.vocab_size,
        )

    # ---- lifetime -------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Set when the peer begins to shut down: its generations end at once."""
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        self.changes.notify()
        if value:
            self.entry.stop()

    async def start(self, url: str, *, learn_url: bool = False) -> None:
        """Begin gossiping and electing as the peer reachable at `url`. With `learn_url` (a peer
        listening on every interface that was not told its address) the first address a peer reports
        reaching this one at replaces `url`'s host, if it is another address of this machine."""
        self.url = url
        self._learn_url = learn_url
        self._own_addresses = {i.address for i in interfaces() if not i.loopback}
        usable = self.resources.usable_bytes
        me = MemberInfo(
            peer_id=self.peer_id,
            node_id=self.node_id,
            url=url,
            incarnation=self.persisted.incarnation,
            heartbeat=0,
            priority=self.config.node.priority,
            usable_bytes=usable,
            device=self.resources.device,
            fingerprint=self.model.fingerprint,
            epoch=0,
            start=0,
            end=0,
            ready=True,
            instance=secrets.token_hex(8),
            dtype=str(self.model.profile.dtype).removeprefix("torch."),
        )
        self.membership = Membership(me, self.config.gossip)
        now = self.clock()
        for seed in self.config.discovery.join:
            self._introductions[f"http://{seed}"] = now
        self.election.begin(now)
        self._loops = [asyncio.create_task(self._gossip_loop()), asyncio.create_task(self._election_loop())]
        log.info(
            "peer %s (%s) up at %s: incarnation %d, term %d, priority %d, %d MiB usable on %s, model %s",
            self.peer_id, self.node_id, url, me.incarnation, self.election.term, me.priority,
            usable // MIB, self.resources.device, self.model.spec,
        )  # fmt: skip

    async def close(self) -> None:
        """Stop timers, in-flight requests and the client session; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._loops] + ([self._loading] if self._loading else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.tasks.close()
        self.service.stop()
        await self.transport.close()
        self._persist()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.spawn(coro)

    def _persist(self) -> None:
        incarnation = self.membership.me.incarnation if self.membership else self.persisted.incarnation
        state = PersistentState(term=self.election.term, incarnation=incarnation)
        if state != self.persisted and self.state_file is not None:
            self.state_file.save(state)
        self.persisted = state

    # ---- discovery --------------------------------------------------------------------------------

    def on_discovered(self, found: Announcement) -> None:
        """An mDNS find: introduce ourselves at each of its addresses unless it belongs to another
        swarm or is a live member already (a dead one is met again: the link may be back)."""
        if found.protocol != PROTOCOL_VERSION:
            if found.peer_id not in self._told_protocol and len(self._told_protocol) < MAX_INTRODUCTIONS:
                self._told_protocol.add(found.peer_id)
                log.warning("mDNS: peer %s at %s speaks protocol %d, this peer %d: not contacted; run the same "
                            "swarm-inference version on every peer", found.peer_id, ", ".join(found.urls),
                            found.protocol, PROTOCOL_VERSION)  # fmt: skip
            return
        if found.key_fingerprint not in self.keyring.fingerprints:
            log.debug("mDNS: %s at %s has another swarm key; ignored", found.peer_id, found.urls)
            return
        state = self.membership.state_of(found.peer_id) if self.membership else None
        if state is None or state is State.DEAD:
            for url in found.urls:
                if not self._mine_at(url):
                    self._introduce(url)

    def observed(self, address: Any) -> None:
        """A peer answered our hello saying it came from `address`. A peer that had to guess its
        own address (several interfaces and no advice) takes the first such address that is one of
        its own, once; a guess that a peer confirms is kept."""
        if not self._learn_url or self.membership is None or not isinstance(address, str):
            return
        parts = urlsplit(self.url)
        if address not in self._own_addresses:
            return  # loopback, or a NAT between us: says nothing of where the others reach this peer
        self._learn_url = False
        if address == parts.hostname:
            return
        self.url = f"http://{address}:{parts.port}"
        self.membership.update_me(url=self.url)
        log.info("advertising %s: the address another peer reached this one at", self.url)

    def _introduce(self, url: str) -> None:
        if url != self.url and url not in self._introductions and len(self._introductions) < MAX_INTRODUCTIONS:
            self._introductions[url] = self.clock()

    def _seeds(self) -> set[str]:
        return {f"http://{seed}" for seed in self.config.discovery.join}

    # ---- incoming messages --------------------------------------------------------------------------

    def handle(self, data: bytes, remote: str | None = None) -> bytes:
        """Answer one sealed peer message that came from address `remote`; raises MessageRejected
        (counted) for anything unacceptable.

        Everything in a message is validated before any of it changes this peer's state."""
        msg = self.opener.open(data)  # counts its own drops
        try:
            checked = dataclasses.replace(self._check(msg), remote=remote)
            self._check_identity(checked)
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise MessageRejected("malformed", f"unknown message kind {msg.kind!r}")
            kind, body = handler(self, checked)
        except Answered as e:
            self.drops[e.reason] += 1
            return self._seal(e.kind, e.body, to=msg.sender)
        except MessageRejected as e:
            self.drops[e.reason] += 1
            raise
        # Where the message came from: a peer on several interfaces learns which address others reach.
        return self._seal(kind, {**body, "observed": remote}, to=msg.sender)

    def _check_link(self, data: bytes) -> Message:
        """Open and check a link handshake (counting what is dropped); its sender's news is not taken in."""
        msg = self.opener.open(data)  # counts its own drops
        try:
            if msg.kind not in ("link", "link_ok"):
                raise MessageRejected("malformed", f"a {msg.kind!r} message cannot open a link")
            self._check_identity(self._check(msg))
            return msg
        except Answered as e:
            self.drops[e.reason] += 1
            raise MessageRejected(e.reason, str(e)) from e
        except MessageRejected as e:
            self.drops[e.reason] += 1
            raise

    def _check(self, msg: Message) -> Checked:
        """Validate what every message and reply carries: the sender's own info and its leader."""
        if self.membership is None:
            raise MessageRejected("not_ready", "this peer has not started")
        if msg.recipient is None and msg.kind != "hello":
            raise MessageRejected("misdirected", f"a {msg.kind} message must name its recipient")
        body = msg.body
        if not isinstance(body, dict):
            raise MessageRejected("malformed", "body must be a map")
        info = MemberInfo.from_dict(body.get("info"))
        if info.peer_id != msg.sender:
            raise MessageRejected("forged", f"{msg.sender} sent info naming {info.peer_id}")
        dtype = self.membership.me.dtype
        if info.dtype != dtype and info.peer_id not in self._told_dtype and len(self._told_dtype) < MAX_INTRODUCTIONS:
            self._told_dtype.add(info.peer_id)
            log.info("peer %s (%s) computes in %s, this peer in %s: hidden states between them are cast at the "
                     "stage boundary", info.peer_id, info.node_id, info.dtype, dtype)  # fmt: skip
        if info.fingerprint != self.model.fingerprint:
            if info.peer_id not in self._refused_models and len(self._refused_models) < MAX_INTRODUCTIONS:
                self._refused_models.add(info.peer_id)
                log.warning(
                    "refusing peer %s (%s) at %s: it serves model fingerprint %s..., this swarm serves %s (%s...); "
                    "the model files and --quantize must be the same on every peer",
                    info.peer_id, info.node_id, info.url, info.fingerprint[:12], self.model.spec,
                    self.model.fingerprint[:12],
                )  # fmt: skip
            raise MessageRejected("wrong_model", f"peer {info.peer_id} serves another model")
        leader, leader_priority = body.get("leader"), body.get("leader_priority")
        if not (leader is None or isinstance(leader, str)) or not (
            leader_priority is None or (isinstance(leader_priority, int) and not isinstance(leader_priority, bool))
        ):
            raise MessageRejected("malformed", "leader must be a peer id and leader_priority an integer")
        leader_rank = (leader_priority, leader) if leader is not None and leader_priority is not None else None
        return Checked(msg, info, leader_rank)

    def _check_identity(self, checked: Checked) -> None:
        """Refuse a process that claims a live member's peer id from another address (its identity
        key was copied), and tell a sender known here by a higher incarnation (an older copy of its
        state) to move past it. A claimant is refused for now while the member's address is asked
        whether it is still there; a restart, whose old process is gone, is then let in."""
        assert self.membership is not None
        info = checked.info
        holder = self._impostors.get((info.peer_id, info.instance))
        if holder is not None:
            raise Answered("duplicate_identity", self._duplicate(info.peer_id, holder), "duplicate", {"holder": holder})
        member = self.membership.members.get(info.peer_id)
        claim = judge_claim(info, member)
        if claim is Claim.STALE:
            assert member is not None
            known = member.info.incarnation
            raise Answered("stale", f"incarnation {info.incarnation} <= {known}", "stale", {"incarnation": known})
        if claim is Claim.VERIFY:
            assert member is not None
            if info.peer_id not in self._verifying:
                self._verifying.add(info.peer_id)
                self._spawn(self._verify_holder(member.info, info))
            raise MessageRejected("not_ready", f"peer id {info.peer_id} is also at {member.info.url}; asking whether "
                                  "it still is")  # fmt: skip

    async def _verify_holder(self, holder: MemberInfo, claimant: MemberInfo) -> None:
        """Ask the address of a live member whether it is still there (the same process): if it is,
        `claimant` is a copy, refused from now on; if nobody answers, the member is declared dead,
        and the claimant (a restart elsewhere) gets in with its next message."""
        try:
            reply = await self._exchange(holder.url, "gossip", {"digest": self._digest()}, to=holder.peer_id)
            assert self.membership is not None
            if isinstance(reply, Checked) and reply.info.instance == holder.instance:
                self._accept(reply)
                if len(self._impostors) < MAX_IMPOSTORS:
                    self._impostors[(claimant.peer_id, claimant.instance)] = holder.url
                log.warning("%s; refusing the copy at %s", self._duplicate(holder.peer_id, holder.url), claimant.url)
                return
            # Dead only on firm evidence, as for any probe: nobody listens there (the old process is
            # gone), or no answer while its heartbeat has been quiet too. A holder that is merely
            # slow keeps its place, and the claimant is asked to come back and is checked again.
            quiet = self.membership.quiet_for(holder.peer_id, self.clock())
            if reply == "refused" or quiet > self.config.gossip.suspect_after_s:
                cause = f"its peer id was claimed from {claimant.url} and nobody answered for it at {holder.url}"
                self._on_events(self.membership.declare_dead(holder.peer_id, self.clock(), cause))
        finally:
            self._verifying.discard(claimant.peer_id)

    @staticmethod
    def _duplicate(peer_id: str, holder: str) -> str:
        return f"peer id {peer_id} is alive at {holder}; was its identity key copied?"

    def _behind(self, url: str) -> None:
        """A fresh message of ours was refused as replayed or stale: the peer at `url` saw this
        incarnation already, from an earlier process with an older copy of our state. Move past it
        (at most once a gossip interval and MAX_BEHIND times: the refusal is plain JSON)."""
        assert self.membership is not None
        now = self.clock()
        if now - self._behind_at < self.config.gossip.interval_s or self._behind_count >= MAX_BEHIND:
            return
        self._behind_at, self._behind_count = now, self._behind_count + 1
        incarnation = self.membership.me.incarnation + 1
        self.membership.update_me(incarnation=incarnation)
        self._persist()
        log.warning("the peer at %s has seen this peer's incarnation before (an older copy of its state?); "
                    "moving on to incarnation %d", url, incarnation)  # fmt: skip

    def _answered(self, reply: Checked) -> None:
        """Act on a sealed refusal: move past the incarnation the swarm knows, or stop (a copy)."""
        assert self.membership is not None
        body = reply.msg.body
        if reply.msg.kind == "stale" and type(body.get("incarnation")) is int:
            known = body["incarnation"]
            if self.membership.me.incarnation <= known < 2**62:
                self.membership.update_me(incarnation=known + 1)
                self._persist()
                log.warning("peer %s knows this peer by incarnation %d (an older copy of its state?); "
                            "rejoining as incarnation %d", self._name(reply.msg.sender), known, known + 1)  # fmt: skip
        elif reply.msg.kind == "duplicate" and self.fatal is None:
            holder = str(body.get("holder"))[:200]
            self.fatal = f"{self._duplicate(self.peer_id, holder)} (refused by peer {reply.msg.sender})"
            log.error("%s; stopping", self.fatal)
            self.failed.set()

    def _accept(self, checked: Checked) -> None:
        """Take in a checked message's news: its sender's info, and its term and leader."""
        assert self.membership is not None
        now = self.clock()
        self.max_epoch = max(self.max_epoch, checked.info.epoch)
        info = checked.info
        if self._mine(info) and checked.remote:
            # It guessed an address that is also one of ours (it has not learnt its own yet): this
            # peer reaches it where its message came from.
            info = dataclasses.replace(info, url=f"http://{checked.remote}:{urlsplit(info.url).port}")
        self._on_events(self.membership.admit(info, now))
        rank = checked.leader_rank
        self._act(self.election.observe(checked.msg.term, rank[1] if rank else None, rank, now, self._higher()))

    def _on_hello(self, checked: Checked) -> tuple[str, dict[str, Any]]:
        self._accept(checked)
        return "welcome", {"map": self.layer_map.to_dict() if self.layer_map else None}

    def _on_gossip(self, checked: Checked) -> tuple[str, dict[str, Any]]:
        entries = parse_digest(checked.msg.body.get("digest"), self.config.gossip.max_members)
        self._accept(checked)
        self._merge(entries)
        return "gossip", {"digest": self._digest()}

    def _on_election(self, checked: Checked) -> tuple[str, dict[str, Any]]:
        sender = (checked.info.priority, checked.info.peer_id)
        if sender >= self.rank:
            raise MessageRejected("refused", "ELECTION goes only to higher-ranked peers")
        self._accept(checked)
        self._act(self.election.on_election(sender, checked.msg.term, self.clock(), self._higher()))
        return "ok", {}

    def _on_coordinator(self, checked: Checked) -> tuple[str, dict[str, Any]]:
        msg, sender = checked.msg, (checked.info.priority, checked.info.peer_id)
        self._accept(checked)
        accepted, actions = self.election.on_coordinator(sender, msg.term, self.clock(), self._higher())
        self._act(actions)
        if not accepted:
            self.drops["stale_coordinator"] += 1
            log.info(
                "refused COORDINATOR of term %d from %s: this peer is at term %d with leader %s",
                msg.term, self._name(msg.sender), self.election.term, self._name(self.election.leader),
            )  # fmt: skip
        return ("accept" if accepted else "refuse"), {}

    def _on_layer_map(self, checked: Checked) -> tuple[str, dict[str, Any]]:
        msg = checked.msg
        try:
            new = LayerMap.from_dict(msg.body.get("map"))
        except LayerMapError as e:
            raise MessageRejected("malformed", f"layer map: {e}") from e
        if new.model != self.model.fingerprint:
            raise MessageRejected("wrong_model", "layer map for another model")
        self._accept(checked)
        if msg.sender != self.election.leader or msg.term != self.election.term:
            raise MessageRejected("not_leader", f"layer map from {msg.sender}, who does not lead term {msg.term}")
        self._adopt(new, from_leader=True)
        return "ack", {"epoch": self.layer_map.epoch if self.layer_map else 0}

    _handlers: ClassVar[dict[str, Callable[[Node, Checked], tuple[str, dict[str, Any]]]]] = {
        "hello": _on_hello,
        "gossip": _on_gossip,
        "election": _on_election,
        "coordinator": _on_coordinator,
        "layer_map": _on_layer_map,
    }

    # ---- outgoing messages ----------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        assert self.membership is not None
        leader = self.election.leader
        return {"info": self.membership.me.to_dict(), "leader": leader, "leader_priority": self._priority_of(leader)}

    def _seal(self, kind: str, body: dict[str, Any], *, to: str | None) -> bytes:
        assert self.membership is not None
        common = {**self._common(), **body}
        return self.sealer.seal(
            kind, common, term=self.election.term, incarnation=self.membership.me.incarnation, to=to
        )

    async def _request(self, url: str, kind: str, body: dict[str, Any], to: str | None) -> Checked | None:
        """Send one message to peer `to` (None: whoever answers at `url`); its checked reply, or None."""
        reply = await self._exchange(url, kind, body, to)
        return reply if isinstance(reply, Checked) else None

    async def _exchange(self, url: str, kind: str, body: dict[str, Any], to: str | None) -> Checked | str:
        """Like `_request`, but a failure says what it was: "timeout", "refused" (nobody answered:
        connection refused or reset) or "rejected" (an answer, but not an acceptable one)."""
        if self._closed:
            return "rejected"
        data = self._seal(kind, body, to=to)
        limit = self.config.security.max_message_bytes
        try:
            status, payload = await self.transport.post(url + MSG_PATH, data, limit)
            if status != 200:
                log.debug("%s to %s: HTTP %d %s", kind, url, status, payload[:200].decode(errors="replace"))
                refusal, why = _error_of(payload)
                if status == 409 and (refusal == "replayed" or (refusal == "stale" and "incarnation" in why)):
                    self._behind(url)
                elif refusal == "stale":
                    self.flood.refused("clock_skew", f"the peer at {url} refuses our messages: {why}")
                return "rejected"
            reply = self.opener.open(payload)  # counts its own drops
        except asyncio.TimeoutError:
            log.debug("%s to %s timed out", kind, url)
            return "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            log.debug("%s to %s failed: %s", kind, url, e or type(e).__name__)
            return "refused" if isinstance(e, (aiohttp.ClientConnectionError, OSError)) else "rejected"
        except MessageRejected as e:
            log.debug("reply to %s from %s rejected: %s", kind, url, e)
            return "rejected"
        try:
            if reply.recipient != self.peer_id or (to is not None and reply.sender != to):
                raise MessageRejected("misdirected", f"reply from {reply.sender} for {reply.recipient}")
            checked = dataclasses.replace(self._check(reply), remote=urlsplit(url).hostname)
            # An answer from a process claiming a member's peer id is judged as a message would be: a
            # copy reached at its own address (a seed naming its machine) must not take the place.
            self._check_identity(checked)
            if urlsplit(url).hostname not in self._own_addresses:  # a peer on this machine sees a local path
                self.observed(reply.body.get("observed"))
            if reply.kind in ("stale", "duplicate"):
                self._answered(checked)
                return "rejected"
            return checked
        except MessageRejected as e:
            self.drops[e.reason] += 1
            log.debug("reply to %s from %s rejected: %s", kind, url, e)
            return "rejected"

    async def _hello(self, url: str) -> None:
        reply = await self._request(url, "hello", {}, to=None)
        now = self.clock()
        if reply is None or reply.msg.kind != "welcome":
            failures = self._hello_failures.get(url, 0) + 1
            if failures >= MAX_HELLO_FAILURES and url not in self._seeds():
                # Nobody (of this swarm) there: forget it; mDNS or gossip will bring it back if it returns.
                self._introductions.pop(url, None)
                self._hello_failures.pop(url, None)
                return
            if url in self._introductions:  # only urls still being introduced keep a count (bounded)
                self._hello_failures[url] = failures
                wait = self.config.gossip.interval_s * 2 ** (failures - 1)
                self._introductions[url] = now + min(HELLO_BACKOFF_MAX_S, wait)
            return
        self._hello_failures.pop(url, None)
        self._introductions.pop(url, None)
        raw, current = reply.msg.body.get("map"), None
        if raw is not None:
            try:
                current = LayerMap.from_dict(raw)
            except LayerMapError as e:
                self.drops["malformed"] += 1
                log.debug("layer map in welcome from %s is malformed: %s", url, e)
                return
        self._accept(reply)
        if current is not None and current.model == self.model.fingerprint and not self.election.is_leader:
            # The map the swarm follows now: a joiner (or a restarted peer) adopts it at once, so
            # that if it goes on to lead, it starts from the current map rather than from nothing.
            self._adopt(current, from_leader=False)

    async def _gossip_to(self, info: MemberInfo) -> str | None:
        """One gossip exchange with a member; what went wrong ("timeout", "refused", "rejected"), if anything."""
        reply = await self._exchange(info.url, "gossip", {"digest": self._digest()}, to=info.peer_id)
        if not isinstance(reply, Checked):
            return reply
        if reply.msg.kind != "gossip":
            return "rejected"
        try:
            entries = parse_digest(reply.msg.body.get("digest"), self.config.gossip.max_members)
        except MessageRejected as e:
            self.drops[e.reason] += 1
            log.debug("gossip reply from %s: %s", info.url, e)
            return "rejected"
        self._accept(reply)
        self._merge(entries)
        return None

    def _spread(self) -> None:
        """Gossip with every live member now rather than at the next round: news that cannot wait
        (a death seen on the data path, this peer's layers of a new epoch ready)."""
        assert self.membership is not None
        for info in self.membership.live()[1:]:
            self._spawn(self._gossip_to(info))

    # ---- direct failure detection -------------------------------------------------------------------

    async def check_peer(self, peer_id: str, why: str) -> bool:
        """A hop to `peer_id` failed on the data path (`why`): probe it at once with a gossip exchange
        instead of waiting for its heartbeat to stall. It is declared dead, and the news spread, when
        nobody answers at its address, or when the probe times out and its heartbeat has been quiet
        for the suspect timeout as well. True if it is dead (now or already)."""
        if self.membership is None or peer_id == self.peer_id:
            return False
        state = self.membership.state_of(peer_id)
        if state is None or state is State.DEAD:
            return state is State.DEAD
        task = self._checks.get(peer_id)
        if task is None:
            if self._closed:
                return False
            spawned = self.tasks.spawn(self._probe(peer_id, why))  # cancelled by close() like every task
            if spawned is None:
                return False
            task = spawned
            self._checks[peer_id] = task
            task.add_done_callback(lambda _: self._checks.pop(peer_id, None))
        return await asyncio.shield(task)

    async def _probe(self, peer_id: str, why: str) -> bool:
        assert self.membership is not None
        member = self.membership.members.get(peer_id)
        if member is None:
            return False
        failure = await self._gossip_to(member.info)
        if self._closed:
            return False  # our own session closing under the probe says nothing about the peer
        now = self.clock()
        quiet = self.membership.quiet_for(peer_id, now)
        if failure is None or failure == "rejected":
            return self.membership.state_of(peer_id) is State.DEAD
        if failure == "timeout" and quiet <= self.config.gossip.suspect_after_s:
            log.info("peer %s slow on the data path (%s) and to a probe; heartbeat quiet for %.1f s",
                     self._name(peer_id), why, quiet)  # fmt: skip
            return False
        cause = f"unreachable on the data path ({why}); probe {failure}, heartbeat quiet for {quiet:.1f} s"
        self._on_events(self.membership.declare_dead(peer_id, now, cause))
        self._spread()
        return self.membership.state_of(peer_id) is State.DEAD

    async def _ask_each(self, peer_ids: list[str], kind: str) -> list[Checked]:
        """Send `kind` to every peer at once; the replies that came back, taken in."""

        async def ask(peer_id: str) -> Checked | None:
            url = self.url_of(peer_id)
            reply = await self._request(url, kind, {}, to=peer_id) if url else None
            if reply is not None:
                self._accept(reply)
            return reply

        return [r for r in await asyncio.gather(*(ask(p) for p in peer_ids)) if r is not None]

    async def _elect(self, targets: tuple[str, ...], term: int) -> None:
        for reply in await self._ask_each(list(targets), "election"):
            if reply.msg.kind == "ok":
                rank = reply.leader_rank
                self.election.on_ok(self.clock(), reply.msg.term, rank[1] if rank else None, rank)
                self._after_election()

    async def _announce(self, term: int, targets: tuple[str, ...] | None) -> None:
        assert self.membership is not None
        peers = list(targets) if targets is not None else [m.peer_id for m in self.membership.live()[1:]]
        for reply in await self._ask_each(peers, "coordinator"):
            if reply.msg.kind == "refuse":
                rank, now = reply.leader_rank, self.clock()
                leader = rank[1] if rank else None
                self._act(self.election.on_refused(term, reply.msg.term, leader, rank, now, self._higher()))

    async def _send_map(self, info: MemberInfo) -> None:
        if self.layer_map is not None:
            reply = await self._request(info.url, "layer_map", {"map": self.layer_map.to_dict()}, to=info.peer_id)
            if reply is not None:
                self._accept(reply)

    # ---- gossip -------------------------------------------------------------------------------------

    def _digest(self) -> list[dict[str, Any]]:
        assert self.membership is not None
        return self.membership.digest()

    def _merge(self, entries: list[tuple[MemberInfo, bool]]) -> None:
        assert self.membership is not None
        incarnation = self.membership.me.incarnation
        # A member said to be at an address of ours is another peer's stale guess of where it is; and
        # only the member itself, face to face, can show that a new process holds its identity.
        entries = [(info, dead) for info, dead in entries if not self._mine(info) and self._same_process(info)]
        self._on_events(self.membership.merge(entries, self.clock()))
        if self.membership.me.incarnation != incarnation:
            self._persist()
        for info, dead in entries:
            member = self.membership.members.get(info.peer_id)
            if dead and member and member.state is not State.DEAD and member.info.incarnation == info.incarnation:
                # A death rumour this peer did not take (it heard a later heartbeat): someone saw
                # the member fail on the data path, perhaps. Probe it too rather than wait it out.
                self._spawn(self.check_peer(info.peer_id, "another peer reports it dead"))
            self.max_epoch = max(self.max_epoch, info.epoch)
            if not dead and info.peer_id != self.peer_id and self.membership.state_of(info.peer_id) is None:
                self._introduce(info.url)  # hearsay: meet it ourselves before it counts

    def _same_process(self, info: MemberInfo) -> bool:
        """Whether hearsay about a member may be believed: it speaks of the process this peer knows,
        or of one whose old process is gone (only the member itself can settle any other claim)."""
        assert self.membership is not None
        return judge_claim(info, self.membership.members.get(info.peer_id)) is not Claim.VERIFY

    def _mine(self, info: MemberInfo) -> bool:
        """Whether another peer's url is an address of this machine at this peer's own port, where it
        cannot be: a guess of its own address that is also one of ours (every host's container
        bridge may have the same one)."""
        return info.peer_id != self.peer_id and self._mine_at(info.url)

    def _mine_at(self, url: str) -> bool:
        """Whether `url` is this peer itself, at one of this machine's non-loopback addresses."""
        parts = urlsplit(url)
        return parts.hostname in self._own_addresses and parts.port == urlsplit(self.url).port

    @property
    def key_fingerprint(self) -> str:
        """The fingerprint of the primary swarm key, announced over mDNS."""
        return self.keyring.primary_fingerprint

    def reload_keys(self, *, force: bool = False) -> bool:
        """Reload the keyring file if it changed (or `force`); True if the keys changed. A file that
        cannot be read or parsed leaves the keys as they are, with one warning per change of the file."""
        path = self._keyring_file
        stamp = file_stamp(path)
        if path is None or (stamp == self._keyring_stamp and not force):
            return False
        self._keyring_stamp = stamp
        try:
            fresh = load_keyring(path)
        except SwarmError as e:
            log.warning("keeping the current swarm keys (%s): %s", ", ".join(self.keyring.fingerprints), e)
            return False
        if (fresh.keys, fresh.primary) == (self.keyring.keys, self.keyring.primary):
            return False
        primary = self.keyring.primary_fingerprint
        self.keyring.replace(fresh)
        self.transport.drop_keys(self.keyring.fingerprints)  # links made under a retired key are made again
        if self.on_new_primary is not None and self.keyring.primary_fingerprint != primary:
            self._spawn(self.on_new_primary(self.keyring.primary_fingerprint))
        log.info("swarm keys reloaded from %s: primary %s, accepted %s", path, self.keyring.primary_fingerprint,
                 ", ".join(self.keyring.fingerprints))  # fmt: skip
        return True

    async def _gossip_loop(self) -> None:
        interval = self.config.gossip.interval_s
        while True:
            try:
                self.reload_keys()
                self.flood.flush()
                self._gossip_round()
            except Exception:  # a bug here must not stop the heartbeat
                log.exception("gossip round failed")
            await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))

    def _gossip_round(self) -> None:
        assert self.membership is not None
        now = self.clock()
        if self._last_round is not None and now - self._last_round > self.config.gossip.suspect_after_s:
            # This peer stood still (SIGSTOP, a suspended VM, starved of CPU): the others' silence
            # is ours. Give them a fresh deadline rather than declaring everyone dead.
            log.warning("this peer was stalled for %.1f s; restarting every member's heartbeat deadline",
                        now - self._last_round)  # fmt: skip
            self.membership.forgive(now)
        self._last_round = now
        self.membership.beat()
        self._on_events(self.membership.tick(now))
        self._lead()
        if self._load_retry is not None and now >= self._load_retry[0]:
            self._reconcile()
        others = [m for m in self.membership.live()[1:]]
        for info in self.rng.sample(others, min(self.config.gossip.fanout, len(others))):
            self._spawn(self._gossip_to(info))
        self._retry_the_dead(now)
        members = {m.info.url for m in self.membership.members.values() if m.state is not State.DEAD}
        for url, due in list(self._introductions.items()):
            if url in members:
                del self._introductions[url]
            elif due <= now:
                self._introductions[url] = now + HELLO_BACKOFF_MAX_S  # until this hello answers
                self._spawn(self._hello(url))
        for seed in self.config.discovery.join:
            self._introduce(f"http://{seed}")

    def _retry_the_dead(self, now: float) -> None:
        """Send each dead member a digest now and then, with doubling waits: a partition or a cut
        link looks like death, and when it heals the exchange makes both sides refute the rumour
        (a higher incarnation) and take each other back. mDNS is browsed again on the same schedule."""
        assert self.membership is not None
        first, longest = self.config.gossip.interval_s, self.config.gossip.retry_dead_max_s
        dead = {p: m for p, m in self.membership.members.items() if m.state is State.DEAD}
        for peer_id in set(self._retry_dead) - set(dead):
            del self._retry_dead[peer_id]
        for peer_id, member in dead.items():
            due, wait = self._retry_dead.get(peer_id, (now, first))
            if now >= due:
                self._retry_dead[peer_id] = (now + wait, min(longest, 2 * wait))
                self._spawn(self._gossip_to(member.info))
        if not dead:
            self._browse = None
        elif self.on_browse is not None:
            due, wait = self._browse or (now, first)
            if now >= due:
                self._browse = (now + wait, min(longest, 2 * wait))
                self._spawn(self.on_browse())

    def _on_events(self, events: list[Event]) -> None:
        assert self.membership is not None
        for event in events:
            member = self.membership.members.get(event.peer_id)
            info = member.info if member else None
            where = f" at {info.url}, {info.usable_bytes // MIB} MiB, incarnation {info.incarnation}" if info else ""
            if event.what == "refuted":
                log.warning(
                    "gossip says this peer is dead; refuting with incarnation %d", self.membership.me.incarnation
                )
            elif event.what in ("joined", "rejoined"):
                log.info("peer %s %s%s", self._name(event.peer_id), event.what, where)
            elif event.what == "suspect":
                log.info("peer %s suspect: no heartbeat for %.1f s", self._name(event.peer_id),
                         self.config.gossip.suspect_after_s)  # fmt: skip
            elif event.what == "dead":
                cause = event.cause or f"no heartbeat for {self.config.gossip.dead_after_s:.1f} s"
                log.warning("peer %s dead: %s", self._name(event.peer_id), cause)
            else:
                log.info("peer %s %s", self._name(event.peer_id), event.what)
            if event.what == "dead":
                self.service.drop_entry(event.peer_id)  # nobody will step its sessions again
            if event.what in ("dead", "forgotten") and event.peer_id == self.election.leader:
                self._act(self.election.leader_lost(self.clock(), self._higher()))
        if events:
            self._lead()
        self._check_ready()  # a member's news may complete the map even without an event

    # ---- election ---------------------------------------------------------------------------------

    async def _election_loop(self) -> None:
        while True:
            try:
                self._act(self.election.tick(self.clock(), self._higher()))
            except Exception:
                log.exception("election tick failed")
            self._election_wake.clear()
            deadline = self.election.deadline
            wait = ELECTION_IDLE_S if deadline is None else min(ELECTION_IDLE_S, max(0.01, deadline - self.clock()))
            await wait_event(self._election_wake, wait)

    def _act(self, actions: list[Elect | Announce]) -> None:
        for action in actions:
            if isinstance(action, Elect):
                log.info("electing: asking %d higher-ranked peer(s) at term %d", len(action.targets), action.term)
                self._spawn(self._elect(action.targets, action.term))
            else:
                self._spawn(self._announce(action.term, action.targets))
        self._after_election()

    def _after_election(self) -> None:
        self._election_wake.set()  # the loop recomputes its next deadline
        term, leader = self.election.term, self.election.leader
        if term != self.persisted.term:
            self._persist()
        if (term, leader) == self._leader_seen:
            return
        self._leader_seen = (term, leader)
        if leader == self.peer_id:
            log.info("elected leader for term %d", term)
            self._lead()
        elif leader is not None:
            log.info("leader is %s for term %d", self._name(leader), term)

    def _higher(self) -> list[str]:
        assert self.membership is not None
        return [m.peer_id for m in self.membership.live()[1:] if (m.priority, m.peer_id) > self.rank]

    # ---- partitioning and the layer map ------------------------------------------------------------

    def _partition(self) -> tuple[Share, ...]:
        """The live members' partition of the layers; SwarmTooSmall when they cannot hold the model."""
        assert self.membership is not None
        candidates = [Candidate(m.peer_id, m.usable_bytes) for m in self.membership.live()]
        return partition(candidates, self.model.profile, self.config.partition.kv_reserve_tokens)

    def capacity_error(self) -> str | None:
        """What is missing when the live members (as this peer sees them) cannot hold the model."""
        if self.membership is None:
            return None
        try:
            self._partition()
        except SwarmTooSmall as e:
            live = len(self.membership.live())
            return f"{e} ({live} live peer(s)); start more peers, or give them more memory"
        return None

    def _lead(self) -> None:
        """As leader: repartition when membership requires it, and bring lagging peers up to date."""
        if not self.election.is_leader or self.membership is None:
            self.partition_error = None  # a leader's error; the leader now reports its own
            return
        live = self.membership.live()
        try:
            shares = self._partition()
        except SwarmTooSmall as e:
            if self.partition_error != str(e):
                log.error("cannot partition over %d peer(s): %s", len(live), e)
            self.partition_error = str(e)
            return
        self.partition_error = None
        urls = {m.peer_id: m.url for m in live}
        stages = tuple(Stage(s.peer_id, urls[s.peer_id], s.start, s.end) for s in shares)
        new = next_map(
            self.layer_map,
            stages,
            term=self.election.term,
            model=self.model.fingerprint,
            num_layers=self.model.profile.num_layers,
            max_epoch=self.max_epoch,
            leader=self.peer_id,
        )
        if new is not None:
            self._adopt(new, from_leader=True)
            for info in live[1:]:
                self._spawn(self._send_map(info))
            return
        current = self.layer_map
        assert current is not None
        for info in live[1:]:
            stage = current.stage_of(info.peer_id)
            expected = (stage.start, stage.end) if stage else (0, 0)
            if info.epoch != current.epoch or (info.start, info.end) != expected:
                self._spawn(self._send_map(info))  # lagging, or following another map of this epoch

    def _adopt(self, new: LayerMap, *, from_leader: bool) -> None:
        """Follow `new` if it is newer; the leader's word also settles two maps of one epoch."""
        if not should_follow(self.layer_map, new, from_leader=from_leader):
            return
        self.layer_map = new
        self.max_epoch = max(self.max_epoch, new.epoch)
        stages = " ".join(f"{self._name(s.peer_id)}[{s.start},{s.end})" for s in new.stages)
        log.info("layer map epoch %d (term %d): %s", new.epoch, new.term, stages)
        self.service.drop_other_maps(new)
        self.changes.notify()
        self._reconcile()

    def _reconcile(self) -> None:
        """Load or drop layers until this peer holds what the current map gives it."""
        if self.membership is None or self.layer_map is None:
            return
        stage = self.layer_map.stage_of(self.peer_id)
        target = (stage.start, stage.end) if stage else None
        held = self.host.range if self.host else target
        epoch = self.layer_map.epoch
        if held == target:
            start, end = target or (0, 0)
            news = self.membership.me.epoch != epoch or not self.membership.me.ready
            self.membership.update_me(epoch=epoch, start=start, end=end, ready=True)
            self.load_error, self._load_retry = None, None
            self._check_ready()
            if news:
                self._spread()  # entries waiting to replay learn at once that this stage is ready
            return
        self.membership.update_me(epoch=epoch, ready=False)
        if self._closed or (self._load_retry is not None and self.clock() < self._load_retry[0]):
            return  # the gossip loop calls again once a failed load's wait is over
        if self._loading is None or self._loading.done():
            self._loading = asyncio.create_task(self._load(target))

    async def _load(self, target: tuple[int, int] | None) -> None:
        assert self.host is not None
        try:
            if target is None:
                log.info("standing by: this peer holds no layers in the current map")
                await asyncio.to_thread(self.host.unload)
            else:
                log.info("loading layers [%d, %d)", *target)
                seconds = await asyncio.to_thread(self.host.load, *target)
                log.info("ready: layers [%d, %d) loaded in %.2f s", *target, seconds)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            wait = min(LOAD_RETRY_MAX_S, 2 * self._load_retry[1]) if self._load_retry else self.config.gossip.interval_s
            self._load_retry = (self.clock() + wait, wait)
            self.load_error = f"loading layers {target}: {e}"
            log.error("failed %s; retrying in %.1f s", self.load_error, wait)
            return
        finally:
            self._loading = None
        self._reconcile()

    def _check_ready(self) -> None:
        self.changes.notify()  # a waiting entry rechecks: the map, a stage or a member changed
        if self.layer_map is not None and self.ready() and self._ready_epoch != self.layer_map.epoch:
            self._ready_epoch = self.layer_map.epoch
            log.info("swarm ready: every stage of epoch %d is loaded", self.layer_map.epoch)

    def stage_ready(self, stage: Stage) -> bool:
        """Whether the peer of `stage` reports its layers of the current epoch loaded."""
        assert self.membership is not None and self.layer_map is not None
        if stage.peer_id == self.peer_id:
            info = self.membership.me
        else:
            member = self.membership.members.get(stage.peer_id)
            if member is None or member.state is State.DEAD:
                return False
            info = member.info
        return info.ready and info.epoch == self.layer_map.epoch and (info.start, info.end) == (stage.start, stage.end)

    def ready(self) -> bool:
        """True when every stage of the current layer map is loaded."""
        return self.layer_map is not None and all(self.stage_ready(s) for s in self.layer_map.stages)

    # ---- lookups ------------------------------------------------------------------------------------

    def _info_of(self, peer_id: str | None) -> MemberInfo | None:
        if self.membership is None or peer_id is None:
            return None
        if peer_id == self.peer_id:
            return self.membership.me
        member = self.membership.members.get(peer_id)
        return member.info if member else None

    def _priority_of(self, peer_id: str | None) -> int | None:
        info = self._info_of(peer_id)
        return info.priority if info else None

    def errors(self) -> list[str]:
        """Why the swarm cannot serve, as far as this peer knows (partitioning, loading)."""
        return [e for e in (self.partition_error, self.load_error) if e]

    def url_of(self, peer_id: str) -> str | None:
        """A member's address (this peer's own too), if it is one."""
        info = self._info_of(peer_id)
        return info.url if info else None

    def name_of(self, peer_id: str) -> str:
        """A member's readable node id (the peer id if it is not known)."""
        info = self._info_of(peer_id)
        return info.node_id if info else peer_id

    def _name(self, peer_id: str | None) -> str:
        info = self._info_of(peer_id)
        return f"{peer_id} ({info.node_id})" if info and peer_id else str(peer_id)

    # ---- status -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON of GET /swarm/status."""
        assert self.membership is not None
        me = self.membership.me
        peers = [_peer_json(me, State.ALIVE)] + [_peer_json(m.info, m.state) for m in self.membership.members.values()]
        layer_map = None
        if self.layer_map is not None:
            layer_map = self.layer_map.to_dict()
            for stage, raw in zip(self.layer_map.stages, layer_map["stages"], strict=True):
                raw["ready"] = self.stage_ready(stage)
        return {
            "peer_id": self.peer_id,
            "node_id": self.node_id,
            "url": self.url,
            "leader": self.election.leader,
            "term": self.election.term,
            "role": self.election.phase.value,
            "incarnation": me.incarnation,
            "ready": self.ready(),
            "model": {
                "spec": self.model.spec,
                "fingerprint": self.model.fingerprint,
                "dtype": str(self.model.profile.dtype).removeprefix("torch."),
                "quantize": self.model.profile.quantize,
                "num_layers": self.model.profile.num_layers,
            },
            "resources": {
                "device": self.resources.device,
                "name": self.resources.name,
                "usable_mb": self.resources.usable_bytes // MIB,
                "cap_mb": self.resources.cap_bytes // MIB if self.resources.cap_bytes else None,
            },
            "loaded": {"start": me.start, "end": me.end, "epoch": me.epoch} if me.end > me.start else None,
            "layer_map": layer_map,
            "peers": peers,
            "dropped_messages": dict(self.drops),
            "swarm_keys": self.keyring.describe(),
            "errors": self.errors(),
            "links": self.transport.links(),
            "sessions": self.service.sessions(),
        }


def _peer_json(info: MemberInfo, state: State) -> dict[str, Any]:
    return {
        "peer_id": info.peer_id,
        "node_id": info.node_id,
        "url": info.url,
        "state": state.value,
        "memory_mb": info.usable_bytes // MIB,
        "priority": info.priority,
        "incarnation": info.incarnation,
        "device": info.device,
        "dtype": info.dtype,
        "loaded": [info.start, info.end] if info.end > info.start else None,
        "epoch": info.epoch,
        "ready": info.ready,
    }


def _error_of(payload: bytes) -> tuple[str | None, str]:
    """The `error.type` and `error.message` of a JSON refusal, if it is one."""
    try:
        error = json.loads(payload)["error"]
        kind, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        return None, ""
    return (kind if isinstance(kind, str) else None), str(message)[:200]
