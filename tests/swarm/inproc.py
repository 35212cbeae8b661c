"""Peers in this test process (a `PeerServer` each, on 127.0.0.1 with an OS-chosen port, no mDNS,
the fast timings and a tiny model), for tests that look inside a node while it runs: how to make
one, wait for a condition its own timers reach, and name its members and address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from swarm.auth import Keyring
from swarm.config import swarm_config_from_dict
from swarm.daemon import PeerServer, build_node
from tests.swarm.procs import FAST

WAIT_S = 30.0


def make_config(tmp_path: Path, model: Path, name: str, join: list[str], **extra: Any) -> Any:
    raw: dict[str, Any] = {k: dict(v) for k, v in FAST.items()}
    raw["node"] = {"host": "127.0.0.1", "port": 0, "node_id": name, "state_dir": str(tmp_path / f"state-{name}")}
    raw["discovery"] = {"mdns": False, "join": join}
    raw["model"] = {"spec": str(model)}
    raw["store"] = {"cache_dir": str(tmp_path / "cache")}
    raw["resources"] = {"max_memory_mb": 64}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return swarm_config_from_dict(raw)


@asynccontextmanager
async def peer(
    tmp_path: Path,
    model: Path,
    name: str,
    key: bytes | None,
    join: list[str] = (),
    **extra: Any,  # type: ignore[assignment]
) -> AsyncIterator[PeerServer]:
    node = build_node(make_config(tmp_path, model, name, list(join), **extra), Keyring.of(key), show_progress=False)
    async with PeerServer(node) as server:
        yield server


async def until(predicate: Callable[[], Any], what: str) -> Any:
    """Wait for a condition the peers reach on their own timers (polled, with a deadline)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not (result := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


def members(server: PeerServer) -> set[str]:
    assert server.node.membership is not None
    return set(server.node.membership.members)


def hostport(server: PeerServer) -> str:
    return server.url.removeprefix("http://")
