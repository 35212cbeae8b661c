"""A network test bed on one Linux machine: hosts made of network namespaces, cabled to a switch
that lives in a namespace of its own, so that nothing is added to the machine's own network. It
is what the multi-host tests, `scripts/chaos.py` and `scripts/bench.py` run peers on.

- Each host has `eth0` on the switch, at 198.18.0.N/16 (198.18.0.0/15 is set aside for network
  benchmarks, RFC 2544, and is never routed anywhere), optionally a default route (to a gateway
  that does not exist: enough for the kernel to have one), and optionally a second interface
  `dock0` that no other host can reach, at 198.19.0.1/24 on every host, as a container bridge is.
- The switch is two bridges joined by one link: a host's cable can be cut and healed, and the
  hosts can be split into two groups (one per bridge, the link between them cut) and joined again.
- This kernel has no `netem`, so delay is added in user space: `Relay` is a TCP relay on a host's
  second address (198.18.1.N) that holds every chunk for the link's delay in each direction, and a
  peer behind it advertises the relay's address (`--advertise-host`). A hop between two relayed
  peers then costs the delay once each way, as a link's one-way delay would.
- The harness reaches the hosts through `Host.http`, a thread that entered the host's namespace.

It needs root, iproute2 and network namespaces; `unavailable()` says why not, for a test to skip.
It knows nothing of the swarm: peers are started on a host by `swarm.local`."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SUBNET_PREFIX = 16  # eth0 198.18.0.N/16; relays listen on 198.18.1.N in the same subnet
GATEWAY = "198.18.255.254"  # the default route's gateway: never answers, only gives the kernel a route
UNREACHABLE = "198.19.0.1/24"  # dock0 on every host, as every host's container bridge may be 172.17.0.1
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
COMMAND_TIMEOUT_S = 30.0  # one `ip` command
HARNESS_THREADS = 8  # requests the harness can have in flight from one host at once


def unavailable() -> str | None:
    """Why this machine cannot run a test bed (not root, no iproute2, no network namespaces), or None."""
    if sys.platform != "linux":
        return "the network test bed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network test bed needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the network test bed needs iproute2's `ip`"
    name = f"swprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except TestBedError as e:
        return f"cannot create network namespaces here: {e}"
    try:
        _ip("-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        _ip("-n", name, "link", "add", "probebr", "type", "bridge")
    except TestBedError as e:
        return f"cannot create veth pairs or bridges here: {e}"
    finally:
        with contextlib.suppress(TestBedError):
            _ip("netns", "del", name)
    return None


class TestBedError(Exception):
    """A command that builds or changes the test bed failed."""


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TestBedError(f"ip {' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise TestBedError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (setns(2) acts per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One host of the test bed: a network namespace with an address on the switch."""

    name: str  # e.g. h1
    netns: str  # the namespace's name
    index: int  # N of 198.18.0.N
    port: str  # its cable's end on the switch
    address: str  # eth0's address
    _http: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def relay_address(self) -> str:
        """The address a relay in front of this host's peer listens on."""
        return f"198.18.1.{self.index}"

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def start_harness(self) -> None:
        """Start the threads inside this host that `call` and `submit` use, all of them at once (a
        test that checks for leaked threads then sees none appear)."""
        if self._http is not None:
            return
        self._http = concurrent.futures.ThreadPoolExecutor(
            HARNESS_THREADS, f"testbed-{self.name}", initializer=_enter_netns, initargs=(self.netns,)
        )
        everyone = threading.Barrier(HARNESS_THREADS + 1)
        for _ in range(HARNESS_THREADS):
            self._http.submit(everyone.wait)  # each waits, so each submit needs a thread of its own
        everyone.wait(timeout=COMMAND_TIMEOUT_S)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on a thread inside this host's network, so the sockets it opens are the host's."""
        return self.submit(fn, *args).result()

    def get_json(self, url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> Any:
        """GET `url` from this host; the parsed JSON, or None when nobody answers well."""
        return self.call(_get_json, url, timeout_s, headers or {})

    def post_json(self, url: str, body: Any, timeout_s: float = 300.0) -> tuple[int, Any]:
        """POST JSON from this host; (status, parsed JSON body), status 0 when nobody answered."""
        return self.call(_post_json, url, body, timeout_s)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Like `call`, without waiting: up to HARNESS_THREADS run at once."""
        self.start_harness()
        assert self._http is not None
        return self._http.submit(fn, *args)

    def close(self) -> None:
        """Stop the host's harness thread."""
        if self._http is not None:
            self._http.shutdown(wait=True)
            self._http = None


def _get_json(url: str, timeout_s: float, headers: dict[str, str]) -> Any:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _post_json(url: str, body: Any, timeout_s: float) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return 0, {"error": {"message": str(e)}}


