"""`swarm-peer`, the daemon every machine of the swarm runs. It reads `configs/default.yaml` (or
`--config`), lets flags override it, checks that a non-loopback address has a swarm key, resolves
the model, detects resources, and runs the peer: its HTTP server, mDNS announcement and browser,
and the control-plane node, until SIGINT or SIGTERM. `PeerServer` is the same peer as an
`async with` block, which the in-process tests use."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import platformdirs
from aiohttp import web

from peer.checkpoint import check_readable
from peer.config import default_config_path, read_config_file
from peer.errors import ConfigError, ModelStoreError, SwarmError
from peer.model_store import ModelStore
from peer.profile import ModelProfile
from peer.resources import detect_resources, resolve_dtype
from peer.tokenizer import Tokenizer
from swarm.api import make_app
from swarm.auth import PROTOCOL_VERSION, Keyring, load_keyring, parse_swarm_key
from swarm.config import SwarmConfig, swarm_config_from_dict
from swarm.discovery import Discovery
from swarm.errors import IdentityError, SwarmKeyError
from swarm.guard import ApiKeys, LimitedSite
from swarm.identity import Identity, StateFile, prepare_state_dir
from swarm.netif import advertised_addresses, interfaces, outward_address, resolve_interface
from swarm.node import ModelIdentity, Node
from swarm.stage_host import StageHost

log = logging.getLogger("swarm")

SHUTDOWN_GRACE_S = 3.0  # in-flight HTTP requests get this long to end when the peer stops


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: SwarmConfig, keyring: Keyring) -> None:
    """Refuse to listen beyond loopback without a swarm key, unless the user said --insecure."""
    host = config.node.host
    if not keyring.secure and not is_loopback(host) and not config.security.insecure:
        raise SwarmKeyError(
            f"refusing to listen on {host} without a swarm key: anyone on the network could join. "
            "Run `swarm keygen --out swarm.key`, copy the file to every peer and pass --swarm-key-file swarm.key "
            "(or set SWARM_KEY), or pass --insecure to run unauthenticated."
        )


def resolve_keyring(config: SwarmConfig, env: dict[str, str]) -> Keyring:
    """The swarm keys from the key file in config (one key or a keyring), else the one key in
    SWARM_KEY in `env`, else none (the insecure keyring)."""
    if config.security.swarm_key_file:
        return load_keyring(Path(config.security.swarm_key_file).expanduser())
    if env.get("SWARM_KEY"):
        return Keyring.of(parse_swarm_key(env["SWARM_KEY"], "SWARM_KEY"))
    return Keyring()


def advertised_hosts(config: SwarmConfig) -> list[str]:
    """The IPv4 addresses other peers may reach this one at, the one to advertise first:
    `advertise_host`, else the bind address, else (for a wildcard bind) the mDNS interface's address,
    then the default route's, then every other non-loopback address (a machine with no default
    route, or several interfaces). A peer listening on every interface announces them all over mDNS;
    its peers' answers then tell it which one they reach (see `Node.observed`)."""
    host = config.node.advertise_host or config.node.host
    if host not in ("0.0.0.0", "::", ""):
        try:
            return [socket.gethostbyname(host)]  # a name such as localhost becomes its address
        except OSError as e:
            raise ConfigError(
                f"cannot use {host!r} as this peer's address ({e}); pass --advertise-host with an IPv4 address"
            ) from e
    local = interfaces()
    hosts = advertised_addresses(local, outward_address())
    if config.discovery.mdns_interface:
        chosen = resolve_interface(config.discovery.mdns_interface, local)
        hosts = [chosen] + [h for h in hosts if h != chosen]
    if ipaddress.ip_address(hosts[0]).is_loopback:
        log.warning("advertising %s: this machine has no other address, so other machines cannot reach this "
                    "peer; pass --advertise-host", hosts[0])  # fmt: skip
    return hosts


def state_dir_for(config: SwarmConfig) -> Path | None:
    """Where identity and term live: the configured directory, or one per port in the user's state dir.

    Port 0 with no directory gives an ephemeral identity: the OS picks a new port every start."""
    if config.node.state_dir:
        return Path(config.node.state_dir).expanduser()
    if config.node.port == 0:
        return None
    return Path(platformdirs.user_state_dir("swarm-inference")) / f"peer-{config.node.port}"


