"""Helpers for tests that run real `swarm-peer` processes on 127.0.0.1: start one with a config
file and flags, learn its URL from its log, read its /swarm/status, kill it, and wait for a
condition with a deadline (polling the peers' status; never a fixed sleep)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
POLL_S = 0.1

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


def peer_command() -> list[str]:
    """The installed `swarm-peer` console script (the module if the script is not installed)."""
    script = Path(sys.executable).parent / "swarm-peer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarm.daemon"]


class PeerProcess:
    """One `swarm-peer` process, its log file and its URL."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self._log_offset = 0

    def start(self) -> PeerProcess:
        """Launch it; its log starts a new section on every launch."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("SWARM_KEY", None)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*peer_command(), "--node-id", self.name, "--threads", "1", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.url = None
        return self

    def log(self) -> str:
        """What this launch has logged so far."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_url(self, timeout_s: float = 120.0) -> str:
        """The URL it logs once it listens."""

        def listening() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            match = re.search(r"listening on (http://\S+)", self.log())
            return match.group(1) if match else None

        self.url = wait_for(listening, timeout_s, f"{self.name} to listen")
        return self.url

    def status(self) -> dict[str, Any] | None:
        """Its /swarm/status, or None while it does not answer."""
        if self.url is None:
            return None
        try:
            with urllib.request.urlopen(self.url + "/swarm/status", timeout=2) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` and reap the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str, describe: Callable[[], str] = str) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {describe()}")
        time.sleep(POLL_S)  # polling interval of a condition check, not synchronisation


def start_seeded_swarm(tmp: Path, config: Path, caps_mb: dict[str, int], peers: list[PeerProcess]) -> dict[str, Any]:
    """Start one peer per cap (the first a seed the others --join, no mDNS, key tmp/swarm.key, which
    it writes) into `peers`, which the caller stops; the status once every peer holds a ready stage."""
    from swarm.auth import write_new_swarm_key

    write_new_swarm_key(tmp / "swarm.key")
    for name, cap in caps_mb.items():
        args = ["--config", str(config), "--port", "0", "--max-memory-mb", str(cap), "--no-mdns"]
        args += ["--state-dir", str(tmp / name), "--swarm-key-file", str(tmp / "swarm.key")]
        if peers:
            args += ["--join", str(peers[0].url).removeprefix("http://")]
        peers.append(PeerProcess(name, args, tmp).start())
        peers[-1].wait_url()

    def ready() -> dict[str, Any] | None:
        status = peers[0].status()
        stages = status["layer_map"]["stages"] if status and status["layer_map"] else []
        alive = status and sum(p["state"] == "alive" for p in status["peers"]) == len(peers)
        return status if alive and status["ready"] and len(stages) == len(peers) else None

    return wait_for(ready, 180, "the swarm to be ready", lambda: "\n".join(p.log()[-800:] for p in peers))
