"""The Bully election with terms, as a pure state machine. Rank is (priority, peer_id); the
highest live rank leads. A candidate sends ELECTION to every live peer ranked above it; if none
answers OK within a randomised timeout it declares itself COORDINATOR of a new term (one above
the highest it has seen). Every message carries a term: a higher term makes a leader step down,
a COORDINATOR of an older term is rejected, and a peer accepts at most one leader per term. The
machine only decides; the node sends what it asks for, feeds it replies and ticks its clock, so
the same code runs under the tests' simulated network and clock."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from swarm.config import ElectionConfig

Rank = tuple[int, str]  # (priority, peer_id): larger leads


class Phase(str, Enum):
    """Where this peer stands in the election."""

    IDLE = "idle"  # no known leader; will elect when `deadline` passes
    CANDIDATE = "candidate"  # sent ELECTION upwards; declares itself if no OK before `deadline`
    WAITING = "waiting"  # a higher peer answered OK; elects again if no COORDINATOR before `deadline`
    FOLLOWER = "follower"  # has accepted a leader for the current term
    LEADER = "leader"


@dataclass(frozen=True)
class Elect:
    """Send ELECTION(term) to these higher-ranked peers; feed each OK to `on_ok`."""

    targets: tuple[str, ...]
    term: int


@dataclass(frozen=True)
class Announce:
    """Send COORDINATOR(term) to `targets` (None: every live peer); feed refusals to `on_refused`."""

    term: int
    targets: tuple[str, ...] | None = None


Action = Elect | Announce


class Election:
    """One peer's side of the Bully election."""

    def __init__(
        self, me: Rank, config: ElectionConfig, rng: random.Random, *, term: int = 0, now: float = 0.0
    ) -> None:
        self.me = me
        self.config = config
        self.rng = rng
        self.term = term  # highest term seen; never decreases
        self.leader: str | None = None  # the live leader this peer follows (or is), if any
        # (term, leader) last accepted; a term's leader, once accepted, is never replaced by another.
        self.accepted: tuple[int, str] | None = None
        self.phase = Phase.IDLE
        self.deadline: float | None = now + config.startup_grace_s
        self.grace_until = now + config.startup_grace_s  # no claims before discovery has had its time

    def begin(self, now: float) -> None:
        """Start the startup grace now: the peer is reachable and discovery is running."""
        self.grace_until = now + self.config.startup_grace_s
        if self.phase is Phase.IDLE:
            self.deadline = self.grace_until

    @property
    def is_leader(self) -> bool:
        """Whether this peer leads the current term."""
        return self.phase is Phase.LEADER

    def tick(self, now: float, higher: list[str]) -> list[Action]:
        """Act on an expired timeout; `higher` are the live peers ranked above this one."""
        if self.deadline is None or now < self.deadline:
            return []
        if self.phase is Phase.CANDIDATE:
            return self._declare()  # nobody above answered
        self.phase = Phase.IDLE  # IDLE grace ran out, or WAITING never saw its COORDINATOR
        return self.start(now, higher)

    def start(self, now: float, higher: list[str]) -> list[Action]:
        """Begin an election unless one is already running or this peer already leads."""
        if self.phase in (Phase.CANDIDATE, Phase.WAITING, Phase.LEADER):
            return []
        self.leader = None
        if now < self.grace_until:
            # Just started: we may not know the swarm's term or the peers above us yet.
            self.phase, self.deadline = Phase.IDLE, self.grace_until
            return []
        if not higher:
            return self._declare()
        self.phase = Phase.CANDIDATE
        self.deadline = now + self.rng.uniform(self.config.timeout_min_s, self.config.timeout_max_s)
        return [Elect(tuple(higher), self.term)]

    def on_ok(self, now: float, their_term: int, their_leader: str | None, leader_rank: Rank | None) -> None:
        """A higher peer answered our ELECTION with OK and told us the leader it follows, if any."""
        # It follows a leader above us: follow it too, if that keeps one leader per term.
        if (
            their_leader is not None
            and leader_rank is not None
            and leader_rank > self.me
            and their_term >= self.term
            and self._accept(their_term, their_leader)
        ):
            return
        if self.phase is Phase.CANDIDATE:
            # It takes over; wait for its COORDINATOR, then elect again if none comes.
            self.phase = Phase.WAITING
            self.deadline = now + self.config.coordinator_timeout_s * self.rng.uniform(1.0, 1.5)

    def on_election(self, sender: Rank, term: int, now: float, higher: list[str]) -> list[Action]:
        """A lower peer asks for an election (we answer OK); we run our own or reassert our lead."""
        actions = self.observe(term, None, None, now, higher)
        if self.phase is Phase.LEADER:
            return [*actions, Announce(self.term, (sender[1],))]
        return actions + self.start(now, higher)

    def on_coordinator(self, sender: Rank, term: int, now: float, higher: list[str]) -> tuple[bool, list[Action]]:
        """A COORDINATOR(term) from `sender`: accept it, or refuse it as stale or a second leader."""
        if term < self.term or sender == self.me or not self._accept(term, sender[1]):
            return False, []  # stale, or a second leader for a term that already has one
        if sender < self.me:
            return True, self._bully(now, higher)
        return True, []

    def on_refused(
        self,
        announced: int,
        their_term: int,
        their_leader: str | None,
        their_rank: Rank | None,
        now: float,
        higher: list[str],
    ) -> list[Action]:
        """A peer refused our COORDINATOR of term `announced`; it told us its term and leader."""
        if their_term > self.term:
            return self.observe(their_term, their_leader, their_rank, now, higher)
        if not self.is_leader or announced != self.term or their_term < self.term:
            return []  # an answer to an older claim of ours
        # It accepted another leader for this term (a race the network lost): the higher-ranked
        # claimant takes a new term, the lower stands down and waits for it.
        if their_rank is None or their_rank < self.me:
            return self._declare()
        self.phase, self.leader = Phase.IDLE, None
        self.deadline = now + self.config.coordinator_timeout_s
        return []

    def observe(
        self, term: int, leader: str | None, leader_rank: Rank | None, now: float, higher: list[str]
    ) -> list[Action]:
        """Any message's term (and the sender's leader for it, if known): a higher term ends our claim."""
        if term == self.term and self.is_leader and leader is not None and leader_rank is not None:
            if leader != self.me[1]:
                # Two leaders claimed this term without hearing each other (they started apart): the
                # higher-ranked one claims a new term, the lower one stands down and waits for it.
                if leader_rank < self.me:
                    return self._declare()
                self.leader, self.phase = None, Phase.IDLE
                self.deadline = now + self.config.coordinator_timeout_s
            return []
        if term <= self.term:
            return []
        if leader is not None and leader_rank is not None and leader != self.me[1] and self._accept(term, leader):
            return self._bully(now, higher) if leader_rank < self.me else []
        # A newer term whose leader we do not know: wait for its COORDINATOR, then elect.
        self.term = term
        self.leader, self.phase = None, Phase.IDLE
        self.deadline = now + self.rng.uniform(self.config.timeout_min_s, self.config.timeout_max_s)
        return []

    def leader_lost(self, now: float, higher: list[str]) -> list[Action]:
        """Gossip declared the leader dead (or it left): elect."""
        if self.phase is Phase.LEADER:
            return []
        self.phase, self.leader = Phase.IDLE, None
        return self.start(now, higher)

    def _bully(self, now: float, higher: list[str]) -> list[Action]:
        # A lower-ranked peer leads while we are alive: take over, after a random pause so that
        # several higher peers do not all claim the next term at once.
        self.phase = Phase.IDLE
        self.deadline = max(now + self.rng.uniform(0.0, self.config.timeout_min_s), self.grace_until)
        return []

    def _accept(self, term: int, leader: str) -> bool:
        """Follow `leader` for `term` unless this peer already accepted another leader for it."""
        if self.accepted is not None and (
            term < self.accepted[0] or (term == self.accepted[0] and leader != self.accepted[1])
        ):
            return False
        self.accepted = (term, leader)
        self.term = max(self.term, term)
        self.leader, self.phase, self.deadline = leader, Phase.FOLLOWER, None
        return True

    def _declare(self) -> list[Action]:
        self.term += 1
        self.accepted = (self.term, self.me[1])
        self.leader, self.phase, self.deadline = self.me[1], Phase.LEADER, None
        return [Announce(self.term)]
