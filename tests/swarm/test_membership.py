"""Gossip membership as pure state, driven with explicit times: joins only from a peer's own
account, suspicion and death when heartbeats stall, death declared on direct evidence, forgiveness
after this peer's own stall, revival only by a higher incarnation, refutation of this peer's own
reported death, the member cap, and the hostile-input parsers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.config import GossipConfig
from swarm.errors import MessageRejected
from swarm.membership import Claim, Event, Member, MemberInfo, Membership, State, judge_claim, parse_digest

CONFIG = GossipConfig(
    interval_s=0.1, fanout=2, suspect_after_s=0.3, dead_after_s=0.6, forget_after_s=2.0, max_members=3
)
T0 = 100.0


def info(peer_id: str, **changes: Any) -> MemberInfo:
    fields: dict[str, Any] = {
        "peer_id": peer_id,
        "node_id": f"node-{peer_id}",
        "url": f"http://127.0.0.1:5{len(peer_id)}00",
        "incarnation": 1,
        "heartbeat": 0,
        "priority": 0,
        "usable_bytes": 1 << 30,
        "device": "cpu",
        "fingerprint": "f" * 64,
        "epoch": 0,
        "start": 0,
        "end": 0,
        "ready": False,
    }
    fields.update(changes)
    return MemberInfo(**fields)


def view(*others: MemberInfo, now: float = T0) -> Membership:
    m = Membership(info("me"), CONFIG)
    for other in others:
        assert m.admit(other, now) == [Event(other.peer_id, "joined")]
    return m


def events(*pairs: tuple[str, str]) -> list[Event]:
    return [Event(peer_id, what) for peer_id, what in pairs]


def test_admit_adds_a_member_and_emits_joined() -> None:
    m = Membership(info("me"), CONFIG)
    assert m.admit(info("a"), T0) == events(("a", "joined"))
    assert m.state_of("a") is State.ALIVE
    assert m.members["a"].info == info("a")
    assert m.admit(info("a"), T0) == []  # the same news again changes nothing
    assert m.state_of("unknown") is None


def test_admit_ignores_this_peer() -> None:
    m = Membership(info("me"), CONFIG)
    assert m.admit(info("me", incarnation=9), T0) == []
    assert m.members == {}
    assert m.me.incarnation == 1
    assert m.state_of("me") is State.ALIVE


def test_advancing_heartbeats_keep_a_member_alive() -> None:
    m = view(info("a"))
    now = T0
    for beat in range(1, 20):
        now += CONFIG.suspect_after_s * 0.9
        assert m.merge([(info("a", heartbeat=beat), False)], now) == []
        assert m.tick(now) == []
    assert m.state_of("a") is State.ALIVE
    assert m.members["a"].info.heartbeat == 19


def test_stalled_heartbeat_makes_a_member_suspect_then_dead_then_forgotten() -> None:
    m = view(info("a"))
    assert m.tick(T0 + CONFIG.suspect_after_s) == []  # not yet: strictly longer than the limit
    assert m.tick(T0 + CONFIG.suspect_after_s + 0.01) == events(("a", "suspect"))
    assert m.state_of("a") is State.SUSPECT
    assert m.tick(T0 + CONFIG.suspect_after_s + 0.02) == []  # suspected once
    assert m.tick(T0 + CONFIG.dead_after_s + 0.01) == events(("a", "dead"))
    died = T0 + CONFIG.dead_after_s + 0.01
    assert m.state_of("a") is State.DEAD
    assert m.tick(died + CONFIG.forget_after_s) == []
    assert m.tick(died + CONFIG.forget_after_s + 0.01) == events(("a", "forgotten"))
    assert m.state_of("a") is None
    assert "a" not in m.members


def test_a_long_silence_goes_straight_to_dead() -> None:
    m = view(info("a"))
    assert m.tick(T0 + CONFIG.dead_after_s + 1) == events(("a", "dead"))


def test_a_heartbeat_that_does_not_advance_does_not_keep_a_member_alive() -> None:
    m = view(info("a", heartbeat=5))
    assert m.merge([(info("a", heartbeat=5), False)], T0 + 0.25) == []
    assert m.merge([(info("a", heartbeat=4), False)], T0 + 0.28) == []
    assert m.tick(T0 + CONFIG.suspect_after_s + 0.01) == events(("a", "suspect"))
    assert m.members["a"].info.heartbeat == 5


def test_suspect_member_whose_heartbeat_advances_is_alive_again() -> None:
    m = view(info("a"))
    suspect_at = T0 + CONFIG.suspect_after_s + 0.01
    assert m.tick(suspect_at) == events(("a", "suspect"))
    assert m.merge([(info("a", heartbeat=1), False)], suspect_at + 0.01) == events(("a", "alive"))
    assert m.state_of("a") is State.ALIVE
    # The clock restarted from the advance: no suspicion until suspect_after_s after it.
    assert m.tick(suspect_at + 0.01 + CONFIG.suspect_after_s) == []


def test_suspect_member_is_alive_again_through_its_own_message() -> None:
    m = view(info("a"))
    m.tick(T0 + CONFIG.suspect_after_s + 0.01)
    assert m.admit(info("a", heartbeat=1), T0 + 0.5) == events(("a", "alive"))


def test_dead_member_is_not_revived_by_a_higher_heartbeat_at_the_same_incarnation() -> None:
    m = view(info("a", incarnation=2))
    died = T0 + CONFIG.dead_after_s + 0.01
    assert m.tick(died) == events(("a", "dead"))
    assert m.merge([(info("a", incarnation=2, heartbeat=50), False)], died + 0.1) == []
    assert m.admit(info("a", incarnation=2, heartbeat=51), died + 0.2) == []
    assert m.state_of("a") is State.DEAD
    assert m.members["a"].info.heartbeat == 0


def test_dead_member_rejoins_with_a_higher_incarnation() -> None:
    m = view(info("a", incarnation=2))
    died = T0 + CONFIG.dead_after_s + 0.01
    m.tick(died)
    assert m.admit(info("a", incarnation=3), died + 0.1) == events(("a", "rejoined"))
    assert m.state_of("a") is State.ALIVE
    assert m.members["a"].info.incarnation == 3
    assert m.members["a"].died_at is None
    # Its silence is counted from the rejoin, not from before its death.
    assert m.tick(died + 0.1 + CONFIG.suspect_after_s) == []
    assert m.tick(died + 0.1 + CONFIG.dead_after_s + 0.01) == events(("a", "dead"))


def test_dead_member_rejoins_through_hearsay_with_a_higher_incarnation() -> None:
    m = view(info("a", incarnation=2))
    m.tick(T0 + CONFIG.dead_after_s + 0.01)
    assert m.merge([(info("a", incarnation=3), False)], T0 + 1) == events(("a", "rejoined"))


def test_merge_ignores_hearsay_about_unknown_peers() -> None:
    m = view(info("a"))
    assert m.merge([(info("stranger"), False), (info("ghost", incarnation=9), True)], T0) == []
    assert set(m.members) == {"a"}
    assert m.state_of("stranger") is None
    assert m.admit(info("stranger"), T0) == events(("stranger", "joined"))  # only its own account adds it


def test_digest_reporting_this_peer_dead_makes_it_refute() -> None:
    m = view(info("a"))
    assert m.merge([(info("me", incarnation=1), True)], T0) == events(("me", "refuted"))
    assert m.me.incarnation == 2
    # A report about the older incarnation is already refuted.
    assert m.merge([(info("me", incarnation=1), True)], T0 + 0.1) == []
    # A report about a later incarnation than ours (we forgot it) is refuted above it.
    assert m.merge([(info("me", incarnation=5), True)], T0 + 0.2) == events(("me", "refuted"))
    assert m.me.incarnation == 6
    # Reports of this peer alive change nothing.
    assert m.merge([(info("me", incarnation=9), False)], T0 + 0.3) == []
    assert m.me.incarnation == 6


def test_dead_report_about_another_member_at_its_incarnation_kills_it() -> None:
    m = view(info("a", incarnation=4), info("b"))
    assert m.merge([(info("a", incarnation=4), True), (info("b"), False)], T0 + 0.1) == events(("a", "dead"))
    assert m.state_of("a") is State.DEAD
    assert m.state_of("b") is State.ALIVE
    assert m.merge([(info("a", incarnation=4), True)], T0 + 0.2) == []  # dies once
    assert m.admit(info("a", incarnation=5), T0 + 0.3) == events(("a", "rejoined"))  # its refutation


def test_a_dead_report_staler_than_our_own_news_is_ignored() -> None:
    # Its author last heard heartbeat 3; we have heard 100 since: one flaky link kills nobody.
    m = view(info("a", incarnation=4, heartbeat=100))
    assert m.merge([(info("a", incarnation=4, heartbeat=3), True)], T0 + 0.1) == []
    assert m.state_of("a") is State.ALIVE
    # A report as fresh as ours is believed.
    assert m.merge([(info("a", incarnation=4, heartbeat=100), True)], T0 + 0.2) == events(("a", "dead"))


def test_dead_report_at_a_higher_incarnation_takes_the_news_and_kills() -> None:
    m = view(info("a", incarnation=4))
    assert m.merge([(info("a", incarnation=6, heartbeat=3), True)], T0 + 0.1) == events(("a", "dead"))
    assert m.members["a"].info.incarnation == 6


def test_older_incarnation_news_is_ignored() -> None:
    m = view(info("a", incarnation=4, heartbeat=2))
    assert m.merge([(info("a", incarnation=3), True)], T0 + 0.1) == []
    assert m.merge([(info("a", incarnation=3, heartbeat=99), False)], T0 + 0.1) == []
    assert m.admit(info("a", incarnation=3, heartbeat=100), T0 + 0.1) == []
    assert m.state_of("a") is State.ALIVE
    assert m.members["a"].info == info("a", incarnation=4, heartbeat=2)


def test_max_members_caps_admissions() -> None:
    m = view(*(info(p) for p in ("a", "b", "c")))
    assert len(m.members) == CONFIG.max_members
    assert m.admit(info("d"), T0) == []
    assert set(m.members) == {"a", "b", "c"}
    assert m.admit(info("a", heartbeat=1), T0 + 0.1) == []  # members already known still update
    assert m.members["a"].info.heartbeat == 1
    assert len(m.tick(T0 + 1.0)) == 3  # all dead
    assert len(m.tick(T0 + 1.0 + CONFIG.forget_after_s + 0.1)) == 3  # all forgotten
    assert m.members == {}
    assert m.admit(info("d"), T0 + 10) == events(("d", "joined"))


def test_beat_and_update_me() -> None:
    m = Membership(info("me"), CONFIG)
    assert m.beat().heartbeat == 1
    assert m.beat().heartbeat == 2
    assert m.update_me(start=0, end=4, ready=True, epoch=3) == info("me", heartbeat=2, end=4, ready=True, epoch=3)


def test_digest_round_trips_through_parse_digest() -> None:
    a, b = info("a", heartbeat=3, start=0, end=12, epoch=2, ready=True), info("b", incarnation=7, priority=-3)
    m = view(a, b)
    m.merge([(b, True)], T0 + 0.1)
    parsed = parse_digest(m.digest(), CONFIG.max_members)
    assert parsed == [(m.me, False), (a, False), (b, True)]


def test_live_excludes_dead_members() -> None:
    m = view(info("a"), info("b"), info("c"))
    m.merge([(info("b"), True)], T0)
    m.tick(T0 + CONFIG.suspect_after_s + 0.01)  # a and c suspect: still live
    assert [i.peer_id for i in m.live()] == ["me", "a", "c"]


# ---- hostile input ---------------------------------------------------------------------------------

VALID: dict[Any, Any] = info("a", heartbeat=3, end=4).to_dict()


def test_member_info_round_trips() -> None:
    assert MemberInfo.from_dict(VALID) == info("a", heartbeat=3, end=4)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "a",
        {k: v for k, v in VALID.items() if k != "ready"},
        {**VALID, "extra": 1},
        {**VALID, 5: 1},
        {**VALID, "incarnation": True},
        {**VALID, "heartbeat": 1.0},
        {**VALID, "priority": "1"},
        {**VALID, "usable_bytes": 2**63},
        {**VALID, "priority": -(2**63)},
        {**VALID, "url": 5},
        {**VALID, "node_id": None},
        {**VALID, "device": "x" * 257},
        {**VALID, "fingerprint": b"ff"},
        {**VALID, "ready": 1},
        {**VALID, "ready": "true"},
        {**VALID, "incarnation": -1},
        {**VALID, "heartbeat": -1},
        {**VALID, "usable_bytes": -1},
        {**VALID, "epoch": -1},
        {**VALID, "start": -1, "end": 0},
        {**VALID, "start": 5, "end": 4},
    ],
)
def test_member_info_from_dict_rejects_hostile_input(raw: Any) -> None:
    with pytest.raises(MessageRejected) as e:
        MemberInfo.from_dict(raw)
    assert e.value.reason == "malformed"


def test_member_info_accepts_edge_values() -> None:
    edge = {**VALID, "priority": -5, "start": 3, "end": 3, "device": "x" * 256, "usable_bytes": 2**63 - 1}
    assert MemberInfo.from_dict(edge) == MemberInfo(**edge)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(VALID)),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300), st.binary(max_size=4)),
)
def test_member_info_from_dict_gives_a_valid_member_or_malformed(name: str, value: Any) -> None:
    raw = {**VALID, name: value}
    try:
        parsed = MemberInfo.from_dict(raw)
    except MessageRejected as e:
        assert e.reason == "malformed"
        return
    assert dataclasses.asdict(parsed) == raw
    assert 0 <= parsed.start <= parsed.end


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"info": VALID, "dead": False},
        "digest",
        [{"info": VALID, "dead": False}] * (CONFIG.max_members + 2),
        [VALID],
        [{"info": VALID}],
        [{"info": VALID, "dead": 0}],
        [{"info": VALID, "dead": "no"}],
        [{"info": {**VALID, "url": None}, "dead": False}],
        [{"dead": False}],
        [[VALID, False]],
    ],
    ids=[
        "none",
        "dict",
        "string",
        "too-long",
        "bare-info",
        "no-dead",
        "int-dead",
        "str-dead",
        "bad-info",
        "no-info",
        "pair",
    ],
)
def test_parse_digest_rejects_hostile_input(raw: Any) -> None:
    with pytest.raises(MessageRejected) as e:
        parse_digest(raw, CONFIG.max_members)
    assert e.value.reason == "malformed"


def test_parse_digest_allows_the_member_limit_plus_the_sender() -> None:
    raw = [{"info": info(f"p{i}").to_dict(), "dead": i % 2 == 0} for i in range(CONFIG.max_members + 1)]
    assert len(parse_digest(raw, CONFIG.max_members)) == CONFIG.max_members + 1
    assert parse_digest([], CONFIG.max_members) == []


# ---- direct failure detection ------------------------------------------------------------------------


def test_declare_dead_kills_a_live_or_a_suspect_member_and_names_the_cause() -> None:
    m = view(info("a"), info("b"))
    assert m.merge([(info("b", heartbeat=1), False)], T0 + 0.2) == []
    now = T0 + CONFIG.suspect_after_s + 0.01
    assert m.tick(now) == events(("a", "suspect"))
    assert m.declare_dead("a", now, "probe refused") == [Event("a", "dead", "probe refused")]
    assert m.declare_dead("b", now + 0.01, "probe timeout") == [Event("b", "dead", "probe timeout")]
    assert m.state_of("a") is State.DEAD and m.state_of("b") is State.DEAD
    assert m.members["a"].died_at == now and m.members["b"].died_at == now + 0.01
    assert [i.peer_id for i in m.live()] == ["me"]


def test_declaring_a_dead_or_an_unknown_peer_dead_gives_no_events() -> None:
    m = view(info("a"), info("b"))
    assert m.declare_dead("a", T0 + 0.1, "probe refused") == [Event("a", "dead", "probe refused")]
    assert m.declare_dead("a", T0 + 0.2, "probe refused again") == []
    assert m.members["a"].died_at == T0 + 0.1  # the first death stands; its forget deadline does not move
    assert m.declare_dead("stranger", T0 + 0.2, "probe refused") == []
    assert m.declare_dead("me", T0 + 0.2, "probe refused") == []
    assert m.state_of("stranger") is None and m.state_of("me") is State.ALIVE
    assert m.tick(T0 + CONFIG.dead_after_s + 0.01) == events(("b", "dead"))  # by silence: no cause
    assert m.declare_dead("b", T0 + 1, "probe refused") == []


def test_a_declared_death_is_undone_only_by_a_higher_incarnation() -> None:
    m = view(info("a", incarnation=2))
    m.declare_dead("a", T0 + 0.1, "probe refused")
    # Its own account, or hearsay of it alive, at the same incarnation: the death stands.
    assert m.merge([(info("a", incarnation=2, heartbeat=9), False)], T0 + 0.2) == []
    assert m.admit(info("a", incarnation=2, heartbeat=10), T0 + 0.3) == []
    assert m.state_of("a") is State.DEAD and m.members["a"].info.heartbeat == 0
    assert m.admit(info("a", incarnation=3), T0 + 0.4) == events(("a", "rejoined"))
    assert m.state_of("a") is State.ALIVE and m.members["a"].died_at is None


def test_a_declared_death_spreads_in_the_digest() -> None:
    a, b = info("a"), info("b")
    m = view(a, b)
    m.declare_dead("a", T0 + 0.1, "probe refused")
    assert parse_digest(m.digest(), CONFIG.max_members) == [(m.me, False), (a, True), (b, False)]
    # A peer that hears the digest kills it too, though it never probed it.
    other = Membership(info("other"), CONFIG)
    other.admit(a, T0)
    other.admit(m.me, T0)
    assert other.merge(parse_digest(m.digest(), CONFIG.max_members), T0 + 0.2) == events(("a", "dead"))
    assert other.state_of("a") is State.DEAD and other.state_of("me") is State.ALIVE


def test_forgive_after_a_long_gap_restarts_every_deadline() -> None:
    late = T0 + CONFIG.dead_after_s + 5  # this peer stood still for far longer than the dead timeout
    unforgiving, forgiving = view(info("a"), info("b")), view(info("a"), info("b"))
    assert unforgiving.tick(late) == events(("a", "dead"), ("b", "dead"))
    forgiving.forgive(late)
    assert forgiving.tick(late) == []
    assert forgiving.state_of("a") is State.ALIVE and forgiving.state_of("b") is State.ALIVE
    # The deadlines restart from the gap's end; they are not abolished.
    assert forgiving.tick(late + CONFIG.suspect_after_s) == []
    assert forgiving.tick(late + CONFIG.suspect_after_s + 0.01) == events(("a", "suspect"), ("b", "suspect"))
    assert forgiving.tick(late + CONFIG.dead_after_s + 0.01) == events(("a", "dead"), ("b", "dead"))


def test_forgive_spares_a_suspect_member_until_a_full_dead_timeout_later() -> None:
    m = view(info("a"))
    suspect_at = T0 + CONFIG.suspect_after_s + 0.01
    assert m.tick(suspect_at) == events(("a", "suspect"))
    late = T0 + CONFIG.dead_after_s + 5
    m.forgive(late)
    assert m.tick(late) == []
    assert m.tick(late + CONFIG.dead_after_s) == []
    assert m.tick(late + CONFIG.dead_after_s + 0.01) == events(("a", "dead"))


def test_forgive_does_not_revive_the_dead_or_move_their_forget_deadline() -> None:
    m = view(info("a"))
    m.declare_dead("a", T0 + 0.1, "probe refused")
    late = T0 + CONFIG.dead_after_s + 0.5  # before its forget deadline
    m.forgive(late)
    assert m.state_of("a") is State.DEAD and m.members["a"].advanced_at == T0
    assert [i.peer_id for i in m.live()] == ["me"]
    assert m.tick(late) == []
    assert m.tick(T0 + 0.1 + CONFIG.forget_after_s) == []
    assert m.tick(T0 + 0.1 + CONFIG.forget_after_s + 0.01) == events(("a", "forgotten"))


def test_forgive_never_moves_a_deadline_back() -> None:
    m = view(info("a"), now=T0 + 1)
    m.forgive(T0)  # a clock reading older than the member's last heartbeat
    assert m.members["a"].advanced_at == T0 + 1
    assert m.tick(T0 + 1 + CONFIG.suspect_after_s) == []


def test_quiet_for_counts_from_the_last_heartbeat_that_went_up() -> None:
    m = view(info("a"))
    assert m.quiet_for("a", T0 + 0.25) == pytest.approx(0.25)
    m.merge([(info("a", heartbeat=1), False)], T0 + 0.2)
    assert m.quiet_for("a", T0 + 0.5) == pytest.approx(0.3)
    m.merge([(info("a", heartbeat=1), False)], T0 + 0.4)  # the same heartbeat again: still quiet
    assert m.quiet_for("a", T0 + 0.5) == pytest.approx(0.3)
    m.forgive(T0 + 1)
    assert m.quiet_for("a", T0 + 1.5) == pytest.approx(0.5)
    m.declare_dead("a", T0 + 1.2, "probe refused")  # a death is no heartbeat
    assert m.quiet_for("a", T0 + 1.5) == pytest.approx(0.5)
    assert m.quiet_for("me", T0 + 9) == 0.0
    assert m.quiet_for("stranger", T0 + 9) == 0.0


# ---- claims to a member's peer id ---------------------------------------------------------------------


def test_a_claim_to_a_members_peer_id_is_judged_by_instance_address_and_liveness() -> None:
    known = info("a", instance="i1", url="http://198.18.0.1:50051", incarnation=3)
    alive, dead = Member(known, State.ALIVE, T0), Member(known, State.DEAD, T0, died_at=T0)
    suspect = Member(known, State.SUSPECT, T0)
    assert judge_claim(known, None) is Claim.NEW
    assert judge_claim(known, Member(dataclasses.replace(known, instance=""), State.ALIVE, T0)) is Claim.NEW
    assert judge_claim(dataclasses.replace(known, heartbeat=9), alive) is Claim.SAME
    elsewhere = dataclasses.replace(known, instance="i2", url="http://198.18.0.4:50051", incarnation=4)
    # Another process at another address while the member lives (even if quiet): ask the member.
    assert judge_claim(elsewhere, alive) is Claim.VERIFY
    assert judge_claim(elsewhere, suspect) is Claim.VERIFY
    # Once the member is dead, a higher incarnation is a restart; a lower or equal one is stale.
    assert judge_claim(elsewhere, dead) is Claim.RESTART
    assert judge_claim(dataclasses.replace(elsewhere, incarnation=2), dead) is Claim.STALE
    # The same address with a higher incarnation: the old process no longer holds the port.
    in_place = dataclasses.replace(known, instance="i2", incarnation=4)
    assert judge_claim(in_place, alive) is Claim.RESTART
    assert judge_claim(dataclasses.replace(in_place, incarnation=3), alive) is Claim.VERIFY
