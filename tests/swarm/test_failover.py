"""In-flight generations survive faults: three SmolLM2 peers, any two of which hold the model,
and a greedy stream that is disturbed mid-way by SIGKILL of the first, a middle or the last stage
or of the leader, by a stage paused past the dead timeout, or by a fourth peer joining. The entry
peer waits for the new layer map, replays the session's tokens through it and carries on: every
stream completes with exactly the undisturbed run's text. When the survivors cannot hold the
model, the stream and new requests end with a clear 503, and restarting the peers restores it."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peer.errors import SwarmError
from swarm.cli import stream_events
from tests.swarm.procs import PeerProcess, start_seeded_swarm, wait_for, write_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

CAPS_MB = {"a": 400, "b": 450, "c": 500}  # any two hold SmolLM2 in float32; none alone
GOSSIP = {"interval_s": 0.5, "suspect_after_s": 2.0, "dead_after_s": 4.0, "request_timeout_s": 2.0}
SERVING = {"recovery_timeout_s": 30.0, "hop_check_after_s": 1.0}
PROMPT = "The history of the printing press"
MAX_TOKENS = 40
CLIENT_TIMEOUT_S = 120  # a stream that stalls longer than this has hung

_undisturbed: dict[int, str] = {}  # max_tokens -> text of an undisturbed run (same swarm shape)


class Swarm:
    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.peers: list[PeerProcess] = []

    def by_url(self, url: str) -> PeerProcess:
        return next(p for p in self.peers if p.url == url)

    def stage_peers(self) -> list[PeerProcess]:
        return [self.by_url(s["url"]) for s in status(self.peers[0])["layer_map"]["stages"]]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in self.peers)


@pytest.fixture
def swarm(smollm2, tmp_path) -> Iterator[Swarm]:
    store, _ = smollm2
    config = write_config(tmp_path / "config.yaml", store.cache_dir, gossip=GOSSIP, serving=SERVING)
    s = Swarm(tmp_path, config)
    try:
        start_seeded_swarm(tmp_path, config, CAPS_MB, s.peers)
        yield s
    finally:
        for p in s.peers:
            p.stop()


def status(peer: PeerProcess) -> dict[str, Any]:
    found = peer.status(timeout_s=10)
    assert found is not None, f"{peer.name} does not answer:\n{peer.log()[-2000:]}"
    return found


def body(max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


def complete(peer: PeerProcess, max_tokens: int = MAX_TOKENS) -> str:
    request = urllib.request.Request(
        str(peer.url) + "/v1/completions",
        data=json.dumps(body(max_tokens)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as resp:
        return json.loads(resp.read())["choices"][0]["text"]  # type: ignore[no-any-return]


def undisturbed(peer: PeerProcess, max_tokens: int = MAX_TOKENS) -> str:
    if max_tokens not in _undisturbed:
        _undisturbed[max_tokens] = complete(peer, max_tokens)
    return _undisturbed[max_tokens]


def stream(entry: PeerProcess, fault: Callable[[], None], after: int = 5, max_tokens: int = MAX_TOKENS) -> str:
    """Stream a greedy completion from `entry`, calling `fault` once `after` chunks have arrived;
    the whole text, once the stream has finished with finish_reason "length"."""
    pieces, finish = [], None
    events = stream_events(str(entry.url), "/v1/completions", body(max_tokens), timeout_s=CLIENT_TIMEOUT_S)
    for i, event in enumerate(events):
        for choice in event.get("choices", []):
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
        if i == after:
            fault()
    assert finish == "length"
    return "".join(pieces)


def sessions_open(peer: PeerProcess) -> int:
    with urllib.request.urlopen(str(peer.url) + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("swarm_stage_sessions "):
                return int(float(line.split()[1]))
    raise AssertionError("no swarm_stage_sessions in /metrics")


def assert_no_sessions_left(peers: list[PeerProcess], swarm: Swarm) -> None:
    """Every session was closed or dropped with its epoch (idle eviction would take 300 s)."""
    wait_for(lambda: all(sessions_open(p) == 0 for p in peers), 30, "every stage to drop its sessions", swarm.logs)


@pytest.mark.parametrize("victim", ["first", "middle", "last", "leader"])
def test_a_stream_survives_a_stage_being_killed(swarm: Swarm, victim: str) -> None:
    stages = swarm.stage_peers()
    before = status(swarm.peers[0])
    leader = next(p for p in swarm.peers if p.status() and status(p)["peer_id"] == before["leader"])
    killed = {"first": stages[0], "middle": stages[1], "last": stages[-1], "leader": leader}[victim]
    entry = next(p for p in swarm.peers if p is not killed)
    expected = undisturbed(entry)

    assert stream(entry, killed.kill) == expected  # SIGKILL mid-stream: no goodbye

    after = status(entry)
    assert killed.url not in [s["url"] for s in after["layer_map"]["stages"]]
    assert after["layer_map"]["epoch"] > before["layer_map"]["epoch"]
    assert "replaying" in entry.log()
    if victim == "leader":
        assert after["term"] > before["term"] and after["leader"] != before["leader"]
    survivors = [p for p in swarm.peers if p is not killed]
    assert_no_sessions_left(survivors, swarm)


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "inventor": {"type": "string", "maxLength": 40},
    },
    "required": ["title", "year", "inventor"],
    "additionalProperties": False,
}


def test_a_constrained_generation_resumes_exactly_on_a_new_last_stage(swarm: Swarm) -> None:
    """The grammar's state, the penalties' counts and the log-probabilities all live at the last
    stage: killed mid-stream, its successor rebuilds them from the replayed tokens, and the reply is
    the undisturbed one, token for token and log-probability for log-probability."""
    stages = swarm.stage_peers()
    killed, entry = stages[-1], stages[0]
    chat = {"messages": [{"role": "user", "content": "Describe the printing press as JSON."}], "max_tokens": 60,
            "temperature": 0, "frequency_penalty": 0.5, "logprobs": True, "top_logprobs": 2,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "invention", "schema": SCHEMA}}}  # fmt: skip

    def run(fault: Callable[[], None] | None) -> tuple[str, list[Any]]:
        text, logprobs = "", []
        events = stream_events(str(entry.url), "/v1/chat/completions", chat, timeout_s=CLIENT_TIMEOUT_S)
        for i, event in enumerate(events):
            for choice in event.get("choices", []):
                text += choice["delta"].get("content") or ""
                logprobs += (choice.get("logprobs") or {"content": []})["content"]
            if i == 4 and fault is not None:
                fault()
        return text, logprobs

    expected = run(None)
    value = json.loads(expected[0])
    assert set(value) == {"title", "year", "inventor"}
    disturbed = run(killed.kill)
    assert disturbed[0] == expected[0]
    assert [t["token"] for t in disturbed[1]] == [t["token"] for t in expected[1]]
    for a, b in zip(disturbed[1], expected[1], strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert "replaying" in entry.log()
    assert killed.url not in [s["url"] for s in status(entry)["layer_map"]["stages"]]


def test_a_paused_stage_past_the_dead_timeout_rejoins_cleanly(swarm: Swarm) -> None:
    stages = swarm.stage_peers()
    paused, entry = stages[1], stages[-1]
    paused_id = status(paused)["peer_id"]
    incarnation = status(paused)["incarnation"]
    expected = undisturbed(entry)

    def declared_dead() -> bool:
        return any(p["peer_id"] == paused_id and p["state"] == "dead" for p in status(entry)["peers"])

    def resume_once_dead() -> None:
        try:
            wait_for(declared_dead, 60, "the paused peer to be declared dead", swarm.logs)
        finally:
            paused.signal(signal.SIGCONT)

    resumer = threading.Thread(target=resume_once_dead)

    def pause() -> None:
        paused.signal(signal.SIGSTOP)
        resumer.start()

    try:
        assert stream(entry, pause) == expected
    finally:
        resumer.join(timeout=90)

    # It rejoins: a higher incarnation, a stage again in one map that every peer follows, each peer
    # listed once, and its sessions of the abandoned epoch gone.
    def converged() -> list[dict[str, Any]] | None:
        found = [p.status() for p in swarm.peers]
        if not all(found):
            return None
        maps = {json.dumps(s["layer_map"]["stages"], sort_keys=True) for s in found if s and s["layer_map"]}
        whole = all(s and s["ready"] and len(s["layer_map"]["stages"]) == 3 for s in found)
        return found if whole and len(maps) == 1 else None  # type: ignore[return-value]

    found = wait_for(converged, 60, "all three peers to follow one ready map", swarm.logs)
    for s in found:
        ids = [p["peer_id"] for p in s["peers"]]
        assert len(ids) == len(set(ids)) == 3
        assert all(p["state"] == "alive" for p in s["peers"])
    assert status(paused)["incarnation"] > incarnation
    assert_no_sessions_left(swarm.peers, swarm)
    # Nothing is corrupted: the same request, through the rejoined peer, gives the same text.
    assert complete(paused) == expected


def test_a_fourth_peer_joining_mid_generation_repartitions_and_the_stream_carries_on(swarm: Swarm) -> None:
    max_tokens = 160  # long enough for the newcomer to start, join and load while it runs
    entry = swarm.peers[0]
    expected = undisturbed(entry, max_tokens)
    args = ["--config", str(swarm.config), "--port", "0", "--max-memory-mb", "900", "--no-mdns"]
    args += ["--state-dir", str(swarm.tmp / "d"), "--swarm-key-file", str(swarm.tmp / "swarm.key")]
    args += ["--join", str(entry.url).removeprefix("http://")]
    newcomer = PeerProcess("d", args, swarm.tmp)
    swarm.peers.append(newcomer)

    assert stream(entry, newcomer.start, after=1, max_tokens=max_tokens) == expected

    newcomer.wait_url()
    after = status(entry)
    assert newcomer.url in [s["url"] for s in after["layer_map"]["stages"]]
    assert "replaying" in entry.log(), "the newcomer was not in the map before the generation ended"


def test_when_the_model_no_longer_fits_requests_get_a_clear_503_and_service_returns(swarm: Swarm) -> None:
    entry, victims = swarm.peers[0], swarm.peers[1:]  # a (400 MiB) cannot hold the model alone
    expected = undisturbed(entry)

    def kill_both() -> None:
        for p in victims:
            p.kill()

    with pytest.raises(SwarmError, match="cannot hold the model") as failed:
        stream(entry, kill_both)
    assert "MiB" in str(failed.value)

    request = urllib.request.Request(
        str(entry.url) + "/v1/completions",
        data=json.dumps(body()).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S)
    assert refused.value.code == 503
    error = json.loads(refused.value.read())["error"]
    assert "cannot hold the model" in error["message"] and error["code"] == "swarm_not_ready"

    for p in victims:  # back with the same state: the same peers, higher incarnations
        p.start().wait_url()
    wait_for(lambda: status(entry)["ready"] and len(status(entry)["layer_map"]["stages"]) == 3, 120,
             "the restarted peers to be back in a ready map", swarm.logs)  # fmt: skip
    assert complete(entry) == expected
