"""Peers on separate hosts of the network test bed (`swarm.testbed`: network namespaces on a switch,
198.18.0.0/15). The README's several-machines command, exactly, on three hosts forms one swarm and
answers a fourth host token for token as Hugging Face does; a host cut off is left out and taken
back when its link returns; all of it with a default route, and with none and a second interface
that no other host reaches. A copy of a peer's identity is refused. Five peers split 3/2 and 4/1:
the side that can hold the model serves, the other answers 503, no request is lost, and after the
split heals one leader and one map remain. Skipped where namespaces cannot be made (not root)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peer.profile import ModelProfile
from peer.resources import MIB
from swarm.auth import write_new_swarm_key
from swarm.config import SwarmConfig, convergence_bound_s, swarm_config_from_dict
from swarm.errors import SwarmTooSmall
from swarm.partitioner import Candidate, partition
from swarm.testbed import Host, TestBed
from tests.helpers import hf_greedy
from tests.swarm.procs import (
    PeerProcess,
    agreement,
    bed_or_skip,
    describe,
    machine_env,
    shared_cache,
    stream_completion,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

PROMPTS = ["The future of AI is", "Paris is the capital of", "def fibonacci(n):"]
MAX_TOKENS = 24  # long enough for a request to be in flight while a link goes
SETTLE_S = 240.0  # generous: peers importing torch and loading layers on two cores
LOAD_ALLOWANCE_S = 90.0  # beside the convergence bound: loading the layers that moved, on a busy machine
README_COMMAND = ["--host", "0.0.0.0", "--swarm-key-file", "swarm.key"]  # README: several machines
BEDS = {
    "default-route": {"default_route": True},
    "no-route-second-interface": {"default_route": False, "second_interface": True},
}


def default_config() -> SwarmConfig:
    from peer.config import default_config_path, read_config_file

    return swarm_config_from_dict(read_config_file(default_config_path()))


@pytest.fixture(scope="module")
def reference(smollm2) -> dict[str, str]:
    """Hugging Face's greedy continuation of each prompt, as text (and, under "tokens", token by token)."""
    from peer.tokenizer import Tokenizer

    _, files = smollm2
    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    ids = hf_greedy(files, PROMPTS, MAX_TOKENS)
    out: dict[str, Any] = {p: tokenizer.decode(ids[p], skip_special_tokens=True) for p in PROMPTS}
    out["tokens"] = {p: [tokenizer.decode([t], skip_special_tokens=False) for t in ids[p]] for p in PROMPTS}
    return out


def machine(host: Host, tmp: Path, cache: Path, name: str | None = None) -> tuple[Path, dict[str, str]]:
    """The home directory (holding a copy of the swarm key) and environment of a separate machine."""
    home = tmp / (name or host.name)
    home.mkdir(exist_ok=True)
    shutil.copy(tmp / "swarm.key", home / "swarm.key")
    return home, machine_env(home, cache)


def readme_peer(
    host: Host, tmp: Path, cache: Path, extra: tuple[str, ...] = (), name: str | None = None
) -> PeerProcess:
    home, env = machine(host, tmp, cache, name)
    argv = [*README_COMMAND, *extra]
    return PeerProcess(name or host.name, argv, tmp, host=host, env=env, cwd=home, named=False)


