"""The Bully election on a simulated network and clock: random message delays, peers that die and
come back, failure detection that lags; no sockets, no sleeps. Leaders partition the layers and
send their layer map with the node's own pure rules (`partition`, `next_map`, `should_follow`). A
monitor checks after every event that terms never decrease on any peer, that no term ever has two
leaders anywhere, and that no peer ever goes back to an older layer-map epoch."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from peer.profile import ModelProfile
from swarm.config import ElectionConfig
from swarm.election import Announce, Elect, Election, Phase, Rank
from swarm.layer_map import LayerMap, Stage, next_map, should_follow
from swarm.partitioner import Candidate, partition

CONFIG = ElectionConfig(startup_grace_s=0.5, timeout_min_s=0.3, timeout_max_s=0.6, coordinator_timeout_s=1.0)
MAX_DELAY_S = 0.05  # one-way message delay, well under the election timeout
DETECT_S = (0.5, 1.5)  # gossip declares a dead peer dead after this long (random per observer)
TICK_S = 0.02
GOSSIP_S = 0.25
PAST = -CONFIG.startup_grace_s  # construct at this time and the startup grace is over at 0
LAYERS = 12
PROFILE = ModelProfile(
    num_layers=LAYERS, hidden_size=64, vocab_size=256, max_position_embeddings=128, dtype=torch.float32,
    tied_embeddings=False, layer_bytes=1000, embedding_bytes=500, norm_bytes=10, head_bytes=500,
    kv_bytes_per_token_per_layer=0,
)  # fmt: skip


@dataclass
class SimPeer:
    rank: Rank
    election: Election
    alive: bool = True
    dead_in_view: set[str] = field(default_factory=set)  # peers this one's gossip has declared dead
    layer_map: LayerMap | None = None
    max_epoch: int = 0
    led_term: int = -1  # the last term this peer took the lead in
    pushed_at: float = -1.0  # when it last resent its map to peers that follow another

    @property
    def pid(self) -> str:
        return self.rank[1]


class SimSwarm:
    """Peers, an event queue ordered by simulated time, and the invariant monitor."""

    def __init__(self, ranks: list[Rank], seed: int, start_spread_s: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.peers: dict[str, SimPeer] = {}
        self.terms_seen: dict[str, int] = {}
        self.leaders_of_term: dict[int, set[str]] = {}
        self.persisted: dict[str, int] = {}
        self.epochs_seen: dict[str, int] = {}
        self.took_over_with: dict[str, list[tuple[int, LayerMap | None]]] = {}  # pid -> (term, map then held)
        for rank in ranks:
            self.at(self.rng.uniform(0, start_spread_s), lambda r=rank: self.boot(r, term=0))
        self.at(TICK_S, self.tick_all)

    # --- event plumbing
    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (when, next(self.counter), fn))

    def later(self, fn: Callable[[], None]) -> None:
        self.at(self.now + self.rng.uniform(0.001, MAX_DELAY_S), fn)

    def run_until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            self.now, _, fn = heapq.heappop(self.queue)
            fn()
            self.check()
        self.now = t

    def run_until_settled(self, limit_s: float) -> float:
        """Run until every live peer follows one leader that leads and one map of the live peers."""
        end = self.now + limit_s
        while self.now < end:
            self.run_until(self.now + TICK_S)
            if self.settled() and self.maps_agree():
                return self.now
        raise AssertionError(f"no single agreed leader within {limit_s} s: {self.describe()}")

    # --- the monitor
    def check(self) -> None:
        for pid, peer in self.peers.items():
            e = peer.election
            assert e.term >= self.terms_seen.get(pid, 0), f"term went down on {pid}"
            self.terms_seen[pid] = e.term
            epoch = peer.layer_map.epoch if peer.layer_map else 0
            assert epoch >= self.epochs_seen.get(pid, 0), f"{pid} went back to an older layer map"
            self.epochs_seen[pid] = epoch
            if e.leader is not None:
                self.leaders_of_term.setdefault(e.term, set()).add(e.leader)
                assert len(self.leaders_of_term[e.term]) == 1, f"two leaders in term {e.term}: {self.describe()}"

    def settled(self) -> bool:
        live = [p for p in self.peers.values() if p.alive]
        leaders = {p.election.leader for p in live}
        if len(leaders) != 1 or None in leaders:
            return False
        (leader,) = leaders
        return (
            self.peers[leader].alive
            and self.peers[leader].election.is_leader
            and all(p.election.phase in (Phase.FOLLOWER, Phase.LEADER) for p in live)
        )

    def describe(self) -> str:
        return ", ".join(
            f"{p.pid}:{'up' if p.alive else 'down'}/{p.election.phase.value}/t{p.election.term}/{p.election.leader}"
            for p in self.peers.values()
        )

    # --- peers
    def higher(self, peer: SimPeer) -> list[str]:
        return [
            q.pid
            for q in self.peers.values()
            if q.rank > peer.rank and q.pid not in peer.dead_in_view and q.pid in self.known(peer)
        ]

    def known(self, peer: SimPeer) -> set[str]:
        return set(self.peers)

    def boot(self, rank: Rank, term: int) -> None:
        election = Election(rank, CONFIG, random.Random(self.rng.random()), term=term, now=self.now)
        peer = SimPeer(rank, election)  # a restart starts with no map: it held its layers in memory
        self.epochs_seen[rank[1]] = 0
        self.peers[rank[1]] = peer
        self.terms_seen[rank[1]] = term
        # Hello: every live peer answers with its term and leader, as the node's join exchange does.
        for other in list(self.peers.values()):
            if other is not peer and other.alive:
                other.dead_in_view.discard(peer.pid)
                self.later(lambda o=other, p=peer: self.hello_reply(o, p))

    def hello_reply(self, source: SimPeer, target: SimPeer) -> None:
        if not (source.alive and target.alive):
            return
        e = source.election
        leader_rank = self.peers[e.leader].rank if e.leader else None
        self.act(target, target.election.observe(e.term, e.leader, leader_rank, self.now, self.higher(target)))
        # The welcome carries the map the source follows; a joiner that does not lead adopts it.
        if source.layer_map is not None and not target.election.is_leader:
            self.follow(target, source.layer_map, from_leader=False)

    def kill(self, pid: str) -> None:
        peer = self.peers[pid]
        peer.alive = False
        self.persisted[pid] = peer.election.term
        for other in self.peers.values():
            if other.alive:
                self.at(self.now + self.rng.uniform(*DETECT_S), lambda o=other: self.detect_death(o, pid))

    def detect_death(self, observer: SimPeer, pid: str) -> None:
        if not observer.alive or self.peers[pid].alive:
            return
        observer.dead_in_view.add(pid)
        if observer.election.leader == pid:
            self.act(observer, observer.election.leader_lost(self.now, self.higher(observer)))

    def restart(self, pid: str) -> None:
        self.boot(self.peers[pid].rank, term=self.persisted[pid])

    def tick_all(self) -> None:
        for peer in self.peers.values():
            if peer.alive:
                self.act(peer, peer.election.tick(self.now, self.higher(peer)))
                self.lead(peer)  # as the node does every gossip round
        self.at(self.now + TICK_S, self.tick_all)

    # --- layer maps, with the node's rules
    def view(self, peer: SimPeer) -> list[SimPeer]:
        return [q for q in self.peers.values() if q.pid not in peer.dead_in_view and (q.alive or q is not peer)]

    def lead(self, peer: SimPeer) -> None:
        if not (peer.alive and peer.election.is_leader):
            return
        live = self.view(peer)
        shares = partition([Candidate(q.pid, 100_000) for q in live], PROFILE, kv_reserve_tokens=0)  # any one holds all
        stages = tuple(Stage(s.peer_id, f"sim://{s.peer_id}", s.start, s.end) for s in shares)
        new = next_map(
            peer.layer_map, stages, term=peer.election.term, model="m", num_layers=LAYERS, max_epoch=peer.max_epoch
        )
        if new is None:
            # Once a gossip round, resend the map to peers whose gossip says they follow another.
            if self.now - peer.pushed_at >= GOSSIP_S:
                peer.pushed_at = self.now
                for q in live:
                    if q is not peer and q.layer_map != peer.layer_map:
                        self.later(lambda q=q, m=peer.layer_map: self.deliver_map(peer, q, m))
            return
        self.follow(peer, new, from_leader=True)
        for q in live:
            if q is not peer:
                self.later(lambda q=q, m=new: self.deliver_map(peer, q, m))

    def deliver_map(self, sender: SimPeer, receiver: SimPeer, layer_map: LayerMap) -> None:
        if sender.alive and receiver.alive and receiver.election.leader == sender.pid:
            self.follow(receiver, layer_map, from_leader=True)

    def follow(self, peer: SimPeer, layer_map: LayerMap, *, from_leader: bool) -> None:
        peer.max_epoch = max(peer.max_epoch, layer_map.epoch)
        if should_follow(peer.layer_map, layer_map, from_leader=from_leader):
            peer.layer_map = layer_map

    def maps_agree(self) -> LayerMap | None:
        """The one map every live peer follows, covering exactly the live peers; None otherwise."""
        live = [p for p in self.peers.values() if p.alive]
        maps = {p.layer_map for p in live}
        if len(maps) != 1 or None in maps:
            return None
        (layer_map,) = maps
        assert layer_map is not None
        return layer_map if set(layer_map.peer_ids()) == {p.pid for p in live} else None

    # --- the driver: what the node does with the machine's actions, over simulated messages
    def act(self, peer: SimPeer, actions: list) -> None:
        e = peer.election
        if e.is_leader and e.term != peer.led_term:
            peer.led_term = e.term
            self.took_over_with.setdefault(peer.pid, []).append((e.term, peer.layer_map))
            self.lead(peer)
        for action in actions:
            if isinstance(action, Elect):
                for target in action.targets:
                    self.later(lambda t=target, a=action: self.deliver_election(peer, self.peers[t], a.term))
            elif isinstance(action, Announce):
                targets = action.targets or tuple(
                    q.pid for q in self.peers.values() if q is not peer and q.pid not in peer.dead_in_view
                )
                for target in targets:
                    self.later(lambda t=target, a=action: self.deliver_coordinator(peer, self.peers[t], a.term))

    def deliver_election(self, sender: SimPeer, receiver: SimPeer, term: int) -> None:
        if not (sender.alive and receiver.alive):
            return
        self.act(receiver, receiver.election.on_election(sender.rank, term, self.now, self.higher(receiver)))
        e = receiver.election
        leader_rank = self.peers[e.leader].rank if e.leader else None

        def ok() -> None:
            if sender.alive:
                sender.election.on_ok(self.now, e.term, e.leader, leader_rank)

        self.later(ok)

    def deliver_coordinator(self, sender: SimPeer, receiver: SimPeer, term: int) -> None:
        if not (sender.alive and receiver.alive):
            return
        accepted, actions = receiver.election.on_coordinator(sender.rank, term, self.now, self.higher(receiver))
        self.act(receiver, actions)
        if accepted:
            return
        e = receiver.election
        leader_rank = self.peers[e.leader].rank if e.leader else None

        def refused() -> None:
            if sender.alive:
                self.act(
                    sender,
                    sender.election.on_refused(term, e.term, e.leader, leader_rank, self.now, self.higher(sender)),
                )

        self.later(refused)

    def leader(self) -> str:
        assert self.settled(), self.describe()
        return next(p.election.leader for p in self.peers.values() if p.alive)  # type: ignore[return-value]


def ranks(n: int, seed: int) -> list[Rank]:
    rng = random.Random(seed)
    return [(rng.choice([0, 0, 1]), f"p{i:02d}-{rng.randrange(1000):03d}") for i in range(n)]


SEEDS = range(25)


@pytest.mark.parametrize("seed", SEEDS)
def test_highest_ranked_live_peer_wins(seed: int) -> None:
    sim = SimSwarm(ranks(5, seed), seed, start_spread_s=0.3)
    sim.run_until_settled(limit_s=10)
    assert sim.leader() == max(p.rank for p in sim.peers.values())[1]


@pytest.mark.parametrize("seed", SEEDS)
def test_next_peer_wins_in_bounded_time_after_the_leader_dies(seed: int) -> None:
    sim = SimSwarm(ranks(5, seed), seed)
    sim.run_until_settled(limit_s=10)
    old = sim.leader()
    old_term = sim.peers[old].election.term
    killed_at = sim.now
    sim.kill(old)
    # Bound: slowest detection + a candidate's timeout + one wait for a COORDINATOR that never
    # comes (a peer that OK'd may have died) + message delays.
    bound = DETECT_S[1] + CONFIG.timeout_max_s + 1.5 * CONFIG.coordinator_timeout_s + 1.0
    settled_at = sim.run_until_settled(limit_s=bound)
    assert settled_at - killed_at <= bound
    live = [p for p in sim.peers.values() if p.alive]
    assert sim.leader() == max(p.rank for p in live)[1]
    assert all(p.election.term > old_term for p in live)
    # The new leader repartitioned over the survivors (run_until_settled waits for one map of them).
    layer_map = sim.maps_agree()
    assert layer_map is not None and old not in layer_map.peer_ids()


@pytest.mark.parametrize("seed", SEEDS)
def test_concurrent_elections_end_with_one_leader(seed: int) -> None:
    sim = SimSwarm(ranks(6, seed), seed)
    sim.run_until_settled(limit_s=10)
    before = sim.maps_agree()
    # Every peer starts an election at the same instant, as after a leader loss seen by all at once.
    for peer in sim.peers.values():
        peer.election.phase, peer.election.leader = Phase.IDLE, None
        sim.act(peer, peer.election.start(sim.now, sim.higher(peer)))
    sim.run_until_settled(limit_s=10)
    assert sim.leader() == max(p.rank for p in sim.peers.values())[1]
    assert sum(p.election.is_leader for p in sim.peers.values()) == 1
    # The same peers are live: the (re)elected leader keeps the map rather than repartitioning.
    assert sim.maps_agree() == before


@pytest.mark.parametrize("seed", SEEDS)
def test_restarted_higher_ranked_peer_takes_over_with_a_higher_term(seed: int) -> None:
    sim = SimSwarm(ranks(4, seed), seed)
    sim.run_until_settled(limit_s=10)
    top = sim.leader()
    sim.kill(top)
    sim.run_until_settled(limit_s=10)
    interim = sim.leader()
    interim_term = sim.peers[interim].election.term
    interim_map = sim.maps_agree()
    assert interim != top and interim_map is not None
    sim.restart(top)  # same state directory: it remembers the term it had when it died
    sim.run_until_settled(limit_s=10)
    assert sim.leader() == top
    assert all(p.election.term > interim_term for p in sim.peers.values())
    # It took over holding the map the swarm followed (adopted on joining, or the interim leader's
    # repartition that already counted it in), not a blank one; it repartitions only if that map
    # does not fit the live peers, and then with a later epoch.
    term, held = sim.took_over_with[top][-1]
    assert term == sim.peers[top].election.term
    assert held is not None and held.term == interim_term and held.epoch >= interim_map.epoch
    final = sim.maps_agree()
    assert final is not None and top in final.peer_ids()
    if set(held.peer_ids()) == {p.pid for p in sim.peers.values()}:
        assert final == held
    else:
        assert final.epoch > held.epoch


@pytest.mark.parametrize("seed", SEEDS)
def test_many_faults_never_break_the_invariants(seed: int) -> None:
    sim = SimSwarm(ranks(5, seed), seed, start_spread_s=1.0)
    rng = random.Random(seed)
    for _ in range(6):
        sim.run_until(sim.now + rng.uniform(0.1, 3.0))
        down = [p.pid for p in sim.peers.values() if not p.alive]
        up = [p.pid for p in sim.peers.values() if p.alive]
        if down and (len(up) < 2 or rng.random() < 0.5):
            sim.restart(rng.choice(down))
        elif len(up) > 1:
            sim.kill(rng.choice(up))
    for pid in [p.pid for p in sim.peers.values() if not p.alive]:
        sim.restart(pid)
    sim.run_until_settled(limit_s=20)  # the monitor has checked the invariants after every event
    assert sim.leader() == max(p.rank for p in sim.peers.values())[1]


def test_a_coordinator_of_a_stale_term_is_rejected() -> None:
    e = Election((0, "b"), CONFIG, random.Random(0), term=5)
    accepted, _ = e.on_coordinator((1, "z"), 5, now=0.0, higher=[])
    assert accepted and e.leader == "z"
    accepted, actions = e.on_coordinator((2, "zz"), 4, now=0.1, higher=[])
    assert not accepted and actions == []
    assert (e.term, e.leader) == (5, "z")


def test_a_second_leader_for_the_same_term_is_rejected() -> None:
    e = Election((0, "b"), CONFIG, random.Random(0), term=5)
    assert e.on_coordinator((1, "y"), 6, now=0.0, higher=[])[0]
    assert not e.on_coordinator((1, "z"), 6, now=0.0, higher=[])[0]
    assert (e.term, e.leader) == (6, "y")


def test_a_leader_steps_down_on_a_higher_term() -> None:
    e = Election((5, "a"), CONFIG, random.Random(0), term=2, now=PAST)
    assert e.start(now=0.0, higher=[]) == [Announce(3)]
    assert e.is_leader and e.term == 3
    e.observe(7, None, None, now=1.0, higher=[])
    assert not e.is_leader and e.term == 7 and e.leader is None
    # It waits a randomised while for the new term's COORDINATOR, then elects itself past term 7.
    assert e.tick(now=1.0 + CONFIG.timeout_max_s + 0.01, higher=[]) == [Announce(8)]


def test_a_lower_ranked_coordinator_is_accepted_then_bullied() -> None:
    e = Election((1, "a"), CONFIG, random.Random(0), term=0)
    accepted, _ = e.on_coordinator((0, "b"), 1, now=0.0, higher=[])
    assert accepted and e.leader == "b"
    # Not before its startup grace is over: it may not yet know every peer ranked above it.
    assert e.tick(now=CONFIG.startup_grace_s - 0.01, higher=[]) == []
    assert e.tick(now=CONFIG.startup_grace_s + CONFIG.timeout_min_s, higher=[]) == [Announce(2)]
    assert e.is_leader


def test_election_timeouts_are_randomised() -> None:
    deadlines = set()
    for seed in range(10):
        e = Election((0, "a"), CONFIG, random.Random(seed), now=0.0)
        e.tick(now=CONFIG.startup_grace_s, higher=["b"])
        assert e.phase is Phase.CANDIDATE and e.deadline is not None
        deadlines.add(round(e.deadline, 6))
    assert len(deadlines) == 10


def test_two_leaders_of_one_term_resolve_to_the_higher_ranked() -> None:
    """Peers that started out of each other's sight both claimed term 1; when they meet, the higher
    claims term 2 and the lower stands down and then follows it."""
    high = Election((0, "b"), CONFIG, random.Random(0), term=0, now=PAST)
    low = Election((0, "a"), CONFIG, random.Random(1), term=0, now=PAST)
    assert high.start(0.0, []) == [Announce(1)] and low.start(0.0, []) == [Announce(1)]
    # The lower hears the higher's claim first: it stands down, leaderless, and keeps term 1.
    assert low.observe(1, "b", (0, "b"), now=0.1, higher=["b"]) == []
    assert not low.is_leader and low.leader is None and low.term == 1
    # The higher hears the lower's claim: it claims a new term, which the lower accepts.
    assert high.observe(1, "a", (0, "a"), now=0.1, higher=[]) == [Announce(2)]
    accepted, _ = low.on_coordinator((0, "b"), 2, now=0.2, higher=["b"])
    assert accepted and (low.term, low.leader) == (2, "b")


def test_a_lost_leader_is_not_replaced_within_its_term() -> None:
    e = Election((0, "b"), CONFIG, random.Random(0), term=4)
    assert e.on_coordinator((1, "x"), 5, now=0.0, higher=["x", "y"])[0]
    e.leader_lost(now=1.0, higher=["y"])
    assert e.leader is None
    # Another leader for term 5 is refused, however it reaches us; term 6 is fine.
    assert not e.on_coordinator((2, "y"), 5, now=1.1, higher=["y"])[0]
    e.on_ok(1.1, 5, "y", (2, "y"))
    e.observe(5, "y", (2, "y"), now=1.1, higher=["y"])
    assert e.leader is None and e.accepted == (5, "x")
    assert e.on_coordinator((2, "y"), 6, now=1.2, higher=["y"])[0]
    assert (e.term, e.leader, e.accepted) == (6, "y", (6, "y"))


def test_refusals_of_an_older_claim_change_nothing() -> None:
    e = Election((5, "a"), CONFIG, random.Random(0), term=2, now=PAST)
    assert e.start(now=0.0, higher=[]) == [Announce(3)]
    # Several peers refuse term 3 because they accepted a lower-ranked claimant of it: one new term.
    assert e.on_refused(3, 3, "b", (1, "b"), now=0.1, higher=[]) == [Announce(4)]
    for _ in range(5):
        assert e.on_refused(3, 3, "b", (1, "b"), now=0.2, higher=[]) == []
    assert e.term == 4 and e.is_leader


def test_a_peer_never_accepts_its_own_coordinator() -> None:
    e = Election((5, "a"), CONFIG, random.Random(0), term=2, now=PAST)
    e.start(now=0.0, higher=[])
    accepted, actions = e.on_coordinator((5, "a"), 3, now=0.1, higher=[])
    assert not accepted and actions == [] and e.is_leader
