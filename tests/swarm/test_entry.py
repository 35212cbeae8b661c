"""The entry's pure parts: where the earliest stop string starts, how one request's per-stage
timings add up into the response's `timings` object, and which requests are refused before
anything is sent. The generation loop itself runs against a real swarm in the data-plane tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peer.errors import InvalidInput
from swarm.config import ServingConfig, SwarmConfig
from swarm.entry import Entry, Request, Timings


def hop(wire_s: float, bytes_in: int, compute_s: float) -> tuple[float, int, float]:
    """One stage's trail entry: the hop into it (seconds, bytes) and its compute time."""
    return (wire_s, bytes_in, compute_s)


def entry(context: int = 32) -> Entry:
    config = SwarmConfig(serving=ServingConfig(max_concurrent_requests=2))
    transport = SimpleNamespace(handlers={}, on_link_closed=[])
    return Entry("me", config, view=None, transport=transport, tasks=None, tokenizer=None,  # type: ignore[arg-type]
                 context_tokens=context)  # fmt: skip


# ---- timings --------------------------------------------------------------------------------------


def test_add_step_sums_compute_per_stage_and_wire_per_hop_around_the_ring() -> None:
    t = Timings(started=0.0)
    t.add_step((hop(0.125, 40, 0.5), hop(0.25, 1000, 0.75)), ["a", "b"], home_wire_s=0.5, home_bytes=8)
    t.add_step((hop(0.375, 8, 0.25), hop(0.5, 1000, 0.25)), ["a", "b"], home_wire_s=0.25, home_bytes=8)
    assert t.compute_s == {"a": 0.75, "b": 1.0}
    # The token goes home from the last stage straight to the entry: the ring's last hop.
    assert t.wire_s == {"entry->a": 0.5, "a->b": 0.75, "b->entry": 0.75}
    assert t.bytes_sent == 40 + 8 + 2000 + 16


def test_add_step_names_every_hop_of_a_longer_pipeline() -> None:
    t = Timings(started=0.0)
    trail = (hop(0.0, 10, 1.0), hop(0.5, 300, 2.0), hop(0.25, 200, 4.0))
    t.add_step(trail, ["x", "y", "z"], home_wire_s=0.125, home_bytes=5)
    assert t.compute_s == {"x": 1.0, "y": 2.0, "z": 4.0}
    assert t.wire_s == {"entry->x": 0.0, "x->y": 0.5, "y->z": 0.25, "z->entry": 0.125}
    assert t.bytes_sent == 515


def test_add_step_with_a_single_stage_has_the_hop_there_and_back() -> None:
    t = Timings(started=0.0)
    for _ in range(3):
        t.add_step((hop(0.25, 16, 0.5),), ["solo"], home_wire_s=0.0, home_bytes=7)
    assert t.compute_s == {"solo": 1.5}
    assert t.wire_s == {"entry->solo": 0.75, "solo->entry": 0.0}
    assert t.bytes_sent == 3 * (16 + 7)


def test_add_step_names_stages_by_their_place_in_the_route_and_ignores_extra_entries() -> None:
    t = Timings(started=0.0)
    t.add_step((hop(0.0, 0, 1.0), hop(0.0, 0, 9.0)), ["a"], home_wire_s=0.0, home_bytes=0)
    assert t.compute_s == {"a": 1.0}  # a trail longer than the route says nothing of stages it does not have
    t.add_step((), ["a", "b"], home_wire_s=0.5, home_bytes=3)
    assert t.wire_s["b->entry"] == 0.5 and t.bytes_sent == 3


