"""Helpers for tests that run real `swarm-peer` processes on 127.0.0.1 (the process handling
itself is `swarm.local`, shared with the chaos and bench scripts): fast control-plane timings and
a config file that uses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from swarm.local import PeerProcess, start_seeded_swarm, wait_for

__all__ = ["FAST", "PeerProcess", "start_seeded_swarm", "wait_for", "write_config"]

# Shrunk control-plane timings: a test swarm settles in seconds instead of tens of seconds.
FAST = {
    "gossip": {"interval_s": 0.25, "suspect_after_s": 1.5, "dead_after_s": 3.0, "request_timeout_s": 1.0},
    "election": {"startup_grace_s": 1.5, "timeout_min_s": 0.4, "timeout_max_s": 0.8, "coordinator_timeout_s": 2.0},
    "partition": {"kv_reserve_tokens": 64},
}


def write_config(path: Path, cache_dir: Path, **sections: dict[str, Any]) -> Path:
    """A config file with the fast timings, a private model cache and any extra sections."""
    raw: dict[str, Any] = {k: dict(v) for k, v in FAST.items()}
    raw["store"] = {"cache_dir": str(cache_dir)}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path
