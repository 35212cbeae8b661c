"""Gossip membership and failure detection, as pure state: who is in the swarm, what each member
last said about itself (incarnation, heartbeat counter, resources, loaded range, layer-map
epoch), and whether it is alive, suspect or dead. Merging a digest and ticking the clock are pure
steps that return the events they cause; sending digests, timers and logging live in the node.
A member is only ever added from a message it signed itself, never from hearsay; a dead member
comes back only with a higher incarnation, and a peer told it is dead refutes with a new one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from swarm.config import GossipConfig
from swarm.errors import MessageRejected


class State(str, Enum):
    """A member's liveness as this peer sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"  # local only: its heartbeat has stalled for a while
    DEAD = "dead"


@dataclass(frozen=True)
class MemberInfo:
    """What a peer announces about itself; travels in gossip."""

    peer_id: str
    node_id: str
    url: str  # base URL of its HTTP server
    incarnation: int
    heartbeat: int  # counter the peer bumps every gossip round
    priority: int
    usable_bytes: int  # memory for weights plus KV cache
    device: str
    fingerprint: str  # of the model it serves
    epoch: int  # layer-map epoch its loaded range belongs to
    start: int  # loaded layers [start, end); start == end when it holds none
    end: int
    ready: bool  # its layers of `epoch` are loaded and serving
    # Random, new with every start of the process: two processes claiming one peer id (a copied
    # identity key) differ here, while a peer that moves to another address keeps it.
    instance: str = ""
    dtype: str = ""  # the dtype its stage computes in, hence of the hidden states it sends

    def to_dict(self) -> dict[str, Any]:
        """Wire form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> MemberInfo:
        """Parse a hostile wire form; raises MessageRejected("malformed") on anything unexpected."""
        if not isinstance(raw, dict) or set(raw) != _FIELDS:
            raise MessageRejected("malformed", "member info must have exactly the known fields")
        for name, kind in _TYPES.items():
            value = raw[name]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**63):
                raise MessageRejected("malformed", f"member field {name} must be an integer")
            if kind is str and (not isinstance(value, str) or len(value) > 256):
                raise MessageRejected("malformed", f"member field {name} must be a short string")
            if kind is bool and not isinstance(value, bool):
                raise MessageRejected("malformed", f"member field {name} must be a boolean")
        info = cls(**raw)
        if (
            min(info.incarnation, info.heartbeat, info.usable_bytes, info.epoch, info.start) < 0
            or info.end < info.start
        ):
            raise MessageRejected("malformed", "member counters must be non-negative and start <= end")
        return info


_FIELDS = {f.name for f in dataclasses.fields(MemberInfo)}
_TYPES = {f.name: {"int": int, "str": str, "bool": bool}[str(f.type)] for f in dataclasses.fields(MemberInfo)}


@dataclass
class Member:
    """A member as this peer tracks it."""

    info: MemberInfo
    state: State
    advanced_at: float  # local time its (incarnation, heartbeat) last went up
    died_at: float | None = None


@dataclass(frozen=True)
class Event:
    """A change in membership, for the log and the election."""

    peer_id: str
    what: str  # "joined", "suspect", "alive", "dead", "forgotten", "rejoined", "refuted"
    cause: str = ""  # why, where it was not the heartbeat's silence


class Membership:
    """This peer's view of the swarm."""

    def __init__(self, me: MemberInfo, config: GossipConfig) -> None:
        self.me = me
        self.config = config
        self.members: dict[str, Member] = {}

    def update_me(self, **changes: Any) -> MemberInfo:
        """Change this peer's own announced fields."""
        self.me = dataclasses.replace(self.me, **changes)
        return self.me

    def beat(self) -> MemberInfo:
        """Bump this peer's heartbeat counter, once per gossip round."""
        return self.update_me(heartbeat=self.me.heartbeat + 1)

    def admit(self, info: MemberInfo, now: float) -> list[Event]:
        """Take a peer's own signed account of itself (hello or its gossip): add it or bring it up to date."""
        if info.peer_id == self.me.peer_id:
            return []
        current = self.members.get(info.peer_id)
        if current is None:
            if len(self.members) >= self.config.max_members:
                return []
            self.members[info.peer_id] = Member(info, State.ALIVE, now)
            return [Event(info.peer_id, "joined")]
        return self._update(current, info, dead=False, now=now)

    def merge(self, entries: list[tuple[MemberInfo, bool]], now: float) -> list[Event]:
        """Merge hearsay from a digest: (info, reported dead) per member; unknown peers are ignored."""
        events: list[Event] = []
        for info, dead in entries:
            if info.peer_id == self.me.peer_id:
                if dead and info.incarnation >= self.me.incarnation:
                    self.update_me(incarnation=info.incarnation + 1)
                    events.append(Event(info.peer_id, "refuted"))
                continue
            current = self.members.get(info.peer_id)
            if current is not None:
                events += self._update(current, info, dead=dead, now=now)
        return events

    def _update(self, member: Member, info: MemberInfo, *, dead: bool, now: float) -> list[Event]:
        old = member.info
        if info.incarnation > old.incarnation:
            member.info, member.advanced_at = info, now
            if dead:
                return self._kill(member, now)
            was = member.state
            member.state, member.died_at = State.ALIVE, None
            return [Event(info.peer_id, "rejoined" if was is State.DEAD else "alive")] if was is not State.ALIVE else []
        if info.incarnation < old.incarnation or member.state is State.DEAD:
            return []  # older news, or a death that only a higher incarnation undoes
        if dead:
            if info.heartbeat < old.heartbeat:
                return []  # we have heard from it since the heartbeat the rumour's author saw last
            return self._kill(member, now)
        if info.heartbeat > old.heartbeat:
            member.info, member.advanced_at = info, now
            if member.state is State.SUSPECT:
                member.state = State.ALIVE
                return [Event(info.peer_id, "alive")]
        return []

    def _kill(self, member: Member, now: float, cause: str = "") -> list[Event]:
        if member.state is State.DEAD:
            return []
        member.state, member.died_at = State.DEAD, now
        return [Event(member.info.peer_id, "dead", cause)]

    def declare_dead(self, peer_id: str, now: float, cause: str) -> list[Event]:
        """Kill a member on direct evidence (it failed a probe), without waiting for its heartbeat to
        stall; like any death, the rumour spreads and only a higher incarnation undoes it."""
        member = self.members.get(peer_id)
        return self._kill(member, now, cause) if member is not None else []

    def quiet_for(self, peer_id: str, now: float) -> float:
        """Seconds since a member's heartbeat last went up (0 for this peer or an unknown one)."""
        member = self.members.get(peer_id)
        return now - member.advanced_at if member is not None else 0.0

    def forgive(self, now: float) -> None:
        """After this peer itself stood still (paused, or starved of CPU), every member's silence is
        ours, not theirs: restart their heartbeat deadlines instead of declaring them all dead."""
        for member in self.members.values():
            if member.state is not State.DEAD:
                member.advanced_at = max(member.advanced_at, now)

    def tick(self, now: float) -> list[Event]:
        """Suspect, kill and forget members whose heartbeats have stalled."""
        events: list[Event] = []
        for peer_id, member in list(self.members.items()):
            quiet = now - member.advanced_at
            if member.state is State.DEAD:
                if member.died_at is not None and now - member.died_at > self.config.forget_after_s:
                    del self.members[peer_id]
                    events.append(Event(peer_id, "forgotten"))
            elif quiet > self.config.dead_after_s:
                events += self._kill(member, now)
            elif quiet > self.config.suspect_after_s and member.state is State.ALIVE:
                member.state = State.SUSPECT
                events.append(Event(peer_id, "suspect"))
        return events

    def digest(self) -> list[dict[str, Any]]:
        """Wire form of everything this peer knows, itself included."""
        entries = [{"info": self.me.to_dict(), "dead": False}]
        entries += [{"info": m.info.to_dict(), "dead": m.state is State.DEAD} for m in self.members.values()]
        return entries

    def live(self) -> list[MemberInfo]:
        """Members not declared dead, this peer included."""
        return [self.me] + [m.info for m in self.members.values() if m.state is not State.DEAD]

    def state_of(self, peer_id: str) -> State | None:
        """Liveness of a peer as seen here; this peer is always alive; None if unknown."""
        if peer_id == self.me.peer_id:
            return State.ALIVE
        member = self.members.get(peer_id)
        return member.state if member else None