def test_to_json_computes_rates_from_the_sums() -> None:
    t = Timings(started=0.0, first_token_s=0.5, total_s=2.5, tokens=5, entry_s=0.125)
    t.add_step((hop(0.5, 20, 1.0), hop(0.5, 100, 2.0)), ["a", "b"], home_wire_s=0.0, home_bytes=0)
    assert t.to_json() == {
        "time_to_first_token_s": 0.5,
        "total_s": 2.5,
        "tokens": 5,
        "tokens_per_s": 2.0,  # 4 tokens after the first, in 2 s
        "compute_s_per_stage": {"a": 1.0, "b": 2.0},
        "wire_s_per_hop": {"entry->a": 0.5, "a->b": 0.5, "b->entry": 0.0},
        "bytes_sent": 120,
        "entry_s": 0.125,
        "communication_overhead": 0.25,  # 1 s of wire against 3 s of compute
    }


def test_to_json_rounds() -> None:
    t = Timings(started=0.0, first_token_s=1 / 3, total_s=10 / 3, tokens=3)
    t.add_step((hop(1 / 6, 0, 1 / 3),), ["a"], home_wire_s=0.0, home_bytes=0)
    out = t.to_json()
    assert out["time_to_first_token_s"] == 0.333333
    assert out["total_s"] == 3.333333
    assert out["tokens_per_s"] == 0.667  # 2 tokens in 3 s
    assert out["compute_s_per_stage"] == {"a": 0.333333}
    assert out["wire_s_per_hop"] == {"entry->a": 0.166667, "a->entry": 0.0}
    assert out["communication_overhead"] == 0.3333  # 1/6 against 1/3


@pytest.mark.parametrize(
    ("tokens", "first", "total"),
    [(0, None, 0.0), (1, 0.5, 0.5), (1, 0.5, 3.0), (2, 1.0, 1.0), (3, 2.0, 1.0)],
)
def test_to_json_has_no_rate_when_undefined(tokens: int, first: float | None, total: float) -> None:
    t = Timings(started=0.0, first_token_s=first, total_s=total, tokens=tokens)
    out = t.to_json()
    assert out["tokens_per_s"] is None
    assert out["communication_overhead"] is None  # no step was added
    assert out["compute_s_per_stage"] == {}
    assert out["wire_s_per_hop"] == {}
    assert out["bytes_sent"] == 0
    assert out["time_to_first_token_s"] == (first or 0.0)


def test_to_json_overhead_is_zero_or_one_at_the_extremes() -> None:
    only_compute = Timings(started=0.0)
    only_compute.add_step((hop(0.0, 0, 2.0),), ["a"], home_wire_s=0.0, home_bytes=0)
    assert only_compute.to_json()["communication_overhead"] == 0.0
    only_wire = Timings(started=0.0)
    only_wire.add_step((hop(1.0, 0, 0.0),), ["a"], home_wire_s=0.0, home_bytes=0)
    assert only_wire.to_json()["communication_overhead"] == 1.0


# ---- refusing requests ----------------------------------------------------------------------------


def test_check_accepts_a_request_that_fits_exactly() -> None:
    e = entry(context=32)
    e.check(Request([1] * 31, max_tokens=1))
    e.check(Request([1], max_tokens=31))
    e.check(Request([1, 2, 3], max_tokens=29))


def test_check_refuses_an_empty_prompt() -> None:
    with pytest.raises(InvalidInput, match="at least one token"):
        entry().check(Request([], max_tokens=4))


@pytest.mark.parametrize("max_tokens", [0, -1, -100])
def test_check_refuses_max_tokens_below_one(max_tokens: int) -> None:
    with pytest.raises(InvalidInput, match="max_tokens must be at least 1"):
        entry().check(Request([1, 2], max_tokens=max_tokens))


@pytest.mark.parametrize(("prompt_len", "max_tokens"), [(32, 1), (1, 32), (20, 13), (100, 1)])
def test_check_refuses_requests_over_the_context(prompt_len: int, max_tokens: int) -> None:
    with pytest.raises(InvalidInput, match="context of 32 tokens") as info:
        entry(context=32).check(Request([1] * prompt_len, max_tokens=max_tokens))
    assert f"prompt's {prompt_len} tokens" in str(info.value)
