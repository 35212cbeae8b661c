"""The layer map: which peer serves which contiguous range of the model's layers, under which
election term and epoch, for which model fingerprint. The leader makes one from the partitioner's
shares and broadcasts it; peers follow only a newer epoch. This module validates the map's shape
(hostile input included) and answers questions about it; it does not choose the ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm.errors import LayerMapError

MAX_STAGES = 256


@dataclass(frozen=True)
class Stage:
    """One peer's part of the pipeline: layers [start, end)."""

    peer_id: str
    url: str
    start: int
    end: int


@dataclass(frozen=True)
class LayerMap:
    """A complete assignment of the model's layers to peers, in pipeline order."""

    term: int  # election term of the leader that made it
    epoch: int  # bumped by every repartition; peers follow only the newest
    model: str  # fingerprint of the model every stage must serve
    num_layers: int
    stages: tuple[Stage, ...]
    leader: str = ""  # peer id of the leader that made it

    @property
    def id(self) -> str:
        """What names this map, not just its epoch: two leaders on the two sides of a partition may
        both make an epoch N, and what a stage runs must never mix them."""
        return f"{self.epoch}.{self.term}.{self.leader}"

    def __post_init__(self) -> None:
        if self.term < 0 or self.epoch < 0 or self.num_layers <= 0:
            raise LayerMapError("term and epoch must be >= 0 and num_layers > 0")
        if not 0 < len(self.stages) <= MAX_STAGES:
            raise LayerMapError(f"a layer map has 1 to {MAX_STAGES} stages, not {len(self.stages)}")
        expected = 0
        for stage in self.stages:
            if stage.start != expected or stage.end <= stage.start:
                raise LayerMapError(f"stages must cover layers contiguously from 0; got [{stage.start}, {stage.end})")
            expected = stage.end
        if expected != self.num_layers:
            raise LayerMapError(f"stages cover {expected} of {self.num_layers} layers")
        if len({s.peer_id for s in self.stages}) != len(self.stages):
            raise LayerMapError("a peer appears in more than one stage")

    def stage_of(self, peer_id: str) -> Stage | None:
        """The stage `peer_id` serves, if any."""
        return next((s for s in self.stages if s.peer_id == peer_id), None)

    def peer_ids(self) -> list[str]:
        """Peers in pipeline order."""
        return [s.peer_id for s in self.stages]

    def assignment(self) -> tuple[tuple[str, int, int], ...]:
        """(peer id, start, end) per stage: what a repartition compares."""
        return tuple((s.peer_id, s.start, s.end) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Wire and JSON form."""
        return {
            "term": self.term,
            "epoch": self.epoch,
            "model": self.model,
            "num_layers": self.num_layers,
            "leader": self.leader,
            "stages": [{"peer_id": s.peer_id, "url": s.url, "start": s.start, "end": s.end} for s in self.stages],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> LayerMap:
        """Parse a hostile wire form; raises LayerMapError on anything malformed."""
        if not isinstance(raw, dict):
            raise LayerMapError("layer map must be a mapping")
        ints = [raw.get(k) for k in ("term", "epoch", "num_layers")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in ints):
            raise LayerMapError("term, epoch and num_layers must be non-negative integers")
        model, stages, leader = raw.get("model"), raw.get("stages"), raw.get("leader")
        if not isinstance(model, str) or not isinstance(stages, list) or len(stages) > MAX_STAGES:
            raise LayerMapError("model must be a string and stages a list")
        if not isinstance(leader, str) or len(leader) > 64:
            raise LayerMapError("leader must be a peer id")
        parsed = []
        for s in stages:
            if not isinstance(s, dict):
                raise LayerMapError("each stage must be a mapping")
            peer_id, url, start, end = (s.get(k) for k in ("peer_id", "url", "start", "end"))
            if not (isinstance(peer_id, str) and isinstance(url, str) and type(start) is int and type(end) is int):
                raise LayerMapError("stage needs peer_id and url strings and integer start and end")
            parsed.append(Stage(peer_id, url, start, end))
        return cls(ints[0], ints[1], model, ints[2], tuple(parsed), leader)  # type: ignore[arg-type]


def should_follow(current: LayerMap | None, new: LayerMap, *, from_leader: bool) -> bool:
    """Whether a peer holding `current` follows `new`: a newer epoch, or from its leader a different
    map of the same epoch (two leaders that could not see each other both made one)."""
    if current is None:
        return True
    if new == current or new.epoch < current.epoch:
        return False
    return new.epoch > current.epoch or from_leader


def next_map(
    current: LayerMap | None,
    stages: tuple[Stage, ...],
    *,
    term: int,
    model: str,
    num_layers: int,
    max_epoch: int,
    leader: str = "",
) -> LayerMap | None:
    """The map a leader of `term` issues for the partition `stages`, or None to keep `current`.

    A new epoch only when the assignment (or the model) changes, or when some peer follows an epoch
    newer than ours (made by a leader we never heard of), so that every peer follows ours again;
    otherwise the leader adopts the map it found, whoever made it."""
    if current is not None and current.stages == stages and current.model == model and max_epoch <= current.epoch:
        return None
    epoch = max(max_epoch, current.epoch if current else 0) + 1
    return LayerMap(term, epoch, model, num_layers, stages, leader)