def build_node(config: SwarmConfig, keyring: Keyring, *, show_progress: bool = True) -> Node:
    """Everything a peer needs before it can serve: identity, model files, resources, stage host."""
    state_dir = state_dir_for(config)
    if state_dir is not None:
        prepare_state_dir(state_dir)
        identity, state_file = Identity.load_or_create(state_dir), StateFile(state_dir)
    else:
        log.warning("no state directory: this peer gets a fresh identity and forgets its term on restart")
        identity, state_file = Identity.generate(), None
    store = ModelStore(config.peer.store, show_progress=show_progress)
    files = store.resolve(config.peer.model.spec)
    fingerprint = store.fingerprint(files)
    if config.peer.model.quantize != "none":  # the weights served differ: peers must agree on it too
        fingerprint = hashlib.sha256(f"{fingerprint}|quantize={config.peer.model.quantize}".encode()).hexdigest()
    model_config = files.load_config()
    resources = detect_resources(config.peer.resources)
    quantize = config.peer.model.quantize
    dtype = resolve_dtype(config.peer.model.dtype, resources.device, quantize)
    profile = ModelProfile.from_config(model_config, dtype, quantize)
    check_readable(files, model_config)  # refused now, not after the layer map hands this peer layers
    try:
        tokenizer: Tokenizer | None = Tokenizer.from_dir(files.meta_dir, model_config)
    except ModelStoreError as e:
        log.warning("no tokenizer: this peer serves its layers but cannot take prompts (%s)", str(e).splitlines()[0])
        tokenizer = None
    return Node(
        config,
        tokenizer=tokenizer,
        identity=identity,
        state_file=state_file,
        keyring=keyring,
        model=ModelIdentity(config.peer.model.spec, fingerprint, profile),
        resources=resources,
        host=StageHost(files, model_config, dtype, resources.device, quantize, tokenizer),
    )


class PeerServer:
    """A node with its HTTP server and mDNS, started and stopped together; `async with` it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self._runner: web.AppRunner | None = None
        self._discovery: Discovery | None = None
        self.url = ""

    async def start(self) -> str:
        """Bind, start the node and announce it; returns the peer's URL."""
        self._runner = web.AppRunner(
            make_app(self.node), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await self._runner.setup()
        node = self.node
        limit = self.config.serving.max_connections

        def refused() -> None:
            node.flood.refused("too_many_connections", f"{limit} connections are open")

        site = LimitedSite(self._runner, self.config.node.host, self.config.node.port, limit, refused)
        await site.start()
        port = self._runner.addresses[0][1]
        hosts = advertised_hosts(self.config)
        self.url = f"http://{hosts[0]}:{port}"
        log.info("listening on %s", self.url)
        if self.config.discovery.mdns:
            self._discovery = Discovery(
                peer_id=self.node.peer_id,
                addresses=hosts,
                port=port,
                protocol=PROTOCOL_VERSION,
                key_fingerprint=self.node.key_fingerprint,
                on_found=self.node.on_discovered,
                interface=self.config.discovery.mdns_interface,
            )
            await self._discovery.start()  # before the node, so its election grace covers discovery
            self.node.on_new_primary = self._discovery.announce_key
            self.node.on_browse = self._discovery.browse_again
        # A peer on every interface that was not told its address may learn it from the others.
        told = self.config.node.advertise_host or self.config.discovery.mdns_interface
        wildcard = self.config.node.host in ("0.0.0.0", "::", "") and not told
        await self.node.start(self.url, learn_url=wildcard and len(hosts) > 1)
        return self.url

    async def close(self) -> None:
        """Withdraw the announcement, end this entry's generations with an error, stop serving,
        then stop the node; safe to call twice."""
        self.node.stopping = True
        if self._discovery is not None:
            discovery, self._discovery = self._discovery, None
            await discovery.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.node.close()

    async def __aenter__(self) -> PeerServer:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# ---- the command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarm-peer", description="Run one peer of an inference swarm.")
    p.add_argument("--config", default=str(default_config_path()), help="YAML config file (default: %(default)s)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; others need a swarm key)")
    p.add_argument("--port", type=int, help="TCP port (default 50051; 0 lets the OS choose)")
    p.add_argument("--advertise-host", help="address other peers reach this one at (default: the bind address)")
    p.add_argument("--model", help="model spec (default smollm2-135m)")
    p.add_argument("--max-memory-mb", "--max-vram-mb", dest="max_memory_mb", type=int,
                   help="cap on memory for weights and KV cache, in MiB")  # fmt: skip
    p.add_argument("--priority", type=int, help="election priority; the highest (priority, peer id) leads")
    p.add_argument("--state-dir", help="directory for the identity key and persisted term/incarnation")
    p.add_argument("--swarm-key-file", help="swarm key file (swarm keygen) or keyring (swarm keys); or set SWARM_KEY")
    p.add_argument("--api-key-file", help="API keys, one per line: the public API then needs a Bearer key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a swarm key")
    p.add_argument("--mdns-interface", help="interface mDNS uses, by name or address (eth0, 127.0.0.1); default all")
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse over mDNS")
    p.add_argument("--join", action="append", metavar="HOST:PORT", help="seed peer to contact (repeatable)")
    p.add_argument("--node-id", help="readable name shown beside the peer id")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--quantize", choices=["none", "int8", "int4"],
                   help="hold weights quantized: int8 is a quarter of float32, int4 (CPU) about a fifth "
                        "(default none)")  # fmt: skip
    p.add_argument("--cache-dir", help="model cache directory")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SwarmConfig:
    """The config file with the given flags laid over it."""
    raw: dict[str, Any] = read_config_file(args.config)
    flags = {
        ("node", "host"): args.host,
        ("node", "port"): args.port,
        ("node", "advertise_host"): args.advertise_host,
        ("node", "priority"): args.priority,
        ("node", "state_dir"): args.state_dir,
        ("node", "node_id"): args.node_id,
        ("model", "spec"): args.model,
        ("model", "dtype"): args.dtype,
        ("model", "quantize"): args.quantize,
        ("resources", "max_memory_mb"): args.max_memory_mb,
        ("resources", "device"): args.device,
        ("store", "cache_dir"): args.cache_dir,
        ("security", "swarm_key_file"): args.swarm_key_file,
        ("security", "api_key_file"): args.api_key_file,
        ("security", "insecure"): True if args.insecure else None,
        ("discovery", "mdns_interface"): args.mdns_interface,
        ("discovery", "mdns"): False if args.no_mdns else None,
        ("discovery", "join"): args.join,
    }
    for (section, key), value in flags.items():
        if value is not None:
            if raw.get(section) is None:
                raw[section] = {}
            if not isinstance(raw[section], dict):
                raise ConfigError(f"config section {section!r} must be a mapping, not {type(raw[section]).__name__}")
            raw[section][key] = value
    return swarm_config_from_dict(raw)


