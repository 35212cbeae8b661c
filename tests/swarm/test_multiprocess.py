"""Real `swarm-peer` processes on 127.0.0.1: three peers with different memory caps find each other
(over mDNS bound to 127.0.0.1, or with --no-mdns and --join seeds), elect the highest-ranked peer,
agree on one layer map proportional to their caps and each load exactly their layers; then peers
are SIGKILLed and restarted and the swarm heals, as every peer's /swarm/status shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer.profile import ModelProfile
from peer.resources import MIB
from swarm.auth import write_new_swarm_key
from swarm.partitioner import Candidate, partition
from tests.swarm.procs import PeerProcess, wait_for, write_config

pytestmark = pytest.mark.timeout(300)

KV_RESERVE_TOKENS = 64  # as in procs.FAST
SETTLE_S = 90.0  # generous: three processes importing torch on two cores


@pytest.fixture
def model_dir(tiny_llama) -> Path:
    # 12 layers of about 1 MiB each, so MiB caps split them visibly.
    return tiny_llama(layers=12, hidden=128, intermediate=512, vocab=256)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def base_args(tmp_path: Path, model_dir: Path, name: str, cap_mb: int) -> list[str]:
    config = tmp_path / "config.yaml"
    if not config.exists():
        write_config(config, tmp_path / "cache")
        write_new_swarm_key(tmp_path / "swarm.key")  # a swarm of its own, whatever else runs here
    return [
        "--config", str(config),
        "--host", "127.0.0.1",
        "--port", "0",
        "--model", str(model_dir),
        "--max-memory-mb", str(cap_mb),
        "--state-dir", str(tmp_path / f"state-{name}"),
        "--swarm-key-file", str(tmp_path / "swarm.key"),
    ]  # fmt: skip


def statuses(procs: list[PeerProcess]) -> list[dict[str, Any] | None]:
    return [p.status() for p in procs]


def describe(procs: list[PeerProcess]) -> str:
    lines = []
    for p in procs:
        s = p.status()
        brief = {k: s.get(k) for k in ("node_id", "leader", "term", "ready", "layer_map")} if s else None
        lines.append(f"{p.name}: {brief}\n--- log tail:\n{p.log()[-1500:]}")
    return "\n".join(lines)


def converged(procs: list[PeerProcess]) -> list[dict[str, Any]] | None:
    """Every peer answers, all agree on leader, term and layer map, each holds its stage, all ready."""
    got = statuses(procs)
    if any(s is None for s in got):
        return None
    ss: list[dict[str, Any]] = got  # type: ignore[assignment]
    first = ss[0]
    if first["layer_map"] is None or first["leader"] is None:
        return None
    # Settled means the Bully outcome too: a lower-ranked leader elected before the others were
    # known is only a passing state.
    top = max((p["priority"], p["peer_id"]) for s in ss for p in s["peers"] if p["state"] != "dead")[1]
    for s in ss:
        if not s["ready"] or (s["leader"], s["term"]) != (top, first["term"]):
            return None
        if strip_ready(s["layer_map"]) != strip_ready(first["layer_map"]):
            return None
        stage = next((st for st in s["layer_map"]["stages"] if st["peer_id"] == s["peer_id"]), None)
        loaded = s["loaded"]
        if stage is None:
            if loaded is not None:
                return None
        elif loaded is None or (loaded["start"], loaded["end"]) != (stage["start"], stage["end"]):
            return None
    return ss


def strip_ready(layer_map: dict[str, Any]) -> dict[str, Any]:
    return {**layer_map, "stages": [{k: v for k, v in s.items() if k != "ready"} for s in layer_map["stages"]]}


def check_layer_map(ss: list[dict[str, Any]], caps_mb: dict[str, int], model_dir: Path) -> None:
    """The map is the partition of the model over the live peers' caps, in proportion to them."""
    from transformers import AutoConfig

    profile = ModelProfile.from_config(AutoConfig.from_pretrained(model_dir))
    ids = {s["node_id"]: s["peer_id"] for s in ss}
    expected = partition(
        [Candidate(ids[name], cap * MIB) for name, cap in caps_mb.items() if name in ids], profile, KV_RESERVE_TOKENS
    )
    stages = ss[0]["layer_map"]["stages"]
    assert [(s["peer_id"], s["start"], s["end"]) for s in stages] == [(e.peer_id, e.start, e.end) for e in expected]
    # Bigger caps hold more layers.
    share = {s["peer_id"]: s["end"] - s["start"] for s in stages}
    by_cap = sorted((caps_mb[name], share.get(pid, 0)) for name, pid in ids.items())
    assert [n for _, n in by_cap] == sorted(n for _, n in by_cap), by_cap


def check_common(ss: list[dict[str, Any]], caps_mb: dict[str, int], model_dir: Path) -> None:
    top = max(s["peer_id"] for s in ss)  # equal priorities: the highest peer id ranks first
    assert all(s["leader"] == top for s in ss)
    for s in ss:
        alive = {p["node_id"] for p in s["peers"] if p["state"] == "alive"}
        assert alive >= {t["node_id"] for t in ss}
        assert {p["node_id"]: p["memory_mb"] for p in s["peers"] if p["node_id"] in caps_mb} == {
            p["node_id"]: caps_mb[p["node_id"]] for p in s["peers"] if p["node_id"] in caps_mb
        }
    check_layer_map(ss, caps_mb, model_dir)


CAPS_MB = {"small": 4, "medium": 8, "large": 12}


