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

from swarm.launcher import openmp_wait

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
        own_session: bool = False,
        command: list[str] | None = None,
        shared_cores: bool = True,
    ) -> None:
        self.name = name
        self.command = command or peer_command()  # what starts a peer: `swarm-peer`, or a stand-in
        self.args = args
        self.threads = threads
        self.host = host
        self.env = env or {}  # laid over this process's environment
        self.cwd = cwd
        # Whether other peers run on this machine's cores (OpenMP workers then sleep at once; alone,
        # `swarm-peer` lets them spin briefly: see swarm.launcher).
        self.shared_cores = shared_cores
        self.named = named  # pass --node-id NAME and --threads (False: exactly `args`)
        self.own_session = own_session  # a session of its own: the terminal's Ctrl-C does not reach it
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.api_key: str | None = None  # sent with status requests when the peer requires one
        self._log_offset = 0

    def start(self) -> PeerProcess:
        """Launch it; its log starts a new section on every launch."""
        env = {
            **os.environ,
            **openmp_wait(os.environ, shared_cores=self.shared_cores),
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("SWARM_KEY", None)
        env.update(self.env)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [*self.command, *(["--node-id", self.name, "--threads", str(self.threads)] if self.named else [])]
        argv += self.args
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.host.command(argv) if self.host else argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=self.own_session,
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


# Shrunk control-plane timings for tests and the chaos run: a swarm settles, and notices a fault, in
# seconds rather than tens of seconds (the shipped ones are in configs/default.yaml).
FAST_TIMINGS: dict[str, dict[str, float]] = {
    "gossip": {"interval_s": 0.25, "suspect_after_s": 1.5, "dead_after_s": 3.0, "request_timeout_s": 1.0,
               "retry_dead_max_s": 2.0},
    "election": {"startup_grace_s": 1.5, "timeout_min_s": 0.4, "timeout_max_s": 0.8, "coordinator_timeout_s": 2.0},
    "partition": {"kv_reserve_tokens": 64},
}  # fmt: skip


def write_config(path: Path, base: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    """A config file: `base` (a parsed config, default none) with the fast timings and `sections`
    laid over it, section by section."""
    import yaml

    raw: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items() if isinstance(v, dict)}
    for name, values in [*FAST_TIMINGS.items(), *sections.items()]:
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


class Swarm:
    """Peer processes started together, on loopback or one per test-bed host, with one swarm key:
    one way to start them, to see whether they are ready or agree, and to stop them.

    `seeds` says whom each peer --joins: "first" (every peer the first, without mDNS), "all" (every
    other peer on a fixed port, without mDNS: a restarted peer finds its way back) or "mdns"
    (nobody; mDNS on every interface, as on a real network). A cap of None sets none."""

    def __init__(
        self,
        workdir: Path,
        config: Path,
        caps_mb: dict[str, int | None],
        *,
        hosts: list[Host] | None = None,
        seeds: str = "first",
        threads: int = 1,
        extra_args: tuple[str, ...] = (),
        extra_by_name: dict[str, tuple[str, ...]] | None = None,
        own_keyrings: bool = False,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        own_session: bool = False,
        behind_relays: bool = False,
        peers: list[PeerProcess] | None = None,
        command: list[str] | None = None,
    ) -> None:
        if seeds not in ("first", "all", "mdns"):
            raise ValueError(f"seeds must be first, all or mdns, not {seeds!r}")
        if hosts is not None and len(hosts) < len(caps_mb):
            raise ValueError(f"{len(caps_mb)} peers need as many test-bed hosts, not {len(hosts)}")
        self.workdir, self.config, self.caps_mb = workdir, config, caps_mb
        self.hosts, self.seeds, self.threads = hosts, seeds, threads
        self.extra_args, self.extra_by_name = extra_args, extra_by_name or {}
        self.command = command  # what starts each peer (None: `swarm-peer`)
        self.own_keyrings, self.api_key, self.env = own_keyrings, api_key, env or {}
        self.own_session = own_session
        # On the test bed: each peer listens on its host's address and advertises its relay's
        # (`TestBed.relay`, which the caller runs), so every hop to it crosses the relay's delay.
        self.behind_relays = behind_relays
        self.peers: list[PeerProcess] = [] if peers is None else peers  # the caller's list, when it keeps one
        self._streak = 0  # for settled(): agreeing polls in a row
        self._last: dict[str, Any] | None = None  # and the view they agreed on

    def _address(self, i: int, port: int) -> str:
        return f"{self.hosts[i].address}:{port}" if self.hosts else f"127.0.0.1:{port}"

    def start(self) -> Swarm:
        """Write the swarm key and start every peer; returns once each listens."""
        from swarm.auth import write_new_swarm_key

        write_new_swarm_key(self.workdir / "swarm.key")
        # Fixed ports where every peer is every other's seed (known before any starts); else the OS's.
        ports = [PEER_PORT if self.hosts else free_port() for _ in self.caps_mb] if self.seeds == "all" else None
        for i, (name, cap) in enumerate(self.caps_mb.items()):
            key_file = self.workdir / "swarm.key"
            if self.own_keyrings:
                key_file = self.workdir / f"{name}.key"
                shutil.copy(self.workdir / "swarm.key", key_file)
            host = self.hosts[i] if self.hosts else None
            port = ports[i] if ports else (PEER_PORT if host else 0)
            args = ["--config", str(self.config), "--port", str(port)]
            args += ["--max-memory-mb", str(cap)] if cap is not None else []
            if host is not None and self.behind_relays:
                args += ["--host", host.address, "--advertise-host", host.relay_address]
            elif host is not None:
                args += ["--host", "0.0.0.0"]
            args += ["--state-dir", str(self.workdir / name), "--swarm-key-file", str(key_file), *self.extra_args]
            args += self.extra_by_name.get(name, ())
            if self.seeds == "all" and ports:
                args += ["--no-mdns"]
                args += [a for j, p in enumerate(ports) if j != i for a in ("--join", self._address(j, p))]
            elif self.seeds == "first":
                args += ["--no-mdns"]
                args += ["--join", str(self.peers[0].url).removeprefix("http://")] if self.peers else []
            peer = PeerProcess(name, args, self.workdir, self.threads, host=host, env=self.env,
                               own_session=self.own_session, command=self.command,
                               shared_cores=len(self.caps_mb) > 1)  # fmt: skip
            peer.api_key = self.api_key
            self.peers.append(peer.start())
            if self.seeds == "first":
                peer.wait_url()  # the others join it
        for peer in self.peers:
            peer.wait_url()
        return self

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every answering peer's /swarm/status, by name."""
        return {p.name: s for p in self.peers if (s := p.status()) is not None}

    def ready(self) -> dict[str, Any] | None:
        """The first peer's status once it sees every peer alive and every one holding a ready stage."""
        status = self.peers[0].status()
        if status is None or not status["ready"] or status["layer_map"] is None:
            return None
        alive = sum(p["state"] == "alive" for p in status["peers"]) == len(self.peers)
        return status if alive and len(status["layer_map"]["stages"]) == len(self.peers) else None

    def progress(self) -> str:
        """Where forming stands, as the first peer sees it, in one line."""
        status = self.peers[0].status()
        if status is None:
            return "waiting for the first peer to answer"
        alive = sum(p["state"] == "alive" for p in status["peers"])
        layer_map = status.get("layer_map")
        line = f"waiting for the swarm: {alive}/{len(self.peers)} peers, leader {status['leader'] or '-'}, "
        if layer_map is None:
            return line + "no layer map yet"
        loaded = sum(s["ready"] for s in layer_map["stages"])
        return line + f"{loaded}/{len(layer_map['stages'])} stages loaded"

    def wait_ready(self, timeout_s: float = 180.0, show: Callable[[str], None] | None = None) -> dict[str, Any]:
        """`ready()`, waited for; `show` is told each change of `progress()`; fails naming the logs."""
        last = ""

        def check() -> dict[str, Any] | None:
            nonlocal last
            for p in self.peers:
                if not p.running():
                    raise AssertionError(f"{p.name} exited:\n{p.log()[-2000:]}")
            status = self.ready()
            if show is not None and status is None and (line := self.progress()) != last:
                show(line)
                last = line
            return status

        return wait_for(check, timeout_s, "the swarm to be ready", self.logs)

    def converged(self) -> dict[str, Any] | None:
        """One ready map, one leader and every peer alive, as every peer sees it; None until then."""
        found = self.statuses()
        if len(found) != len(self.peers):
            return None
        maps = {json.dumps(s["layer_map"], sort_keys=True) for s in found.values()}
        views = {(s["term"], s["leader"]) for s in found.values()}
        everyone = all(
            len(s["peers"]) == len(self.peers) and all(m["state"] == "alive" for m in s["peers"])
            for s in found.values()
        )
        ready = all(s["ready"] and s["layer_map"] for s in found.values())
        if len(maps) == 1 and len(views) == 1 and everyone and ready:
            one = next(iter(found.values()))
            return {"epoch": one["layer_map"]["epoch"], "term": one["term"], "leader": one["leader"]}
        return None

    def settled(self, polls: int = 5) -> dict[str, Any] | None:
        """`converged`, with the same map and leader on `polls` polls in a row: not a passing agreement."""
        view = self.converged()
        self._streak = self._streak + 1 if view is not None and view == self._last else int(view is not None)
        self._last = view
        return view if self._streak >= polls else None

    def logs(self, tail: int = 800) -> str:
        """The end of every peer's log."""
        return "\n".join(f"--- {p.name}\n{p.log()[-tail:]}" for p in self.peers)

    def stop(self) -> None:
        """Stop every peer (SIGTERM, then SIGKILL if one lingers)."""
        for p in self.peers:
            p.stop()

    def __enter__(self) -> Swarm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


PEER_PORT = 50051  # on a test-bed host every peer has the machine to itself


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for peers that must know each other's ports in advance)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_seeded_swarm(
    tmp: Path,
    config: Path,
    caps_mb: dict[str, int | None],
    peers: list[PeerProcess],
    threads: int = 1,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
    own_keyrings: bool = False,
    api_key: str | None = None,
    extra_by_name: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """A `Swarm` of one peer per cap on loopback, each joining the first, started into `peers`
    (which the caller stops); its status once ready. See `Swarm` for the other arguments."""
    swarm = Swarm(tmp, config, caps_mb, threads=threads, extra_args=extra_args, extra_by_name=extra_by_name,
                  own_keyrings=own_keyrings, api_key=api_key, peers=peers)  # fmt: skip
    return swarm.start().wait_ready(timeout_s)


def stream_completion(url: str, body: dict[str, Any], timeout_s: float) -> tuple[str, list[str], int]:
    """POST a streamed completion to the peer at `url`; (text, endings, chunks): every finish reason,
    error event and [DONE] seen, and how many chunks came. Raises urllib's errors as they come."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    text, endings, chunks = "", [], 0
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                endings.append("[DONE]")
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    endings.append(f"error: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    chunks += 1
                    text += choice.get("text", "")
                    if choice.get("finish_reason"):
                        endings.append(f"finish: {choice['finish_reason']}")
    return text, endings, chunks
