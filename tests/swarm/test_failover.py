"""An in-flight generation survives a stage dying: three SmolLM2 peers, any two of which hold the
model; a middle stage is SIGKILLed while a greedy stream is under way. The entry peer waits for the
new layer map, replays the session's tokens through it and carries on: the stream completes, and
its text is exactly the undisturbed run's."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from swarm.cli import stream_events
from tests.swarm.procs import PeerProcess, start_seeded_swarm, write_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

CAPS_MB = {"a": 600, "b": 700, "c": 800}  # any two hold SmolLM2 in float32
PROMPT = "The history of the printing press"
MAX_TOKENS = 40


@pytest.fixture
def swarm(smollm2, tmp_path) -> Iterator[list[PeerProcess]]:
    store, _ = smollm2
    gossip = {"interval_s": 0.5, "suspect_after_s": 2.0, "dead_after_s": 4.0, "request_timeout_s": 2.0}
    config = write_config(tmp_path / "config.yaml", store.cache_dir, gossip=gossip)
    peers: list[PeerProcess] = []
    try:
        start_seeded_swarm(tmp_path, config, CAPS_MB, peers)
        yield peers
    finally:
        for p in peers:
            p.stop()


def layer_map(peer: PeerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(str(peer.url) + "/swarm/status", timeout=10) as resp:
        return json.loads(resp.read())["layer_map"]  # type: ignore[no-any-return]


def test_a_stream_survives_a_middle_stage_being_killed(swarm: list[PeerProcess]) -> None:
    stages = [s["url"] for s in layer_map(swarm[0])["stages"]]
    by_url = {p.url: p for p in swarm}
    middle, entry = by_url[stages[1]], by_url[stages[-1]]
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    request = urllib.request.Request(
        str(entry.url) + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        undisturbed = json.loads(resp.read())["choices"][0]["text"]

    pieces, finish = [], None
    for i, event in enumerate(stream_events(str(entry.url), "/v1/completions", body)):
        for choice in event.get("choices", []):
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
        if i == 5:
            middle.kill()  # SIGKILL, mid-stream: no goodbye
    assert "".join(pieces) == undisturbed
    assert finish == "length"
    after = layer_map(entry)
    assert middle.url not in [s["url"] for s in after["stages"]]
    assert "replaying" in entry.log()