def lower_loop_priority(nice: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread for the stage's forward passes, started at this thread's priority; then this (the
    event loop's) thread's niceness is raised by `nice`. On cores that peers share, a forward pass
    of one peer is then not preempted by the gossip and timers of the others: a preempted thread
    stalls every other thread of the pass at its next barrier. Threads started later from here
    (stage loads) inherit the lower priority; the compute thread's own helpers do not."""
    compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
    compute.submit(lambda: None).result()  # the thread exists now, at normal priority
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError as e:
            log.warning("could not lower the event loop's priority: %s", e)
    return compute


async def run(config: SwarmConfig, keyring: Keyring) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads the swarm key file at once."""
    node = await asyncio.to_thread(build_node, config, keyring)
    compute = lower_loop_priority(config.serving.loop_nice)
    node.service.compute_threads = compute
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: node.reload_keys(force=True))
    try:
        async with PeerServer(node):
            stopping, failed = asyncio.create_task(stop.wait()), asyncio.create_task(node.failed.wait())
            await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
            for task in (stopping, failed):
                task.cancel()
            log.info("stopping")
    finally:
        compute.shutdown(wait=False)
    if node.fatal is not None:
        raise IdentityError(node.fatal)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a key reload sent while the model loads must not kill the peer
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format=f"%(asctime)s %(levelname)-7s [{args.node_id or 'swarm-peer'}] %(message)s",
        stream=sys.stderr,
    )
    if args.log_level != "DEBUG":
        for noisy in ("aiohttp", "zeroconf", "peer", "swarm.stage_host"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        keyring = resolve_keyring(config, dict(os.environ))
        check_exposure(config, keyring)
        if config.security.api_key_file:
            ApiKeys(Path(config.security.api_key_file).expanduser())  # a clear error now, not after the load
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        asyncio.run(run(config, keyring))
    except SwarmError as e:
        print(f"swarm-peer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
