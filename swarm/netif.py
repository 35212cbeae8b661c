"""This machine's IPv4 interfaces, as the swarm needs them: which addresses a peer listening on
every interface should advertise, which address an interface name stands for, and which of the
addresses another peer announces this machine can reach. Interface lists come from ifaddr (the
library python-zeroconf uses for the same job). The choice of addresses is a pure function of
those lists, so it is tested without touching the machine's network; nothing here opens a
connection except `outward_address`, whose UDP "connect" only asks the kernel for a route."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import ifaddr

from peer.errors import ConfigError

# The route to this address (TEST-NET-1, RFC 5737) is the default route: the UDP connect that
# looks it up sends nothing.
ROUTE_PROBE = ("192.0.2.1", 9)


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of one network interface."""

    name: str  # the interface's name, e.g. eth0
    address: str  # dotted quad
    prefix: int  # network prefix length, 0-32

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The subnet the address is on."""
        return ipaddress.IPv4Network(f"{self.address}/{self.prefix}", strict=False)

    @property
    def loopback(self) -> bool:
        """Whether the address names only this machine."""
        return ipaddress.IPv4Address(self.address).is_loopback


def interfaces() -> list[Interface]:
    """Every IPv4 address of every interface of this machine (its network namespace), loopback included."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and 0 <= ip.network_prefix <= 32:
                found.append(Interface(str(adapter.nice_name or adapter.name), ip.ip, int(ip.network_prefix)))
    return found


def resolve_interface(spec: str, local: list[Interface] | None = None) -> str:
    """The IPv4 address of an interface given by name (eth0) or by one of its addresses; ConfigError
    naming the interfaces there are when it matches none."""
    local = interfaces() if local is None else local
    for iface in local:
        if spec in (iface.name, iface.address):
            return iface.address
    there = ", ".join(f"{i.name} ({i.address})" for i in local) or "none"
    raise ConfigError(f"no IPv4 interface named or addressed {spec!r} on this machine; there are: {there}")


def outward_address() -> str | None:
    """The source address of the default route, or None when this machine has no default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(ROUTE_PROBE)
            return str(probe.getsockname()[0])
        except OSError:
            return None


def advertised_addresses(local: list[Interface], outward: str | None) -> list[str]:
    """The addresses a peer listening on every interface announces, the one to prefer first: the
    default route's address, then the other non-loopback addresses in interface order; only when
    there are none, the loopback address (a machine alone)."""
    routable = [i.address for i in local if not i.loopback]
    ordered = ([outward] if outward in routable else []) + [a for a in routable if a != outward]
    ordered = list(dict.fromkeys(ordered))
    return ordered or ["127.0.0.1"]


def reachable_first(announced: list[str], local: list[Interface]) -> list[str]:
    """The addresses another peer announced, the likeliest to reach it first, unusable ones left out.

    Loopback, and an address on a subnet one of our interfaces is on, come first; then one that
    needs a router; an address that is also one of ours comes last: it is another peer on this
    machine, or a copy of an address every host has (each host's container bridge may be
    172.17.0.1), which names our own interface and not the other peer."""
    own = {i.address for i in local}
    nets = [i.network for i in local if not i.loopback]
    keep = []
    for text in dict.fromkeys(announced):
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        near = address.is_loopback or any(address in n for n in nets)
        keep.append((2 if text in own and not address.is_loopback else 0 if near else 1, text))
    return [text for _, text in sorted(keep, key=lambda k: k[0])]
