"""Helpers for tests that run real `swarm-peer` processes, on 127.0.0.1 or on the hosts of the
network test bed (the process handling itself is `swarm.local`, shared with the chaos and bench
scripts): fast control-plane timings and a config file that uses them, the environment of a
separate machine, the check that peers agree on one swarm, and a streamed completion."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from swarm.local import FAST_TIMINGS, PeerProcess, start_seeded_swarm, wait_for
from swarm.local import stream_completion as stream_text
from swarm.local import write_config as write_config_file
from swarm.testbed import TestBed, unavailable

__all__ = ["FAST", "PeerProcess", "start_seeded_swarm", "wait_for", "write_config"]

FAST = FAST_TIMINGS  # the one set of shrunk timings (swarm.local), shared with the chaos run


def write_config(path: Path, cache_dir: Path, **sections: dict[str, Any]) -> Path:
    """A config file with the fast timings, a private model cache and any extra sections."""
    return write_config_file(path, store={"cache_dir": str(cache_dir)}, **sections)


# ---- the network test bed ----------------------------------------------------------------------------


def bed_or_skip(hosts: int, **options: bool) -> TestBed:
    """A started test bed of `hosts` hosts, or a skip naming why this machine cannot make one."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    return TestBed(hosts, **options).start()


def machine_env(home: Path, cache_root: Path) -> dict[str, str]:
    """The environment of a peer on a machine of its own: its own state directory (identity, term),
    and the model cache at `cache_root`/swarm-inference, the default cache location under it."""
    return {"XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(cache_root), "HOME": str(home)}


def shared_cache(tmp: Path, store_cache: Path) -> Path:
    """A cache root whose default model cache is `store_cache` (already holding the embedded model:
    test-bed hosts cannot reach a package index to fetch it)."""
    root = tmp / "xdg-cache"
    root.mkdir(exist_ok=True)
    link = root / "swarm-inference"
    if not link.exists():
        link.symlink_to(store_cache)
    return root


def agreement(peers: list[PeerProcess], stages: int) -> dict[str, Any] | None:
    """The one view every one of `peers` shares, or None: each answers, all name the same leader,
    term and ready layer map of `stages` stages held by exactly these peers, each sees the others
    alive."""
    found = [p.status() for p in peers]
    if any(s is None for s in found):
        return None
    views: list[dict[str, Any]] = found  # type: ignore[assignment]
    ids = {v["peer_id"] for v in views}
    maps = {json.dumps(v["layer_map"], sort_keys=True) for v in views}
    if len(maps) != 1 or len({(v["term"], v["leader"]) for v in views}) != 1 or not all(v["ready"] for v in views):
        return None
    layer_map = views[0]["layer_map"]
    if layer_map is None or len(layer_map["stages"]) != stages or {s["peer_id"] for s in layer_map["stages"]} != ids:
        return None
    for v in views:
        alive = {m["peer_id"] for m in v["peers"] if m["state"] == "alive"}
        if not ids <= alive:
            return None
    return views[0]


def describe(peers: list[PeerProcess], tail: int = 1500) -> str:
    """Each peer's view in brief and the tail of its log, for a failure message."""
    lines = []
    for p in peers:
        s = p.status()
        brief = (
            {k: s.get(k) for k in ("node_id", "url", "leader", "term", "ready", "layer_map", "errors")} if s else None
        )
        lines.append(f"{p.name}: {brief}\n--- log tail:\n{p.log()[-tail:]}")
    return "\n".join(lines)


def stream_completion(url: str, body: dict[str, Any], timeout_s: float) -> tuple[str, list[str]]:
    """`swarm.local.stream_completion`'s text and endings, an HTTP error or a broken stream being one
    ending, "http <status>: <message>" or "lost: <why>"."""
    try:
        text, endings, _ = stream_text(url, body, timeout_s)
    except urllib.error.HTTPError as e:
        return "", [f"http {e.code}: {e.read()[:300].decode(errors='replace')}"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        return "", [f"lost: {e}"]
    return text, endings
