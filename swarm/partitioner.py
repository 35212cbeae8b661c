"""The partitioner: given the peers' usable memory and a model profile, it splits the decoder layers into
contiguous stages in proportion to each peer's layer capacity (largest-remainder rounding), with the
embeddings on the first stage and the final norm and LM head on the last, and checks every stage against
its peer's memory for weights plus a KV-cache reserve. It is a pure function of its inputs: it knows
nothing of addresses, terms, epochs or which layers a peer already holds (the layer map and the leader
deal with those), and it does not weigh compute speed or network links, only memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peer.profile import ModelProfile
from swarm.errors import SwarmTooSmall


@dataclass(frozen=True)
class Candidate:
    """A live peer offered to the partitioner."""

    peer_id: str
    usable_bytes: int  # memory for weights plus KV cache


@dataclass(frozen=True)
class Share:
    """One stage of the partition: `peer_id` serves layers [start, end)."""

    peer_id: str
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive


def partition(candidates: Sequence[Candidate], profile: ModelProfile, kv_reserve_tokens: int) -> tuple[Share, ...]:
    """Split the model's layers over `candidates` in pipeline order; raise SwarmTooSmall if they cannot hold it."""
    num_layers = profile.num_layers
    # Every layer is costed as the one whose KV reserve is largest (a sliding-window layer reserves at
    # most its window), so any contiguous share of them fits where this count says it does: a model
    # whose layers all slide reserves its window a layer, one with global layers their whole reserve.
    layer_reserve = max((profile.kv_bytes(i, i + 1, kv_reserve_tokens) for i in range(num_layers)), default=0)
    layer_cost = profile.layer_bytes + layer_reserve
    if num_layers < 1 or kv_reserve_tokens < 0 or layer_cost < 1:
        raise ValueError("partition needs num_layers >= 1, kv_reserve_tokens >= 0 and layers that take memory")
    if len({c.peer_id for c in candidates}) != len(candidates):
        raise ValueError("duplicate peer ids among the candidates")

    # Rank by size (ties by id); no layout has more stages than layers, so only the num_layers largest are
    # placed. A peer that cannot hold one layer where it is placed stands by and the rest are placed again;
    # one that fails at an end is the largest left for that end, so no smaller peer could hold it instead.
    pool = sorted(candidates, key=lambda c: (-c.usable_bytes, c.peer_id))
    while True:
        stages = _pipeline_order(pool[:num_layers])
        caps = [_capacity(peer, i, len(stages), profile, layer_cost) for i, peer in enumerate(stages)]
        if all(caps):
            break
        idle = {peer.peer_id for peer, cap in zip(stages, caps, strict=True) if cap == 0}
        pool = [peer for peer in pool if peer.peer_id not in idle]

    if sum(caps) < num_layers:
        needed = profile.total_weight_bytes + num_layers * layer_reserve
        available = sum(max(0, c.usable_bytes) for c in candidates)
        detail = f"{sum(caps)} of {num_layers} layers fit" if candidates else "no peers"
        raise SwarmTooSmall(needed, available, detail)

    # Middle peers whose share rounds to zero stand by and the layers are shared again. That moves no end,
    # so the others' capacities stand, and as they held every layer within them they still can. Ends never
    # round to zero (see _apportion): dropping one would move its table onto a smaller peer.
    while True:
        shares = _apportion(caps, num_layers)
        if all(shares):
            break
        stages = [peer for peer, share in zip(stages, shares, strict=True) if share]
        caps = [cap for cap, share in zip(caps, shares, strict=True) if share]

    result, start = [], 0
    for peer, share in zip(stages, shares, strict=True):
        result.append(Share(peer.peer_id, start, start + share))
        start += share
    return tuple(result)


def _pipeline_order(ranked: Sequence[Candidate]) -> list[Candidate]:
    """Largest peer first, second largest last, the rest between in rank order."""
    if len(ranked) < 2:
        return list(ranked)
    return [ranked[0], *ranked[2:], ranked[1]]


def _capacity(peer: Candidate, position: int, count: int, profile: ModelProfile, layer_cost: int) -> int:
    """How many layers `peer` can hold at `position` of `count` stages, besides embeddings or head."""
    if count == 1:  # both ends: a tied table is held once
        fixed = profile.total_weight_bytes - profile.num_layers * profile.layer_bytes
    elif position == 0:
        fixed = profile.embedding_bytes
    elif position == count - 1:
        fixed = profile.norm_bytes + profile.head_bytes
    else:
        fixed = 0
    return max(0, (peer.usable_bytes - fixed) // layer_cost)


def _apportion(caps: Sequence[int], num_layers: int) -> list[int]:
    """Largest-remainder shares of `num_layers` in proportion to `caps`, with each end holding at least one."""
    # An end must serve (it holds the embeddings or the head, and a smaller peer would hold fewer layers
    # there), so an end whose ideal is under one layer is pinned at one and the others share the rest.
    ends = {0, len(caps) - 1}
    pinned: set[int] = set()
    while True:
        free = [i for i in range(len(caps)) if i not in pinned]
        layers, total = num_layers - len(pinned), sum(caps[i] for i in free)
        low = {i for i in free if i in ends and layers * caps[i] < total}
        if not low:
            break
        pinned |= low
    # Ideal t_i = layers * cap_i / total, with total >= layers: it holds at the start (the caller checks
    # sum(caps) >= num_layers) and pinning keeps it, as a pinned end's cap_i < total / layers. Hence
    # t_i <= cap_i, and when t_i is fractional floor(t_i) + 1 <= cap_i because cap_i is an integer, so
    # giving floor(t_i) to every peer and one more to the largest remainders never exceeds a capacity.
    # The leftover count is a sum of fractional parts, so it is less than the number of fractional t_i.
    shares = [1 if i in pinned else layers * cap // total for i, cap in enumerate(caps)]
    left = layers - sum(shares[i] for i in free)
    for i in sorted(free, key=lambda i: (-(layers * caps[i] % total), i))[:left]:
        shares[i] += 1
    return shares