@pytest.fixture(scope="module", params=list(BEDS))
def readme(request, smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three hosts running exactly the README's several-machines command, formed into one swarm; a
    fourth host to ask from."""
    store, _ = smollm2
    tmp = tmp_path_factory.mktemp(f"bed-{request.param}")
    bed = bed_or_skip(4, **BEDS[request.param])
    peers: list[PeerProcess] = []
    try:
        write_new_swarm_key(tmp / "swarm.key")
        cache = shared_cache(tmp, store.cache_dir)
        peers += [readme_peer(host, tmp, cache).start() for host in bed.hosts[:3]]
        for p in peers:
            p.wait_url()
        wait_for(lambda: agreement(peers, 3), SETTLE_S, "three hosts to form one swarm", lambda: describe(peers))
        yield {"bed": bed, "peers": peers, "tmp": tmp, "cache": cache, "kind": request.param}
    finally:
        for p in peers:
            p.stop()
        bed.close()


def complete_from(host: Host, url: str, prompt: str) -> tuple[int, Any]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1}
    return host.post_json(url + "/v1/completions", body)


def test_three_hosts_form_one_swarm_at_addresses_the_others_reach(readme) -> None:
    peers: list[PeerProcess] = readme["peers"]
    view = agreement(peers, 3)
    assert view is not None, describe(peers)
    # Each peer advertises its address on the switch: not loopback, not the unreachable dock0.
    where = {p.status()["peer_id"]: p.host.address for p in peers}  # type: ignore[index, union-attr]
    for stage in view["layer_map"]["stages"]:
        assert stage["url"] == f"http://{where[stage['peer_id']]}:50051", stage
    for p in peers:
        assert "Traceback" not in p.log(), p.log()


def test_a_fourth_host_gets_hugging_faces_tokens(readme, reference) -> None:
    client, peers = readme["bed"].hosts[3], readme["peers"]
    for prompt, peer in zip(PROMPTS, peers, strict=True):  # every peer takes prompts
        status, body = complete_from(client, str(peer.url), prompt)
        assert status == 200, body
        assert body["choices"][0]["logprobs"]["tokens"] == reference["tokens"][prompt], prompt  # token for token
        assert body["choices"][0]["text"] == reference[prompt], prompt


def test_swarm_status_finds_a_peer_over_mdns_from_another_host(readme) -> None:
    client = readme["bed"].hosts[3]
    cli = str(Path(sys.executable).parent / "swarm")
    done = subprocess.run(client.command([cli, "status"]), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "swarm of 3 live peer(s)" in done.stdout and "READY (3 stage(s)" in done.stdout, done.stdout


def test_a_cut_host_is_left_out_and_taken_back_when_its_link_returns(readme, reference) -> None:
    bed: TestBed = readme["bed"]
    peers: list[PeerProcess] = readme["peers"]
    client, victim = bed.hosts[3], bed.hosts[2]
    bed.cut(victim)
    try:
        wait_for(lambda: agreement(peers[:2], 2), SETTLE_S, "the two others to serve alone", lambda: describe(peers))
        status, body = complete_from(client, str(peers[0].url), PROMPTS[0])
        assert status == 200 and body["choices"][0]["text"] == reference[PROMPTS[0]], body
    finally:
        bed.heal(victim)
    healed = time.monotonic()
    bound = convergence_bound_s(default_config())
    view = wait_for(lambda: agreement(peers, 3), bound + LOAD_ALLOWANCE_S, "one swarm again", lambda: describe(peers))
    took = time.monotonic() - healed
    print(f"[{readme['kind']}] converged {took:.1f} s after the link returned (bound {bound:.1f} s + loading)")
    assert len({s["peer_id"] for s in view["layer_map"]["stages"]}) == 3


def test_a_copied_identity_is_refused_and_the_original_keeps_its_place(readme) -> None:
    if readme["kind"] != "default-route":
        pytest.skip("once is enough")
    bed: TestBed = readme["bed"]
    peers: list[PeerProcess] = readme["peers"]
    tmp, cache = readme["tmp"], readme["cache"]
    original = peers[0]
    before = wait_for(lambda: agreement(peers, 3), SETTLE_S, "one swarm", lambda: describe(peers))
    peer_id = original.status()["peer_id"]  # type: ignore[index]

    # With mDNS (the default) the copy's announcement collides with the original's.
    copy = readme_peer(bed.hosts[3], tmp, cache, name="copy-mdns")
    shutil.copytree(tmp / original.name / "state", tmp / copy.name / "state", dirs_exist_ok=True)
    copy.start()
    assert copy.proc is not None and copy.proc.wait(timeout=SETTLE_S) == 2, copy.log()
    assert f"peer id {peer_id} is already announced" in copy.log() and "Traceback" not in copy.log(), copy.log()

    # Without mDNS, joining a member: the member asks the original, which answers, and refuses the copy.
    joined = peers[1]
    copy = readme_peer(bed.hosts[3], tmp, cache, ("--no-mdns", "--join", f"{joined.host.address}:50051"), "copy-join")  # type: ignore[union-attr]
    shutil.copytree(tmp / original.name / "state", tmp / copy.name / "state", dirs_exist_ok=True)
    copy.start()
    assert copy.proc is not None and copy.proc.wait(timeout=SETTLE_S) == 2, copy.log()
    said = f"peer id {peer_id} is alive at {original.url}; was its identity key copied?"
    assert said in copy.log() and "Traceback" not in copy.log(), copy.log()
    assert said in joined.log(), joined.log()

    after = wait_for(lambda: agreement(peers, 3), SETTLE_S, "the same swarm", lambda: describe(peers))
    assert after["layer_map"] == before["layer_map"] and after["leader"] == before["leader"]
    # Not locked out: the original restarts (a higher incarnation) and takes its place again.
    original.stop()
    original.start().wait_url()
    wait_for(lambda: agreement(peers, 3), SETTLE_S, "the original back", lambda: describe(peers))


# ---- five peers, split and healed -------------------------------------------------------------------


def split_caps_mb(files: Any) -> int:
    """A memory cap with which three peers hold the model and two do not."""
    profile = ModelProfile.from_config(files.load_config(), torch.float32)

    def holds(n: int, cap: int) -> bool:
        try:
            partition([Candidate(f"p{i}", cap * MIB) for i in range(n)], profile, KV_RESERVE_TOKENS)
        except SwarmTooSmall:
            return False
        return True

    fits = [cap for cap in range(100, 1000, 5) if holds(3, cap) and not holds(2, cap)]
    return fits[len(fits) // 2]


KV_RESERVE_TOKENS = 64  # as in procs.FAST


@pytest.fixture(scope="module")
def five(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Five peers on five hosts (fast timings, mDNS, caps such that any three hold the model and
    no two do), and a sixth host to ask from."""
    store, files = smollm2
    tmp = tmp_path_factory.mktemp("bed-five")
    bed = bed_or_skip(6)
    peers: list[PeerProcess] = []
    try:
        write_new_swarm_key(tmp / "swarm.key")
        cache = shared_cache(tmp, store.cache_dir)
        config = write_config(tmp / "config.yaml", Path(store.cache_dir), serving={"recovery_timeout_s": 30.0})
        cap = split_caps_mb(files)
        for host in bed.hosts[:5]:
            home, env = machine(host, tmp, cache)
            argv = ["--host", "0.0.0.0", "--config", str(config), "--swarm-key-file", "swarm.key"]
            argv += ["--max-memory-mb", str(cap)]
            peers.append(PeerProcess(host.name, argv, tmp, host=host, env=env, cwd=home).start())
        for p in peers:
            p.wait_url()
        wait_for(lambda: agreement(peers, 5), SETTLE_S, "five hosts to form one swarm", lambda: describe(peers))
        yield {"bed": bed, "peers": peers, "config": swarm_config_from_dict(yaml.safe_load(config.read_text()))}
    finally:
        for p in peers:
            p.stop()
        bed.close()


class Watch:
    """Every status polled during a test: terms never go back on a peer, and no two peers of one
    side lead the same term (Bully has no quorum: across sides of a split, two may)."""

    def __init__(self, peers: list[PeerProcess]) -> None:
        self.peers = peers
        self.terms: dict[str, int] = {}
        self.leaders: dict[int, dict[str, str]] = {}  # term -> peer id -> the side it led from
        self.violations: list[str] = []

    def poll(self, sides: dict[str, str]) -> None:
        for p in self.peers:
            s = p.status()
            if s is None:
                continue
            if s["term"] < self.terms.get(p.name, 0):
                self.violations.append(f"{p.name}'s term went back from {self.terms[p.name]} to {s['term']}")
            self.terms[p.name] = s["term"]
            if s["role"] == "leader":
                self.leaders.setdefault(s["term"], {})[s["peer_id"]] = sides[p.name]
        for term, who in self.leaders.items():
            for side in set(who.values()):
                if sum(v == side for v in who.values()) > 1:
                    self.violations.append(f"two leaders of term {term} on side {side}: {who}")

    def until(self, predicate: Any, sides: dict[str, str], timeout_s: float, what: str) -> Any:
        def polled() -> Any:
            self.poll(sides)
            return predicate()

        return wait_for(polled, timeout_s, what, lambda: describe(self.peers))


def split_and_heal(five: dict[str, Any], reference: dict[str, str], majority: int) -> None:
    bed: TestBed = five["bed"]
    peers: list[PeerProcess] = five["peers"]
    client = bed.hosts[5]
    big, small = peers[:majority], peers[majority:]
    sides = {p.name: ("big" if p in big else "small") for p in peers}
    watch = Watch(peers)
    watch.until(lambda: agreement(peers, 5), sides, SETTLE_S, "one swarm of five")

    # Requests in flight on both sides, from a host on each side, as the split happens.
    body = {"max_tokens": MAX_TOKENS, "temperature": 0}
    asks = [(client, big[0]), (client, big[-1]), (small[0].host, small[0]), (small[-1].host, small[-1])]
    flights = [
        (prompt, asker.submit(stream_completion, str(peer.url), {**body, "prompt": prompt}, 300.0))  # type: ignore[union-attr]
        for (asker, peer), prompt in zip(asks, PROMPTS + PROMPTS, strict=False)
    ]
    bed.split([[p.host for p in big] + [client], [p.host for p in small]])  # type: ignore[misc]
    try:
        watch.until(lambda: agreement(big, majority), sides, SETTLE_S, f"the side of {majority} to serve")
        status, answer = complete_from(client, str(big[0].url), PROMPTS[0])
        assert status == 200 and answer["choices"][0]["text"] == reference[PROMPTS[0]], answer
        asker = small[0].host
        assert asker is not None
        status, answer = complete_from(asker, str(small[0].url), PROMPTS[0])
        assert status == 503 and "cannot hold the model" in answer["error"]["message"], answer
    finally:
        bed.join()
    healed = time.monotonic()
    bound = convergence_bound_s(five["config"])
    after = watch.until(lambda: agreement(peers, 5), sides, bound + LOAD_ALLOWANCE_S, "one swarm of five again")
    print(
        f"split {majority}/{5 - majority}: converged {time.monotonic() - healed:.1f} s after healing "
        f"(bound {bound:.1f} s + loading); epoch {after['layer_map']['epoch']}, term {after['term']}"
    )
    for prompt, flight in flights:
        text, endings = flight.result(timeout=SETTLE_S)
        finals = [e for e in endings if e != "[DONE]"]
        assert len(finals) == 1, (prompt, endings)  # ended exactly once
        if finals[0].startswith("finish"):
            assert endings[-1] == "[DONE]" and text == reference[prompt], (prompt, text)
        else:
            assert finals[0].startswith(("error", "http")), (prompt, endings)  # explicit, never lost
    assert not watch.violations, watch.violations


def test_five_peers_split_three_two_and_heal(five, reference) -> None:
    split_and_heal(five, reference, 3)


def test_five_peers_split_four_one_and_heal(five, reference) -> None:
    split_and_heal(five, reference, 4)
