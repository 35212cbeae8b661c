"""The layer map's wire form: a round trip, every kind of hostile input refused with LayerMapError
(and nothing else, under random input), and the questions peers ask of a map."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import LayerMapError
from swarm.layer_map import MAX_STAGES, LayerMap, Stage

STAGES = (
    Stage("aaaa", "http://10.0.0.1:50051", 0, 10),
    Stage("bbbb", "http://10.0.0.2:50051", 10, 11),
    Stage("cccc", "http://10.0.0.3:50051", 11, 30),
)
MAP = LayerMap(term=3, epoch=7, model="f" * 64, num_layers=30, stages=STAGES, leader="cccc")


def wire(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(MAP.to_dict())
    raw.update(changes)
    return raw


def with_stages(*ranges: tuple[str, int, int], num_layers: int = 30) -> dict[str, Any]:
    stages = [{"peer_id": p, "url": f"http://{p}:1", "start": s, "end": e} for p, s, e in ranges]
    return wire(num_layers=num_layers, stages=stages)


def test_to_dict_from_dict_round_trip() -> None:
    raw = MAP.to_dict()
    assert raw == {
        "term": 3,
        "epoch": 7,
        "model": "f" * 64,
        "num_layers": 30,
        "leader": "cccc",
        "stages": [
            {"peer_id": "aaaa", "url": "http://10.0.0.1:50051", "start": 0, "end": 10},
            {"peer_id": "bbbb", "url": "http://10.0.0.2:50051", "start": 10, "end": 11},
            {"peer_id": "cccc", "url": "http://10.0.0.3:50051", "start": 11, "end": 30},
        ],
    }
    assert LayerMap.from_dict(raw) == MAP


def test_maps_of_one_epoch_by_two_leaders_have_different_ids() -> None:
    """Two leaders on the two sides of a partition may both make epoch N: the id tells them apart."""
    other = dataclasses.replace(MAP, leader="bbbb")
    assert other.epoch == MAP.epoch and other.id != MAP.id
    assert dataclasses.replace(MAP, term=4).id != MAP.id
    assert LayerMap.from_dict(MAP.to_dict()).id == MAP.id


def test_single_stage_map() -> None:
    one = LayerMap.from_dict(with_stages(("solo", 0, 30)))
    assert one.assignment() == (("solo", 0, 30),)


def test_extra_stage_fields_are_ignored() -> None:
    """Status adds "ready" to each stage; the map itself does not carry it."""
    raw = wire()
    for stage in raw["stages"]:
        stage["ready"] = True
    assert LayerMap.from_dict(raw) == MAP


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in MAP.to_dict().items() if k != key}


INTS = "term, epoch and num_layers"
SHAPE = "model must be a string and stages a list"
CONTIGUOUS = "contiguously from 0"
MANY = [(f"p{i}", i, i + 1) for i in range(MAX_STAGES + 1)]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (None, "must be a mapping"),
        ([], "must be a mapping"),
        ("map", "must be a mapping"),
        (without("term"), INTS),
        (without("epoch"), INTS),
        (without("num_layers"), INTS),
        (without("model"), SHAPE),
        (without("stages"), SHAPE),
        (without("leader"), "leader must be a peer id"),
        (wire(leader=5), "leader must be a peer id"),
        (wire(leader="x" * 65), "leader must be a peer id"),
        (wire(term=True), INTS),
        (wire(epoch=False), INTS),
        (wire(num_layers=True), INTS),
        (wire(term=-1), INTS),
        (wire(epoch=-1), INTS),
        (wire(term=2**63), INTS),
        (wire(epoch=1.0), INTS),
        (wire(num_layers="30"), INTS),
        (wire(num_layers=0), "num_layers > 0"),
        (wire(model=None), SHAPE),
        (wire(model=5), SHAPE),
        (wire(stages={}), SHAPE),
        (wire(stages="aaaa"), SHAPE),
        (wire(stages=[]), "1 to 256 stages, not 0"),
        (wire(stages=[None]), "each stage must be a mapping"),
        (wire(stages=[["aaaa", "u", 0, 30]]), "each stage must be a mapping"),
        (with_stages(("aaaa", 0, 10), ("bbbb", 12, 30)), CONTIGUOUS),  # gap
        (with_stages(("aaaa", 0, 12), ("bbbb", 10, 30)), CONTIGUOUS),  # overlap
        (with_stages(("aaaa", 1, 30)), CONTIGUOUS),  # not from 0
        (with_stages(("aaaa", -1, 30)), CONTIGUOUS),
        (with_stages(("aaaa", 0, 10), ("bbbb", 10, 10), ("cccc", 10, 30)), CONTIGUOUS),  # empty stage
        (with_stages(("aaaa", 0, 10), ("bbbb", 10, 5), ("cccc", 5, 30)), CONTIGUOUS),  # backwards
        (with_stages(("aaaa", 0, 10), ("cccc", 20, 30), ("bbbb", 10, 20)), CONTIGUOUS),  # out of order
        (with_stages(("aaaa", 0, 29)), "cover 29 of 30"),  # short of num_layers
        (with_stages(("aaaa", 0, 31)), "cover 31 of 30"),  # past num_layers
        (with_stages(("aaaa", 0, 10), ("aaaa", 10, 30)), "more than one stage"),
        (with_stages(*MANY, num_layers=MAX_STAGES + 1), SHAPE),  # too many stages
    ],
)
def test_from_dict_rejects_hostile_input(raw: Any, match: str) -> None:
    with pytest.raises(LayerMapError, match=match):
        LayerMap.from_dict(raw)


@pytest.mark.parametrize(
    "stage",
    [
        {"peer_id": 1, "url": "u", "start": 0, "end": 30},
        {"peer_id": "a", "url": None, "start": 0, "end": 30},
        {"peer_id": "a", "url": "u", "start": False, "end": 30},
        {"peer_id": "a", "url": "u", "start": 0, "end": True},
        {"peer_id": "a", "url": "u", "start": 0.0, "end": 30},
        {"peer_id": "a", "url": "u", "start": 0, "end": "30"},
        {"peer_id": "a", "url": "u", "start": 0},
        {"url": "u", "start": 0, "end": 30},
    ],
)
def test_from_dict_rejects_bad_stage_fields(stage: dict[str, Any]) -> None:
    with pytest.raises(LayerMapError, match="stage needs"):
        LayerMap.from_dict(wire(stages=[stage]))


def test_the_most_stages_allowed() -> None:
    raw = with_stages(*MANY[:MAX_STAGES], num_layers=MAX_STAGES)
    assert len(LayerMap.from_dict(raw).stages) == MAX_STAGES


def test_constructor_checks_the_same_rules() -> None:
    with pytest.raises(LayerMapError, match="cover 29 of 30"):
        LayerMap(0, 0, "m", 30, (Stage("a", "u", 0, 29),))
    with pytest.raises(LayerMapError, match="more than one stage"):
        LayerMap(0, 0, "m", 2, (Stage("a", "u", 0, 1), Stage("a", "u", 1, 2)))
    with pytest.raises(LayerMapError, match="1 to 256 stages, not 257"):
        LayerMap(0, 0, "m", 257, tuple(Stage(p, "u", s, e) for p, s, e in MANY))


def test_stage_of_and_assignment() -> None:
    assert MAP.stage_of("bbbb") == STAGES[1]
    assert MAP.stage_of("cccc") == Stage("cccc", "http://10.0.0.3:50051", 11, 30)
    assert MAP.stage_of("nobody") is None
    assert MAP.peer_ids() == ["aaaa", "bbbb", "cccc"]
    assert MAP.assignment() == (("aaaa", 0, 10), ("bbbb", 10, 11), ("cccc", 11, 30))


def test_assignment_ignores_term_epoch_and_urls() -> None:
    moved = LayerMap.from_dict(
        wire(term=9, epoch=8, stages=[{**s, "url": "http://elsewhere:1"} for s in MAP.to_dict()["stages"]])
    )
    assert moved != MAP
    assert moved.assignment() == MAP.assignment()
    reshaped = LayerMap.from_dict(with_stages(("aaaa", 0, 11), ("bbbb", 11, 12), ("cccc", 12, 30)))
    assert reshaped.assignment() != MAP.assignment()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=12,
)


@st.composite
def wire_maps(draw: st.DrawFn) -> dict[str, Any]:
    """The wire form of a valid map: random cut points over 1..8 layers."""
    n = draw(st.integers(1, 8))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    stages = [
        {"peer_id": f"p{i}", "url": f"http://p{i}:1", "start": a, "end": b}
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    return {"term": draw(st.integers(0, 9)), "epoch": draw(st.integers(0, 9)), "model": "m", "num_layers": n,
            "stages": stages, "leader": draw(st.sampled_from(["", "p0", "other"]))}  # fmt: skip


def check_complete(parsed: LayerMap) -> None:
    covered = [layer for s in parsed.stages for layer in range(s.start, s.end)]
    assert covered == list(range(parsed.num_layers))
    assert len(set(parsed.peer_ids())) == len(parsed.stages)
    assert all(parsed.stage_of(s.peer_id) == s for s in parsed.stages)


@settings(max_examples=100, deadline=None)
@given(wire_maps())
def test_every_valid_wire_map_round_trips(raw: dict[str, Any]) -> None:
    parsed = LayerMap.from_dict(raw)
    check_complete(parsed)
    assert parsed.to_dict() == raw


@settings(max_examples=200, deadline=None)
@given(wire_maps(), st.data())
def test_one_hostile_value_gives_a_complete_map_or_layer_map_error(raw: dict[str, Any], data: st.DataObject) -> None:
    value = data.draw(st.integers(-1, 9) | JSON)
    if data.draw(st.booleans()):
        raw[data.draw(st.sampled_from(sorted(raw)))] = value
    else:
        stage = data.draw(st.sampled_from(raw["stages"]))
        stage[data.draw(st.sampled_from(sorted(stage)))] = value
    try:
        parsed = LayerMap.from_dict(raw)
    except LayerMapError:
        return
    check_complete(parsed)


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_arbitrary_json_is_a_layer_map_error(raw: Any) -> None:
    with pytest.raises(LayerMapError):
        LayerMap.from_dict(raw)