class TestBed:
    """Hosts on a switch, built on `start()` (or `with`) and torn down on `close()`."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, hosts: int, *, default_route: bool = True, second_interface: bool = False, tag: str | None = None
    ) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("a test bed has 1 to 200 hosts")
        self.tag = tag or f"sw{os.getpid() % 100000}"  # namespaces are named <tag>-switch, <tag>-h1, ...
        self.switch = f"{self.tag}-switch"
        self.default_route = default_route
        self.second_interface = second_interface
        self.hosts = [Host(f"h{i}", f"{self.tag}-h{i}", i, f"p{i}", f"198.18.0.{i}") for i in range(1, hosts + 1)]
        self._made: list[str] = []  # namespaces to delete
        self.groups: list[list[Host]] | None = None  # set while split

    def __enter__(self) -> TestBed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> TestBed:
        """Build the switch and the hosts."""
        self._netns(self.switch)
        sw = ["-n", self.switch]
        for bridge in ("br0", "br1"):
            _ip(*sw, "link", "add", bridge, "type", "bridge")
            # No IGMP snooping: mDNS's multicast goes to every port, as on a plain switch.
            _ip(*sw, "link", "set", bridge, "type", "bridge", "mcast_snooping", "0")
            _ip(*sw, "link", "set", bridge, "up")
        _ip(*sw, "link", "add", "bl0", "type", "veth", "peer", "name", "bl1")
        _ip(*sw, "link", "set", "bl0", "master", "br0", "up")
        _ip(*sw, "link", "set", "bl1", "master", "br1", "up")
        for host in self.hosts:
            self._add_host(host)
            host.start_harness()
        return self

    def _netns(self, name: str) -> None:
        with contextlib.suppress(TestBedError):
            _ip("netns", "del", name)  # left over from a run that was killed
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._netns(host.netns)
        hn = ["-n", host.netns]
        if self.second_interface:
            # Made first, so that an interface-order guess picks the wrong one.
            _ip(*hn, "link", "add", "dock0", "type", "veth", "peer", "name", "dock0p")
            _ip(*hn, "addr", "add", UNREACHABLE, "dev", "dock0")
            _ip(*hn, "link", "set", "dock0p", "up")
            _ip(*hn, "link", "set", "dock0", "up")
        _ip(*hn, "link", "add", "eth0", "type", "veth", "peer", "name", host.port, "netns", self.switch)
        _ip(*hn, "addr", "add", f"{host.address}/{SUBNET_PREFIX}", "dev", "eth0")
        _ip(*hn, "link", "set", "eth0", "up")
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        if self.default_route:
            _ip(*hn, "route", "add", "default", "via", GATEWAY, "dev", "eth0")

    def close(self) -> None:
        """Tear every namespace down (processes still in them lose their network); safe to call twice."""
        for host in self.hosts:
            host.close()
        for name in reversed(self._made):
            with contextlib.suppress(TestBedError):
                _ip("netns", "del", name)
        self._made.clear()

    # ---- faults -----------------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Unplug `host`'s cable: it reaches no one and no one reaches it."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        """Plug `host`'s cable back in."""
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def split(self, groups: list[list[Host]]) -> None:
        """Two groups of hosts that reach each other within a group and not across (one bridge each,
        the link between the bridges cut)."""
        if len(groups) != 2 or sorted(h.name for g in groups for h in g) != sorted(h.name for h in self.hosts):
            raise ValueError("split takes two groups that together hold every host once")
        _ip("-n", self.switch, "link", "set", "bl0", "down")
        for bridge, group in zip(("br0", "br1"), groups, strict=True):
            for host in group:
                _ip("-n", self.switch, "link", "set", host.port, "master", bridge)
        self.groups = groups

    def join(self) -> None:
        """Reconnect the two groups of a split."""
        _ip("-n", self.switch, "link", "set", "bl0", "up")
        self.groups = None

    @contextlib.contextmanager
    def relay(self, host: Host, port: int, delay_s: float = 0.0) -> Iterator[Relay]:
        """A delaying relay from `host.relay_address:port` to `host.address:port` while in the block."""
        relay = Relay(host, port, delay_s)
        try:
            yield relay
        finally:
            relay.close()


