"""The partitioner on random profiles and swarms: every layer placed once, no peer over its memory,
shares within a layer of the memory-proportional ideal, embeddings first and head last, tiny peers
standing by, the same answer whatever the input order, and SwarmTooSmall exactly when no choice of
peers can hold the model. The ideal and the capacities are re-derived here from the profile."""

from __future__ import annotations

import dataclasses
import itertools
import re
from fractions import Fraction
from random import Random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peer.profile import ModelProfile
from swarm.errors import SwarmTooSmall
from swarm.partitioner import Candidate, Share, partition

MIB = 1024 * 1024
SETTINGS = settings(max_examples=200, deadline=None)
Swarm = tuple[ModelProfile, int, list[Candidate]]
PEER_IDS = [f"peer-{c}" for c in "abcdefghijkl"]


def layer_cost(profile: ModelProfile, tokens: int) -> int:
    """Bytes of one decoder layer plus its KV-cache reserve: the largest of any layer's, as sliding
    layers reserve at most their window."""
    return profile.layer_bytes + max(profile.kv_bytes(i, i + 1, tokens) for i in range(profile.num_layers))


def in_pipeline_order(peers: list[Candidate]) -> list[Candidate]:
    """The ordering rule: largest first, second largest last, the rest between by size then id."""
    ranked = sorted(peers, key=lambda c: (-c.usable_bytes, c.peer_id))
    return ranked if len(ranked) < 2 else [ranked[0], *ranked[2:], ranked[1]]


