"""What must hold when peers differ, die or stop, on three SmolLM2 peers (one computing in
bfloat16, the others in float32) and a fourth that holds no layers and takes the requests: the
mixed swarm serves (hidden states are cast at the stage boundary); when the entry peer dies
mid-generation the stages drop its sessions as soon as its death is known, not at idle eviction;
SIGTERM stops an idle peer at once and a busy one within its grace, its stream ending with an
error."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from peer.errors import SwarmError
from swarm.cli import stream_events
from swarm.daemon import SHUTDOWN_GRACE_S
from tests.swarm.procs import PeerProcess, start_seeded_swarm, wait_for, write_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

CAPS_MB = {"a": 400, "b": 450, "c": 500}  # the three stages (any two would hold SmolLM2)
STANDBY_MB = 1  # too small for one layer: it holds none and only takes requests
IDLE_EXIT_S = 3.0  # the promise: an idle peer is gone this soon after SIGTERM
SETTLE_S = 120.0


@pytest.fixture(scope="module")
def swarm(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store, _ = smollm2
    tmp = tmp_path_factory.mktemp("lifecycle")
    config = write_config(tmp / "config.yaml", store.cache_dir)
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers, extra_by_name={"b": ("--dtype", "bfloat16")})
        yield {"tmp": tmp, "config": config, "peers": peers, "status": status}
    finally:
        for p in peers:
            p.stop()


def entry_peer(swarm: dict[str, Any], name: str) -> PeerProcess:
    """A peer with no layers that joins the swarm and takes requests."""
    tmp, seed = swarm["tmp"], swarm["peers"][0]
    args = ["--config", str(swarm["config"]), "--port", "0", "--max-memory-mb", str(STANDBY_MB), "--no-mdns"]
    args += ["--state-dir", str(tmp / name), "--swarm-key-file", str(tmp / "swarm.key")]
    args += ["--join", str(seed.url).removeprefix("http://")]
    peer = PeerProcess(name, args, tmp).start()
    peer.wait_url()
    wait_for(lambda: (s := peer.status()) and s["ready"], SETTLE_S, f"{name} to see a ready swarm", peer.log)
    return peer


def metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"swarm_{name} ") or line.startswith(f"swarm_{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def stage_urls(swarm: dict[str, Any]) -> list[str]:
    return [s["url"] for s in swarm["status"]["layer_map"]["stages"]]


def complete(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        found: dict[str, Any] = json.loads(resp.read())
    return found


class Stream:
    """A long greedy stream in a thread: how many chunks arrived and how it ended."""

    def __init__(self, url: str) -> None:
        self.chunks = 0
        self.ending = ""
        self.first = threading.Event()
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        self.thread = threading.Thread(target=self._run, args=(url, body))
        self.thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        try:
            for _ in stream_events(url, "/v1/completions", body, timeout_s=300):
                self.chunks += 1
                self.first.set()
            self.ending = "done"
        except SwarmError as e:
            self.ending = f"error: {e}"
        finally:
            self.first.set()


def test_a_bfloat16_peer_serves_in_a_float32_swarm(swarm) -> None:
    peers: list[PeerProcess] = swarm["peers"]
    dtypes = {p["node_id"]: p for p in peers[0].status()["peers"]}  # type: ignore[index]
    assert {n: dtypes[n]["dtype"] for n in CAPS_MB} == {"a": "float32", "b": "bfloat16", "c": "float32"}
    for p in peers:
        answer = complete(str(p.url), "The future of AI is", 8)
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"], answer
    said = "computes in bfloat16, this peer in float32: hidden states between them are cast"
    assert said in peers[0].log() or said in peers[2].log()


def test_stages_drop_the_sessions_of_an_entry_peer_that_dies(swarm) -> None:
    entry = entry_peer(swarm, "entry")
    stages = stage_urls(swarm)
    stream = Stream(str(entry.url))
    try:
        assert stream.first.wait(SETTLE_S) and stream.chunks > 0, stream.ending
        assert all((metric(u, "stage_sessions") or 0) >= 1 for u in stages)
        dropped = [metric(u, "stage_sessions_dropped_total") or 0 for u in stages]
        entry.kill(signal.SIGKILL)
        # Well before the stages' idle eviction (executor.session_idle_timeout_s, 300 s): on its death.
        wait_for(lambda: all(metric(u, "stage_sessions") == 0 for u in stages), 60, "the stages to drop its sessions")
        assert all((metric(u, "stage_sessions_dropped_total") or 0) > d for u, d in zip(stages, dropped, strict=True))
        assert all("whose entry peer" in p.log() for p in swarm["peers"])
    finally:
        entry.kill(signal.SIGKILL)
        stream.thread.join(timeout=SETTLE_S)


def test_sigterm_stops_an_idle_peer_at_once_and_a_busy_one_within_its_grace(swarm) -> None:
    idle = entry_peer(swarm, "idle")
    assert idle.proc is not None
    t0 = time.monotonic()
    idle.proc.terminate()
    assert idle.proc.wait(timeout=IDLE_EXIT_S) == 0, idle.log()
    idle_s = time.monotonic() - t0

    busy = entry_peer(swarm, "busy")
    assert busy.proc is not None
    stream = Stream(str(busy.url))
    try:
        assert stream.first.wait(SETTLE_S) and stream.chunks > 0, stream.ending
        t0 = time.monotonic()
        busy.proc.terminate()
        assert busy.proc.wait(timeout=SHUTDOWN_GRACE_S + IDLE_EXIT_S) == 0, busy.log()
        busy_s = time.monotonic() - t0
        stream.thread.join(timeout=SETTLE_S)
        assert stream.ending.startswith("error"), stream.ending  # an explicit end, not a hang or a cut
    finally:
        busy.kill(signal.SIGKILL)
        stream.thread.join(timeout=SETTLE_S)
    print(f"SIGTERM: idle peer gone in {idle_s:.2f} s, busy peer in {busy_s:.2f} s")
