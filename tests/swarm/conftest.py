"""Fixtures shared by the swarm's test modules: one three-peer swarm of `swarm-peer` processes on
127.0.0.1 serving the embedded SmolLM2-135M-Instruct, started once per test session for every
module that drives a real swarm through its public API (the data plane, OpenAI compatibility)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from swarm.auth import load_swarm_key
from tests.swarm.procs import PeerProcess, start_seeded_swarm, write_config

# Memory caps that give the three peers stages of different sizes: [0, a), [a, b), [b, 30).
SMOLLM2_CAPS_MB = {"a": 300, "b": 600, "c": 900}


@pytest.fixture(scope="session")
def smollm2_swarm(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three peers, ready; their URLs in pipeline order, the swarm key, the model files and status."""
    store, files = smollm2
    tmp = tmp_path_factory.mktemp("swarm3")
    # The default gossip timings: under the heavy compute of these tests a peer must not look dead.
    gossip = {"interval_s": 1.0, "suspect_after_s": 3.0, "dead_after_s": 6.0, "request_timeout_s": 2.0}
    config = write_config(tmp / "config.yaml", store.cache_dir, gossip=gossip)
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, SMOLLM2_CAPS_MB, peers)
        stages = [s["url"] for s in status["layer_map"]["stages"]]
        yield {"stages": stages, "key": load_swarm_key(tmp / "swarm.key"), "files": files, "status": status}
    finally:
        for p in peers:
            p.stop()
