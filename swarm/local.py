"""Run `swarm-peer` processes on this machine, for the tests, `scripts/chaos.py` and
`scripts/bench.py`: start one with a config file and flags, on loopback or on a host of the network
test bed (`swarm.testbed`), learn its URL from its log, read its /swarm/status, signal, kill or
restart it (a restart keeps its state directory, so it comes back as the same peer with a higher
incarnation), and wait for a condition by polling, with a deadline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from signal import SIGCONT, SIGKILL
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from swarm.testbed import Host

T = TypeVar("T")
POLL_S = 0.1


def peer_command() -> list[str]:
    """The installed `swarm-peer` console script (the module if the script is not installed)."""
    script = Path(sys.executable).parent / "swarm-peer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarm.launcher"]


class PeerProcess:
    """One `swarm-peer` process, its log file and its URL; on `host` (a test-bed host) or on loopback."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        threads: int = 1,
        *,
        host: Host | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        named: bool = True,
    ) -> None:
        self.name = name
        self.args = args
        self.threads = threads
        self.host = host
        self.env = env or {}  # laid over this process's environment
        self.cwd = cwd
        self.named = named  # pass --node-id NAME and --threads (False: exactly `args`)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.api_key: str | None = None  # sent with status requests when the peer requires one
        self._log_offset = 0

    def start(self) -> PeerProcess:
        """Launch it; its log starts a new section on every launch."""
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("SWARM_KEY", None)
        env.update(self.env)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [*peer_command(), *(["--node-id", self.name, "--threads", str(self.threads)] if self.named else [])]
        argv += self.args
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.host.command(argv) if self.host else argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )
        self.url = None
        return self

    def running(self) -> bool:
        """Whether the process of the latest launch is still there (stopped counts as running)."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What this launch has logged so far."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def full_log(self) -> str:
        """What every launch of it has logged."""
        return self.log_path.read_bytes().decode(errors="replace") if self.log_path.exists() else ""

    def wait_url(self, timeout_s: float = 120.0) -> str:
        """The URL it logs once it listens."""

        def listening() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            match = re.search(r"listening on (http://\S+):(\d+)", self.log())
            if match is None:
                return None
            # On the test bed, its host's address on the switch (the one the harness can reach).
            return f"http://{self.host.address}:{match.group(2)}" if self.host else match.group(0).split()[-1]

        self.url = wait_for(listening, timeout_s, f"{self.name} to listen")
        return self.url

    def status(self, timeout_s: float = 2.0) -> dict[str, Any] | None:
        """Its /swarm/status, or None while it does not answer."""
        if self.url is None:
            return None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.host is not None:  # asked from inside its own host, which reaches it even when cut off
            answer = self.host.get_json(self.url + "/swarm/status", timeout_s, headers)
            return answer if isinstance(answer, dict) else None
        try:
            request = urllib.request.Request(self.url + "/swarm/status", headers=headers)
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                found: dict[str, Any] = json.loads(resp.read())
                return found
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def signal(self, sig: int) -> None:
        """Send `sig` (SIGSTOP, SIGCONT, ...) if the process is there."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self, sig: int = SIGKILL) -> None:
        """Send `sig` and reap the process."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (after a SIGCONT, in case it is stopped), then SIGKILL if it lingers."""
        if not self.running():
            return
        assert self.proc is not None
        self.proc.send_signal(SIGCONT)
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


def start_seeded_swarm(
    tmp: Path,
    config: Path,
    caps_mb: dict[str, int],
    peers: list[PeerProcess],
    threads: int = 1,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
    own_keyrings: bool = False,
    api_key: str | None = None,
    extra_by_name: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Start one peer per cap (the first a seed the others --join, no mDNS, key tmp/swarm.key, which
    it writes, and `extra_args` such as --model) into `peers`, which the caller stops; the status once
    every peer holds a ready stage. With `own_keyrings` each peer reads a copy of the key of its own,
    tmp/<name>.key, as peers on separate machines do (so keys can be rotated peer by peer). `api_key`
    is sent with status requests, for peers started with an API key file; `extra_by_name` adds flags
    to one peer (another --dtype, say)."""
    from swarm.auth import write_new_swarm_key

    write_new_swarm_key(tmp / "swarm.key")
    for name, cap in caps_mb.items():
        key_file = tmp / "swarm.key"
        if own_keyrings:
            key_file = tmp / f"{name}.key"
            shutil.copy(tmp / "swarm.key", key_file)
        args = ["--config", str(config), "--port", "0", "--max-memory-mb", str(cap), "--no-mdns"]
        args += ["--state-dir", str(tmp / name), "--swarm-key-file", str(key_file), *extra_args]
        args += (extra_by_name or {}).get(name, ())
        if peers:
            args += ["--join", str(peers[0].url).removeprefix("http://")]
        peers.append(PeerProcess(name, args, tmp, threads))
        peers[-1].api_key = api_key
        peers[-1].start()
        peers[-1].wait_url()

    def ready() -> dict[str, Any] | None:
        status = peers[0].status()
        if status is None or not status["ready"] or status["layer_map"] is None:
            return None
        alive = sum(p["state"] == "alive" for p in status["peers"]) == len(peers)
        return status if alive and len(status["layer_map"]["stages"]) == len(peers) else None

    return wait_for(ready, timeout_s, "the swarm to be ready", lambda: "\n".join(p.log()[-800:] for p in peers))
