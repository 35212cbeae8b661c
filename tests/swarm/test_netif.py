"""Which addresses a peer announces and which announced addresses it tries, as pure functions of
interface lists; interface names resolved; mDNS on every interface by default (zeroconf 0.154
refused the "all" string this used to pass, and every peer without --mdns-interface crashed); and
a peer that had to guess its address takes the one another peer reached it at."""

from __future__ import annotations

import asyncio

import pytest
from zeroconf import InterfaceChoice

from peer.errors import ConfigError
from swarm.discovery import Announcement, Discovery, mdns_interfaces
from swarm.netif import Interface, advertised_addresses, reachable_first, resolve_interface

LO = Interface("lo", "127.0.0.1", 8)
ETH = Interface("eth0", "198.18.0.2", 16)
DOCK = Interface("dock0", "198.19.0.1", 24)  # every host's container bridge has this address


def test_a_peer_on_every_interface_announces_the_default_routes_address_first() -> None:
    assert advertised_addresses([LO, DOCK, ETH], outward="198.18.0.2") == ["198.18.0.2", "198.19.0.1"]
    # No default route: every non-loopback address, in interface order (the peers' answers then tell).
    assert advertised_addresses([LO, DOCK, ETH], outward=None) == ["198.19.0.1", "198.18.0.2"]
    # A machine alone: loopback only.
    assert advertised_addresses([LO], outward=None) == ["127.0.0.1"]


def test_announced_addresses_that_are_ours_too_are_skipped_and_shared_subnets_come_first() -> None:
    other = ["198.19.0.1", "203.0.113.9", "198.18.0.3"]  # its dock0, a routed address, its eth0
    assert reachable_first(other, [LO, DOCK, ETH]) == ["198.18.0.3", "203.0.113.9"]
    # A peer on this machine announces loopback: kept (mDNS over lo reaches only this machine).
    assert reachable_first(["127.0.0.1"], [LO, ETH]) == ["127.0.0.1"]
    assert reachable_first(["not an address", "198.18.0.3", "198.18.0.3"], [ETH]) == ["198.18.0.3"]


def test_an_interface_is_named_by_its_name_or_its_address() -> None:
    assert resolve_interface("eth0", [LO, ETH]) == "198.18.0.2"
    assert resolve_interface("198.18.0.2", [LO, ETH]) == "198.18.0.2"
    with pytest.raises(ConfigError, match=r"no IPv4 interface named or addressed 'wlan0'.*eth0 \(198.18.0.2\)"):
        resolve_interface("wlan0", [LO, ETH])


def test_mdns_runs_on_every_interface_unless_told_one() -> None:
    assert mdns_interfaces(None) is InterfaceChoice.All
    assert mdns_interfaces("127.0.0.1") == ["127.0.0.1"]
    assert mdns_interfaces("lo") == ["127.0.0.1"]


async def test_discovery_starts_on_every_interface_and_two_peers_find_each_other() -> None:
    """The default that crashed every `swarm-peer` without --mdns-interface: it starts, and finds."""
    found: dict[str, list[Announcement]] = {"a": [], "b": []}
    peers = [
        Discovery(
            peer_id=name,
            addresses=["127.0.0.1"],
            port=port,
            protocol=3,
            key_fingerprint="k",
            on_found=found[name].append,
        )
        for name, port in (("a", 1111), ("b", 2222))
    ]
    try:
        for d in peers:
            await d.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (found["a"] and found["b"]) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for d in peers:
            await d.close()
    assert found["a"] and found["a"][0].peer_id == "b" and "http://127.0.0.1:2222" in found["a"][0].urls
    assert found["b"] and found["b"][0].peer_id == "a" and "http://127.0.0.1:1111" in found["b"][0].urls
