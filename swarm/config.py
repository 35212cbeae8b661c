"""Configuration of the swarm side: one frozen dataclass per concern (this node, its security,
discovery, gossip, election, partitioning), each field with its unit, validated on construction,
read from the same YAML file as the model side's sections. Every timing the control plane uses is
here, so tests shrink them all from one place. Library code gets these objects; only entry points
read argv or the environment."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peer.config import PeerConfig, _is_int, _is_number, _section, peer_config_from_dict
from peer.errors import ConfigError


@dataclass(frozen=True)
class NodeConfig:
    """Who this peer is and where it listens."""

    # Address the HTTP server binds to; a non-loopback address needs a swarm key (or insecure).
    host: str = "127.0.0.1"
    # TCP port; 0 lets the OS choose one (the daemon logs the port it got).
    port: int = 50051
    # Readable name shown beside the peer id; None means the first 8 hex digits of the peer id.
    node_id: str | None = None
    # First part of the Bully rank (priority, peer_id): the highest live rank leads.
    priority: int = 0
    # Directory holding the identity key and the persisted term and incarnation; None: user state dir.
    state_dir: str | None = None
    # Address other peers reach this one at; None: the bind address, or for a wildcard bind
    # (0.0.0.0) the address of the interface that routes outwards.
    advertise_host: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"node.host must be an address, not {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ConfigError(f"node.port must be 0..65535, not {self.port!r}")
        if self.node_id is not None and (
            not isinstance(self.node_id, str) or not re.fullmatch(r"[\w.-]{1,64}", self.node_id)
        ):
            raise ConfigError(f"node.node_id must be 1-64 letters, digits, '.', '_' or '-', not {self.node_id!r}")
        if not _is_int(self.priority):
            raise ConfigError(f"node.priority must be an integer, not {self.priority!r}")
        if self.state_dir is not None and not isinstance(self.state_dir, str):
            raise ConfigError(f"node.state_dir must be a path string, not {self.state_dir!r}")
        if self.advertise_host is not None and (not isinstance(self.advertise_host, str) or not self.advertise_host):
            raise ConfigError(f"node.advertise_host must be an address, not {self.advertise_host!r}")


@dataclass(frozen=True)
class SecurityConfig:
    """How peer messages are authenticated."""

    # File holding the swarm key in hex (`swarm keygen`), or a keyring of several (`swarm keys`);
    # reloaded when it changes. None: SWARM_KEY or no key.
    swarm_key_file: str | None = None
    # The swarm's name, bound into every message: swarms sharing a key but not a name ignore each other.
    cluster: str = "default"
    # File of API keys, one per line; when set, the public API (/v1, /metrics, /swarm/status) needs
    # `Authorization: Bearer <key>`. Reloaded when it changes. None: the API is open.
    api_key_file: str | None = None
    # Run without a swarm key on a non-loopback address (anyone on the network can join).
    insecure: bool = False
    # A message stamped further than this from our clock is stale and dropped, in seconds.
    max_clock_skew_s: float = 30.0
    # Sequence numbers this far below a sender's highest are still accepted once (reordering).
    replay_window: int = 1024
    # Largest control-plane message a peer accepts, in bytes (a digest of 256 members is ~100 KiB).
    max_message_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("swarm_key_file", "api_key_file"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"security.{name} must be a path string, not {getattr(self, name)!r}")
        if not isinstance(self.cluster, str) or not re.fullmatch(r"[\w.-]{1,64}", self.cluster):
            raise ConfigError(f"security.cluster must be 1-64 letters, digits, '.', '_' or '-', not {self.cluster!r}")
        if not isinstance(self.insecure, bool):
            raise ConfigError(f"security.insecure must be true or false, not {self.insecure!r}")
        if not _is_number(self.max_clock_skew_s) or self.max_clock_skew_s <= 0:
            raise ConfigError(f"security.max_clock_skew_s must be positive, not {self.max_clock_skew_s!r}")
        for name in ("replay_window", "max_message_bytes"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"security.{name} must be a positive integer, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class DiscoveryConfig:
    """How peers find each other."""

    # Announce and browse over mDNS (python-zeroconf).
    mdns: bool = True
    # Address of the interface mDNS uses; None means every interface.
    mdns_interface: str | None = None
    # Seed peers as HOST:PORT, contacted at start and whenever they are not members.
    join: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.mdns, bool):
            raise ConfigError(f"discovery.mdns must be true or false, not {self.mdns!r}")
        if self.mdns_interface is not None and not isinstance(self.mdns_interface, str):
            raise ConfigError(f"discovery.mdns_interface must be an address, not {self.mdns_interface!r}")
        if isinstance(self.join, list):
            object.__setattr__(self, "join", tuple(self.join))
        if not isinstance(self.join, tuple):
            raise ConfigError(f"discovery.join must be a list of HOST:PORT, not {self.join!r}")
        for seed in self.join:
            parse_host_port(seed)


@dataclass(frozen=True)
class GossipConfig:
    """Membership gossip and failure detection."""

    # A peer sends its membership digest this often, in seconds.
    interval_s: float = 1.0
    # Random members each digest goes to per round.
    fanout: int = 3
    # A member whose heartbeat has not advanced for this long is suspected, in seconds.
    suspect_after_s: float = 3.0
    # A member whose heartbeat has not advanced for this long is declared dead, in seconds.
    dead_after_s: float = 6.0
    # A dead member is forgotten this long after its death, in seconds; until then it is retried.
    forget_after_s: float = 3600.0
    # A dead member (a partition, a cut link) is sent a digest again after interval_s, then after
    # doubling waits up to this long, in seconds; mDNS is browsed again on the same schedule. After
    # links return, membership heals within about this plus two gossip intervals.
    retry_dead_max_s: float = 10.0
    # One peer request (gossip, election, hello) may take this long, in seconds.
    request_timeout_s: float = 2.0
    # Most members a peer tracks, however many a hostile LAN announces.
    max_members: int = 256

    def __post_init__(self) -> None:
        for name in (
            "interval_s",
            "suspect_after_s",
            "dead_after_s",
            "forget_after_s",
            "request_timeout_s",
            "retry_dead_max_s",
        ):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"gossip.{name} must be positive, not {getattr(self, name)!r}")
        for name in ("fanout", "max_members"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"gossip.{name} must be a positive integer, not {getattr(self, name)!r}")
        if not self.interval_s < self.suspect_after_s < self.dead_after_s:
            raise ConfigError("gossip timings must satisfy interval_s < suspect_after_s < dead_after_s")


@dataclass(frozen=True)
class ElectionConfig:
    """Bully election timings."""

    # Wait for discovery this long after start before electing, in seconds.
    startup_grace_s: float = 2.0
    # A candidate waits a random time in [timeout_min_s, timeout_max_s] for an answer (OK), in seconds.
    timeout_min_s: float = 1.0
    timeout_max_s: float = 2.0
    # After an OK, a candidate waits this long for the COORDINATOR before electing again, in seconds.
    coordinator_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("startup_grace_s", "timeout_min_s", "timeout_max_s", "coordinator_timeout_s"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"election.{name} must be >= 0, not {getattr(self, name)!r}")
        if not 0 < self.timeout_min_s <= self.timeout_max_s:
            raise ConfigError("election timeouts must satisfy 0 < timeout_min_s <= timeout_max_s")
        if self.coordinator_timeout_s <= self.timeout_max_s:
            raise ConfigError("election.coordinator_timeout_s must exceed timeout_max_s")


@dataclass(frozen=True)
class PartitionConfig:
    """How the leader sizes stages."""

    # Tokens of KV cache every layer must have room for, beside its weights.
    kv_reserve_tokens: int = 2048

    def __post_init__(self) -> None:
        if not _is_int(self.kv_reserve_tokens) or self.kv_reserve_tokens < 0:
            raise ConfigError(f"partition.kv_reserve_tokens must be >= 0, not {self.kv_reserve_tokens!r}")


@dataclass(frozen=True)
class ServingConfig:
    """The data plane and the public API."""

    # Largest activation message between stages, in bytes (hidden states of a long prompt).
    max_activation_bytes: int = 256 * 1024 * 1024
    # Largest JSON body of a public API request, in bytes.
    max_request_bytes: int = 1024 * 1024
    # One step through the whole pipeline may take this long, in seconds (a long prefill on a CPU).
    step_timeout_s: float = 300.0
    # max_tokens when a request names none.
    default_max_tokens: int = 16
    # Requests generating at once on this entry peer; more wait, and are refused when the queue is full.
    max_concurrent_requests: int = 16
    # A session whose pipeline failed (or a new request, while the swarm is not ready) waits this long
    # for a ready one, in seconds; at once a 503 when the live peers cannot hold the model.
    recovery_timeout_s: float = 60.0
    # A step with no reply for this long makes the entry peer probe its stages directly, in seconds.
    hop_check_after_s: float = 2.0
    # Most tokens one forward pass at a stage takes from the steps queued there (a decode step is one
    # token per sequence, a prompt all of its tokens); a longer prompt runs alone.
    max_batch_tokens: int = 2048
    # A forward pass at a stage waits at most this long, in seconds, for the sessions whose next step is
    # due, so that sessions sharing the pipeline run in one pass (0: never wait). A lone session never
    # waits; others wait for each other at most about half of their own time between steps.
    batch_wait_s: float = 1.0
    # Micro-batches the first stage keeps in flight at once, each of 1/K of its sessions, so that every
    # stage computes at once on a different one (0: one per machine the stages run on, as their
    # addresses tell; 1: no pipelining, the sessions move as one batch).
    micro_batches: int = 0
    # A link between peers whose ping goes unanswered for this long is closed (a host gone silent), in
    # seconds; the steps sent over it are then replayed.
    link_heartbeat_s: float = 5.0
    # Niceness added to a `swarm-peer`'s event-loop thread (0-19; 0: none), above its forward passes:
    # peers sharing cores then do not preempt each other's forward passes with their messages.
    loop_nice: int = 10
    # The most tokens one request may ask for (max_tokens), and the longest prompt it may send, in tokens.
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 8192
    # Generations one client (one API key, or one address without keys) may run at once on this peer.
    max_sessions_per_client: int = 8
    # Connections this peer's HTTP server holds open at once; one more is answered 503 and closed.
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in (
            "max_activation_bytes",
            "max_request_bytes",
            "default_max_tokens",
            "max_concurrent_requests",
            "max_batch_tokens",
            "max_tokens_limit",
            "max_prompt_tokens",
            "max_sessions_per_client",
            "max_connections",
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"serving.{name} must be a positive integer, not {getattr(self, name)!r}")
        if not _is_int(self.micro_batches) or not 0 <= self.micro_batches <= 64:
            raise ConfigError(f"serving.micro_batches must be an integer from 0 to 64, not {self.micro_batches!r}")
        for name in ("step_timeout_s", "recovery_timeout_s", "hop_check_after_s", "link_heartbeat_s"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"serving.{name} must be positive, not {getattr(self, name)!r}")
        if not _is_int(self.loop_nice) or not 0 <= self.loop_nice <= 19:
            raise ConfigError(f"serving.loop_nice must be an integer from 0 to 19, not {self.loop_nice!r}")
        if not _is_number(self.batch_wait_s) or not 0 <= self.batch_wait_s <= 10:
            raise ConfigError(f"serving.batch_wait_s must be between 0 and 10 seconds, not {self.batch_wait_s!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"serving.default_max_tokens ({self.default_max_tokens}) exceeds serving.max_tokens_limit "
                f"({self.max_tokens_limit})"
            )


@dataclass(frozen=True)
class SwarmConfig:
    """Every section of a config file: the model side's and the swarm side's."""

    peer: PeerConfig = field(default_factory=PeerConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    election: ElectionConfig = field(default_factory=ElectionConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


SWARM_SECTIONS = {
    "node": NodeConfig,
    "security": SecurityConfig,
    "discovery": DiscoveryConfig,
    "gossip": GossipConfig,
    "election": ElectionConfig,
    "partition": PartitionConfig,
    "serving": ServingConfig,
}
PEER_SECTIONS = ("resources", "model", "store", "executor")


def convergence_bound_s(config: SwarmConfig) -> float:
    """Seconds after links return within which every peer agrees on one leader and one layer map,
    not counting the time to load the layers that moved. Membership: the next retry of a dead member
    (at most `retry_dead_max_s` away) plus its request (`request_timeout_s`) and two gossip rounds,
    one for each side to refute its death and be taken back. Election: a peer ranked above the
    leader waits up to `timeout_min_s` before it claims, a candidate `timeout_max_s` for an answer,
    and one told to wait up to 1.5 × `coordinator_timeout_s` for the COORDINATOR (`swarm.election`)."""
    g, e = config.gossip, config.election
    membership = g.retry_dead_max_s + g.request_timeout_s + 2 * g.interval_s
    return membership + e.timeout_min_s + e.timeout_max_s + 1.5 * e.coordinator_timeout_s


def swarm_config_from_dict(raw: dict[str, Any]) -> SwarmConfig:
    """Build the whole config from a parsed YAML mapping; an unknown section is an error."""
    unknown = sorted(set(raw) - set(SWARM_SECTIONS) - set(PEER_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    sections: dict[str, Any] = {name: _section(cls, raw.get(name), name) for name, cls in SWARM_SECTIONS.items()}
    return SwarmConfig(peer=peer_config_from_dict(raw), **sections)


def parse_host_port(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" (or "[v6]:PORT"), with a clear error for anything else."""
    match = None
    if isinstance(text, str):
        # "[v6 address]:port", or "host:port" where the host holds no colon, bracket or space.
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", text) or re.fullmatch(r"([^\[\]\s:]+):(\d{1,5})", text)
    if not match or not 0 < int(match.group(2)) <= 65535:
        raise ConfigError(f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
    return match.group(1), int(match.group(2))