class Claim(str, Enum):
    """What a peer's own account of itself means next to the member this peer knows by its id."""

    NEW = "new"  # no member of that id (or one from before instances were named): take it in
    SAME = "same"  # the process this peer knows
    RESTART = "restart"  # another process, and the old one is gone: dead here, or its address taken
    STALE = "stale"  # a restart, but from an older copy of its state: it must move past `incarnation`
    VERIFY = "verify"  # another process at another address while the member lives: a copy, or a
    # restart elsewhere before the old one was missed; ask the member's address which


def judge_claim(info: MemberInfo, member: Member | None) -> Claim:
    """Judge a process that claims `info.peer_id` against the member known by that id. An identity
    key copied to another machine gives the same peer id and valid signatures; only the process's
    `instance` (new with every start) and its address tell the two apart."""
    if member is None or not member.info.instance:
        return Claim.NEW
    known = member.info
    if info.instance == known.instance:
        return Claim.SAME
    if member.state is State.DEAD or (info.url == known.url and info.incarnation > known.incarnation):
        return Claim.RESTART if info.incarnation > known.incarnation else Claim.STALE
    return Claim.VERIFY


def parse_digest(raw: Any, max_entries: int) -> list[tuple[MemberInfo, bool]]:
    """Parse a hostile digest into (info, reported dead) pairs."""
    if not isinstance(raw, list) or len(raw) > max_entries + 1:
        raise MessageRejected("malformed", "digest must be a list no longer than the member limit")
    entries = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("dead"), bool):
            raise MessageRejected("malformed", "digest entry must be {info, dead}")
        entries.append((MemberInfo.from_dict(entry.get("info")), entry["dead"]))
    return entries