def capacities(stages: list[Candidate], profile: ModelProfile, tokens: int) -> list[int]:
    """Layers each peer can hold in its place, besides the embeddings (first) or norm and head (last)."""
    n, count = profile.num_layers, len(stages)
    caps = []
    for i, peer in enumerate(stages):
        if count == 1:
            fixed = profile.stage_weight_bytes(0, n) - n * profile.layer_bytes
        elif i == 0:
            fixed = profile.stage_weight_bytes(0, 1) - profile.layer_bytes
        elif i == count - 1:
            fixed = profile.stage_weight_bytes(n - 1, n) - profile.layer_bytes
        else:
            fixed = 0
        caps.append(max(0, (peer.usable_bytes - fixed) // layer_cost(profile, tokens)))
    return caps


def ideal(caps: list[int], num_layers: int) -> list[Fraction]:
    """num_layers * cap_i / sum(caps); an end under one layer is pinned at one and the rest share what is left."""
    pinned: set[int] = set()
    while True:
        free = [i for i in range(len(caps)) if i not in pinned]
        layers, total = num_layers - len(pinned), sum(caps[i] for i in free)
        t = [Fraction(1) if i in pinned else Fraction(layers * cap, total) for i, cap in enumerate(caps)]
        low = {i for i in (0, len(caps) - 1) if i not in pinned and t[i] < 1}
        if not low:
            return t
        pinned |= low


def fits(peers: tuple[Candidate, ...], profile: ModelProfile, tokens: int) -> bool:
    """Whether exactly these peers, placed by the ordering rule, can hold the model with non-empty stages."""
    if len(peers) > profile.num_layers:
        return False
    caps = capacities(in_pipeline_order(list(peers)), profile, tokens)
    return min(caps) >= 1 and sum(caps) >= profile.num_layers


@st.composite
def swarms(draw: st.DrawFn) -> Swarm:
    """A random profile, KV reserve and 1 to 8 peers, some too small for one layer, some of equal size."""
    embedding = draw(st.integers(0, 20_000))
    tied = draw(st.booleans())
    num_layers = draw(st.integers(1, 80))
    windows = st.lists(st.one_of(st.none(), st.integers(1, 64)), min_size=num_layers, max_size=num_layers)
    profile = ModelProfile(
        num_layers=num_layers,
        hidden_size=64,
        vocab_size=100,
        max_position_embeddings=2048,
        dtype=torch.float32,
        tied_embeddings=tied,
        layer_bytes=draw(st.integers(1, 1_000)),
        embedding_bytes=embedding,
        norm_bytes=draw(st.integers(0, 100)),
        head_bytes=embedding if tied else draw(st.integers(0, 20_000)),
        kv_bytes_per_token_per_layer=draw(st.integers(0, 50)),
        layer_windows=tuple(draw(st.one_of(st.just([]), windows))),
    )
    tokens = draw(st.integers(0, 64))
    cost = layer_cost(profile, tokens)
    whole = profile.total_weight_bytes + profile.kv_bytes(0, profile.num_layers, tokens)
    ids = draw(st.lists(st.sampled_from(PEER_IDS), min_size=1, max_size=8, unique=True))
    share = whole // len(ids)
    usable = st.one_of(
        st.integers(0, cost - 1),  # too small for one layer anywhere
        st.integers(0, 3 * share),  # the swarm as a whole holds the model about half the time
        st.sampled_from([cost, share, 2 * share, whole]),  # repeats make ties in size
    )
    return profile, tokens, [Candidate(peer_id, draw(usable)) for peer_id in ids]


def try_partition(swarm: Swarm) -> tuple[Share, ...] | None:
    """The partition, or None where the swarm is too small."""
    profile, tokens, candidates = swarm
    try:
        return partition(candidates, profile, tokens)
    except SwarmTooSmall:
        return None


def stage_need(profile: ModelProfile, share: Share, tokens: int) -> int:
    """Bytes of weights plus KV reserve the stage holds."""
    return profile.stage_weight_bytes(share.start, share.end) + profile.kv_bytes(share.start, share.end, tokens)


def check_every_layer_once_in_order(shares: tuple[Share, ...], num_layers: int) -> None:
    """Contiguous non-empty ranges from layer 0 to the last, one per peer."""
    assert shares[0].start == 0 and shares[-1].end == num_layers  # embeddings first, head last
    for before, after in itertools.pairwise(shares):
        assert before.end == after.start
    assert all(s.start < s.end for s in shares)
    assert len({s.peer_id for s in shares}) == len(shares)


def check_within_memory(
    shares: tuple[Share, ...], by_id: dict[str, Candidate], profile: ModelProfile, tokens: int
) -> None:
    """No stage needs more than its peer's usable bytes; embeddings count on the first, norm and head on the last."""
    assert all(stage_need(profile, s, tokens) <= by_id[s.peer_id].usable_bytes for s in shares)
    cost = layer_cost(profile, tokens)
    if len(shares) > 1:  # what the partitioner counts: equal to the need, or above it where layers slide
        first, last = shares[0], shares[-1]
        bounds = [(first, profile.embedding_bytes), *((s, 0) for s in shares[1:-1]),
                  (last, profile.norm_bytes + profile.head_bytes)]  # fmt: skip
        for share, fixed in bounds:
            need, counted = stage_need(profile, share, tokens), fixed + (share.end - share.start) * cost
            assert need <= counted if profile.layer_windows else need == counted


def check_order_and_standby(shares: tuple[Share, ...], swarm: Swarm) -> None:
    """Serving peers follow the ordering rule, no more stages than layers, a peer under one layer stands by."""
    profile, tokens, candidates = swarm
    by_id = {c.peer_id: c for c in candidates}
    serving = [by_id[s.peer_id] for s in shares]
    assert serving == in_pipeline_order(serving)
    assert len(shares) <= profile.num_layers
    tiny = {c.peer_id for c in candidates if c.usable_bytes < layer_cost(profile, tokens)}
    assert not tiny & {s.peer_id for s in shares}


def check_near_ideal(shares: tuple[Share, ...], swarm: Swarm) -> None:
    """Each share within one layer of its memory-proportional ideal over the serving peers."""
    profile, tokens, candidates = swarm
    by_id = {c.peer_id: c for c in candidates}
    caps = capacities([by_id[s.peer_id] for s in shares], profile, tokens)
    targets = ideal(caps, profile.num_layers)
    for share, target, cap in zip(shares, targets, caps, strict=True):
        assert abs((share.end - share.start) - target) < 1
        assert share.end - share.start <= cap
    plain = [Fraction(profile.num_layers * cap, sum(caps)) for cap in caps]
    if plain[0] >= 1 and plain[-1] >= 1:  # no end pinned: exactly num_layers * cap_i / sum(caps)
        assert targets == plain


@SETTINGS
@given(swarms(), st.randoms(use_true_random=False))
def test_layouts_are_complete_within_memory_proportional_and_deterministic(swarm: Swarm, rng: Random) -> None:
    profile, tokens, candidates = swarm
    shares = try_partition(swarm)
    assume(shares is not None)
    assert shares is not None
    check_every_layer_once_in_order(shares, profile.num_layers)
    check_within_memory(shares, {c.peer_id: c for c in candidates}, profile, tokens)
    check_order_and_standby(shares, swarm)
    check_near_ideal(shares, swarm)
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    assert try_partition(swarm) == shares
    assert try_partition((profile, tokens, shuffled)) == shares


@SETTINGS
@given(swarms())
def test_too_small_exactly_when_no_choice_of_peers_holds_the_model(swarm: Swarm) -> None:
    profile, tokens, candidates = swarm
    possible = any(
        fits(subset, profile, tokens)
        for size in range(1, len(candidates) + 1)
        for subset in itertools.combinations(candidates, size)
    )
    try:
        partition(candidates, profile, tokens)
    except SwarmTooSmall as e:
        assert not possible
        assert try_partition((profile, tokens, candidates[::-1])) is None
        needed = profile.total_weight_bytes + profile.num_layers * (layer_cost(profile, tokens) - profile.layer_bytes)
        available = sum(c.usable_bytes for c in candidates)
        assert (e.needed_bytes, e.available_bytes) == (needed, available)
        assert str(needed) in str(e) and str(available) in str(e)
        fitting = re.search(r"(\d+) of (\d+) layers fit", str(e))  # the placed peers' capacities in layers
        assert fitting is not None and int(fitting[1]) < int(fitting[2]) == profile.num_layers
    else:
        assert possible


def flat_profile(num_layers: int, layer_bytes: int, embedding_bytes: int = 0, head_bytes: int = 0) -> ModelProfile:
    """A hand-sized untied profile with no norm bytes and no KV cache."""
    return ModelProfile(
        num_layers=num_layers,
        hidden_size=8,
        vocab_size=10,
        max_position_embeddings=16,
        dtype=torch.float32,
        tied_embeddings=False,
        layer_bytes=layer_bytes,
        embedding_bytes=embedding_bytes,
        norm_bytes=0,
        head_bytes=head_bytes,
        kv_bytes_per_token_per_layer=0,
    )


def smollm2_profile() -> ModelProfile:
    """SmolLM2-135M's shape (its config's fields; the profile builds one layer on the meta device)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return ModelProfile.from_config(config, torch.float32)


def test_smollm2_over_three_peers_is_split_by_memory() -> None:
    profile = smollm2_profile()
    peers = [Candidate("small", 512 * MIB), Candidate("medium", 1024 * MIB), Candidate("large", 2048 * MIB)]
    shares = partition(peers, profile, kv_reserve_tokens=2048)
    # Largest first (embeddings), second largest last (norm and head), the smallest between: about 4:1:2.
    assert [s.peer_id for s in shares] == ["large", "small", "medium"]
    assert [s.end - s.start for s in shares] == [17, 5, 8]
    assert partition(list(reversed(peers)), profile, kv_reserve_tokens=2048) == shares


def test_smollm2_on_one_peer_keeps_one_tied_table() -> None:
    profile = smollm2_profile()
    need = profile.total_weight_bytes + profile.kv_bytes(0, 30, 1024)
    assert partition([Candidate("only", need)], profile, 1024) == (Share("only", 0, 30),)
    with pytest.raises(SwarmTooSmall, match=str(need)):
        partition([Candidate("only", need - 1)], profile, 1024)


def test_smollm2_too_small_swarm_names_the_bytes() -> None:
    profile = smollm2_profile()
    peers = [Candidate(f"p{i}", 64 * MIB) for i in range(3)]
    with pytest.raises(SwarmTooSmall) as raised:
        partition(peers, profile, 2048)
    assert raised.value.available_bytes == 3 * 64 * MIB
    assert str(3 * 64 * MIB) in str(raised.value) and "layers fit" in str(raised.value)
    with pytest.raises(SwarmTooSmall, match="no peers"):
        partition([], profile, 2048)


def test_an_end_below_one_layer_is_kept_where_benching_it_would_not_fit() -> None:
    # Equal peers, each with room for one layer beside a large embedding or head and six in the middle:
    # the ideal is 3/8, 9/4, 3/8, but benching an end would move its table onto a peer with no room left.
    profile = flat_profile(3, layer_bytes=100, embedding_bytes=500, head_bytes=500)
    peers = [Candidate(name, 600) for name in "abc"]
    assert partition(peers, profile, 0) == (Share("a", 0, 1), Share("c", 1, 2), Share("b", 2, 3))


def test_a_middle_peer_whose_share_rounds_to_zero_stands_by() -> None:
    profile = flat_profile(4, layer_bytes=100)
    peers = [Candidate("big1", 1000), Candidate("big2", 1000), Candidate("big3", 1000), Candidate("tiny", 100)]
    shares = partition(peers, profile, 0)
    assert "tiny" not in {s.peer_id for s in shares}
    assert [s.end - s.start for s in shares] == [2, 1, 1]


def test_sliding_layers_reserve_only_their_window() -> None:
    """Layers that all slide over 4 positions reserve 4 positions of KV cache, not the 2048 asked for:
    two peers that hold the model with windows do not without."""
    windowed = dataclasses.replace(flat_profile(8, 100), kv_bytes_per_token_per_layer=10, layer_windows=(4,) * 8)
    peers = [Candidate("a", 4 * 140), Candidate("b", 4 * 140)]
    assert [(s.start, s.end) for s in partition(peers, windowed, 2048)] == [(0, 4), (4, 8)]
    with pytest.raises(SwarmTooSmall):
        partition(peers, dataclasses.replace(windowed, layer_windows=()), 2048)
    mixed = dataclasses.replace(windowed, layer_windows=(4, None) * 4)  # one global layer: all cost as it does
    with pytest.raises(SwarmTooSmall):
        partition(peers, mixed, 2048)


def test_duplicate_peer_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        partition([Candidate("a", 10**9), Candidate("a", 10**9)], smollm2_profile(), 0)