class Relay:
    """A TCP relay inside a host that delays each direction by `delay_s` (change it with `set_delay`)."""

    def __init__(self, host: Host, port: int, delay_s: float) -> None:
        self.host = host
        self.port = port
        argv = [sys.executable, "-m", "swarm.testbed", "relay", f"{host.relay_address}:{port}",
                f"{host.address}:{port}", "--delay-s", str(delay_s)]  # fmt: skip
        if subprocess.run(host.command(["ip", "addr", "show", "dev", "eth0"]), capture_output=True,
                          text=True).stdout.find(f"{host.relay_address}/") < 0:  # fmt: skip
            _ip("-n", host.netns, "addr", "add", f"{host.relay_address}/{SUBNET_PREFIX}", "dev", "eth0")
        self.proc = subprocess.Popen(host.command(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening" once bound
        if not line.startswith("listening"):
            self.close()
            raise TestBedError(f"relay on {host.name} did not start: {line!r}")

    def set_delay(self, delay_s: float) -> None:
        """Hold each chunk this long from now on, in each direction."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{delay_s}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Stop the relay; its connections close."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


# ---- the relay process -------------------------------------------------------------------------------

RELAY_CHUNK_BYTES = 64 * 1024
RELAY_QUEUE_CHUNKS = 256  # chunks held per direction at most; the reader waits beyond that


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float]) -> None:
    """Copy `reader` to `writer`, each chunk written `delay[0]` seconds after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_QUEUE_CHUNKS)
    loop = asyncio.get_running_loop()

    async def read() -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):  # a reset ends the stream too
            while chunk := await reader.read(RELAY_CHUNK_BYTES):
                await queue.put((loop.time() + delay[0], chunk))
        await queue.put((loop.time() + delay[0], b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        return  # a side reset the connection: the relay closes both
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, asyncio.IncompleteReadError):
            await reading


async def _relay(listen: tuple[str, int], target: tuple[str, int], delay: list[float]) -> None:
    connections: set[asyncio.Task[None]] = set()  # held here: a task nobody references may be collected

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(_pump(reader, up_writer, delay)),
            asyncio.create_task(_pump(up_reader, writer, delay)),
        ]
        try:
            await asyncio.wait(pumps)  # each ends at its side's end of stream, or on an error
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (writer, up_writer):
                w.close()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(serve(reader, writer))
        connections.add(task)
        task.add_done_callback(connections.discard)

    server = await asyncio.start_server(accepted, *listen, reuse_address=True)
    print("listening", flush=True)
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):  # a file, /dev/null, a terminal: the delay stays
        async with server:
            await asyncio.Event().wait()  # until a signal stops the process
    stdin = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with server:
        while line := await stdin.readline():  # one delay in seconds per line; EOF stops the relay
            with contextlib.suppress(ValueError):
                delay[0] = max(0.0, float(line))
        for task in list(connections):
            task.cancel()


CLI_TAG = "swarmbed"  # the namespaces `python -m swarm.testbed up` makes: swarmbed-switch, swarmbed-h1, ...


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarm.testbed", description="a network test bed of namespaces (root)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help=f"make hosts {CLI_TAG}-h1... on a switch and leave them up")
    up.add_argument("--hosts", type=int, default=4, help="hosts to make (default 4)")
    up.add_argument("--no-default-route", action="store_true", help="hosts without a default route")
    up.add_argument("--second-interface", action="store_true", help="a dock0 on each host that no other reaches")
    down = sub.add_parser("down", help="remove the hosts `up` made (and their processes' network)")
    down.add_argument("--hosts", type=int, default=200, help=argparse.SUPPRESS)
    for name, what in (("cut", "unplug a host's cable"), ("heal", "plug a host's cable back in")):
        fault = sub.add_parser(name, help=what)
        fault.add_argument("host", help="h1, h2, ...")
    relay = sub.add_parser("relay", help="a TCP relay that delays each direction")
    relay.add_argument("listen", help="HOST:PORT to listen on")
    relay.add_argument("target", help="HOST:PORT to relay to")
    relay.add_argument("--delay-s", type=float, default=0.0, help="seconds each chunk is held, per direction")
    args = p.parse_args(argv)
    if args.command == "relay":
        listen_host, listen_port = args.listen.rsplit(":", 1)
        target_host, target_port = args.target.rsplit(":", 1)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_relay((listen_host, int(listen_port)), (target_host, int(target_port)), [args.delay_s]))
        return 0
    reason = unavailable()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            bed = TestBed(args.hosts, default_route=not args.no_default_route,
                          second_interface=args.second_interface, tag=CLI_TAG).start()  # fmt: skip
            for host in bed.hosts:
                print(f"{host.name}: ip netns exec {host.netns} ...   (eth0 {host.address})")
            print(f"a switch in {bed.switch}; `python -m swarm.testbed down` removes it all")
        elif args.command == "down":
            names = _ip("netns", "list").split()
            for name in [n for n in names if n.startswith(f"{CLI_TAG}-")]:
                _ip("netns", "del", name)
        else:
            index = int(args.host.removeprefix("h"))
            _ip("-n", f"{CLI_TAG}-switch", "link", "set", f"p{index}", "down" if args.command == "cut" else "up")
    except (TestBedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