def test_three_peers_find_each_other_over_mdns(tmp_path: Path, model_dir: Path, peers: list[PeerProcess]) -> None:
    for name, cap in CAPS_MB.items():
        args = [*base_args(tmp_path, model_dir, name, cap), "--mdns-interface", "127.0.0.1"]
        peers.append(PeerProcess(name, args, tmp_path).start())
    for p in peers:
        p.wait_url()
    ss = wait_for(lambda: converged(peers), SETTLE_S, "one ready layer map on all peers", lambda: describe(peers))
    check_common(ss, CAPS_MB, model_dir)
    # mDNS found them: nobody was given a seed.
    assert all("--join" not in p.args for p in peers)
    for p in peers:
        assert "mDNS: announcing" in p.log()


def start_seeded(tmp_path: Path, model_dir: Path, caps_mb: dict[str, int], peers: list[PeerProcess]) -> None:
    """Start the first named peer, then the others with it as their --join seed; no mDNS."""
    names = list(caps_mb)
    first = PeerProcess(names[0], [*base_args(tmp_path, model_dir, names[0], caps_mb[names[0]]), "--no-mdns"], tmp_path)
    peers.append(first.start())
    seed = first.wait_url().removeprefix("http://")
    for name in names[1:]:
        args = [*base_args(tmp_path, model_dir, name, caps_mb[name]), "--no-mdns", "--join", seed]
        peers.append(PeerProcess(name, args, tmp_path).start())
    for p in peers:
        p.wait_url()


def test_three_peers_join_by_seed_without_mdns(tmp_path: Path, model_dir: Path, peers: list[PeerProcess]) -> None:
    start_seeded(tmp_path, model_dir, {"large": 12, "small": 4, "medium": 8}, peers)
    ss = wait_for(lambda: converged(peers), SETTLE_S, "one ready layer map on all peers", lambda: describe(peers))
    check_common(ss, CAPS_MB, model_dir)
    for p in peers:
        assert "mDNS" not in p.log()


def test_killed_peers_are_replaced_and_a_restarted_peer_rejoins(
    tmp_path: Path, model_dir: Path, peers: list[PeerProcess]
) -> None:
    # Every cap holds the whole model, so the swarm keeps serving down to one peer.
    caps = {"a": 24, "b": 32, "c": 40}
    start_seeded(tmp_path, model_dir, caps, peers)
    ss = wait_for(lambda: converged(peers), SETTLE_S, "the first layer map", lambda: describe(peers))
    check_common(ss, caps, model_dir)
    by_id = {s["peer_id"]: p for s, p in zip(ss, peers, strict=True)}
    leader_id, term0, epoch0 = ss[0]["leader"], ss[0]["term"], ss[0]["layer_map"]["epoch"]
    leader = by_id[leader_id]
    staged = [st["peer_id"] for st in ss[0]["layer_map"]["stages"]]
    victim = by_id[next(pid for pid in staged if pid != leader_id)]
    victim_id = next(pid for pid, p in by_id.items() if p is victim)

    # 1. SIGKILL a non-leader stage: the survivors mark it dead and the leader repartitions.
    victim.kill()
    survivors = [p for p in peers if p is not victim]

    def repartitioned() -> list[dict[str, Any]] | None:
        ss = converged(survivors)
        if not ss or ss[0]["layer_map"]["epoch"] <= epoch0:
            return None
        dead = all(any(q["peer_id"] == victim_id and q["state"] == "dead" for q in s["peers"]) for s in ss)
        return ss if dead else None

    ss = wait_for(repartitioned, SETTLE_S, "repartition without the killed stage", lambda: describe(survivors))
    assert victim_id not in [st["peer_id"] for st in ss[0]["layer_map"]["stages"]]
    assert ss[0]["leader"] == leader_id and ss[0]["term"] == term0
    check_layer_map(ss, {p.name: caps[p.name] for p in survivors}, model_dir)
    epoch1 = ss[0]["layer_map"]["epoch"]

    # 2. SIGKILL the leader: the last peer elects itself with a higher term and serves alone.
    leader.kill()
    (last,) = [p for p in survivors if p is not leader]

    def new_leader() -> list[dict[str, Any]] | None:
        ss = converged([last])
        return ss if ss and ss[0]["term"] > term0 and ss[0]["leader"] == ss[0]["peer_id"] else None

    ss = wait_for(new_leader, SETTLE_S, "a new leader with a higher term", lambda: describe([last]))
    term1 = ss[0]["term"]
    assert ss[0]["layer_map"]["epoch"] > epoch1

    # 3. Restart the old leader with its state directory: a higher incarnation, layers again, and
    #    (as the highest-ranked peer) the lead again, with a higher term.
    old_incarnation = next(q["incarnation"] for q in ss[0]["peers"] if q["peer_id"] == leader_id)
    assert last.url is not None
    # Its first seed is dead now: point it at the survivor instead.
    leader.args = [*leader.args[: leader.args.index("--no-mdns")], "--no-mdns", "--join", last.url[len("http://") :]]
    leader.start().wait_url()
    pair = [last, leader]

    def rejoined() -> list[dict[str, Any]] | None:
        ss = converged(pair)
        if not ss or ss[0]["term"] <= term1:
            return None
        return ss if leader_id in [st["peer_id"] for st in ss[0]["layer_map"]["stages"]] else None

    ss = wait_for(rejoined, SETTLE_S, "the restarted peer to rejoin and lead", lambda: describe(pair))
    assert all(s["leader"] == leader_id for s in ss)
    restarted = next(s for s in ss if s["peer_id"] == leader_id)
    assert restarted["incarnation"] > old_incarnation
    seen = next(q for q in ss[0]["peers"] if q["peer_id"] == leader_id)
    assert seen["incarnation"] == restarted["incarnation"] and seen["state"] == "alive"
    check_layer_map(ss, {p.name: caps[p.name] for p in pair}, model_dir)
