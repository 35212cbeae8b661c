"""Which addresses a peer announces and which announced addresses it tries, as pure functions of
interface lists; interface names resolved; mDNS on every interface by default (zeroconf 0.154
refused the "all" string this used to pass, and every peer without --mdns-interface crashed); and
a peer that had to guess its address takes the one another peer reached it at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from zeroconf import InterfaceChoice

from peer.errors import ConfigError
from swarm.discovery import mdns_interfaces
from swarm.netif import Interface, advertised_addresses, reachable_first, resolve_interface
from tests.swarm.procs import bed_or_skip

LO = Interface("lo", "127.0.0.1", 8)
ETH = Interface("eth0", "198.18.0.2", 16)
DOCK = Interface("dock0", "198.19.0.1", 24)  # every host's container bridge has this address


def test_a_peer_on_every_interface_announces_the_default_routes_address_first() -> None:
    assert advertised_addresses([LO, DOCK, ETH], outward="198.18.0.2") == ["198.18.0.2", "198.19.0.1"]
    # No default route: every non-loopback address, in interface order (the peers' answers then tell).
    assert advertised_addresses([LO, DOCK, ETH], outward=None) == ["198.19.0.1", "198.18.0.2"]
    # A machine alone: loopback only.
    assert advertised_addresses([LO], outward=None) == ["127.0.0.1"]


def test_shared_subnets_come_first_and_addresses_that_are_ours_too_last() -> None:
    other = ["198.19.0.1", "203.0.113.9", "198.18.0.3"]  # its dock0, a routed address, its eth0
    assert reachable_first(other, [LO, DOCK, ETH]) == ["198.18.0.3", "203.0.113.9", "198.19.0.1"]
    # Another peer on this machine, listening on every interface, announces our own address.
    assert reachable_first(["198.18.0.2"], [LO, ETH]) == ["198.18.0.2"]
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


DISCOVER = """
import asyncio, sys
from swarm.discovery import Discovery

async def main(name, address):
    found = []
    d = Discovery(peer_id=name, addresses=[address], port=50051, protocol=3, key_fingerprint="k",
                  on_found=found.append)
    await d.start()  # interface None: every interface
    try:
        for _ in range(1200):
            if found:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # stay announced a moment for the other, which may have started later
    finally:
        await d.close()
    print(found[0].peer_id, *found[0].urls)

asyncio.run(main(*sys.argv[1:]))
"""


def test_discovery_on_every_interface_finds_a_peer_on_another_host() -> None:
    """The default that crashed every `swarm-peer` without --mdns-interface: it starts, and two
    hosts of the test bed (mDNS stays inside it) find each other."""
    bed = bed_or_skip(2)
    try:
        runs = [
            subprocess.Popen(
                host.command([sys.executable, "-c", DISCOVER, host.name, host.address]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parents[2],
            )
            for host in bed.hosts
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
    finally:
        bed.close()
    assert [out.split() for out, _ in outputs] == [
        ["h2", "http://198.18.0.2:50051"],
        ["h1", "http://198.18.0.1:50051"],
    ], outputs
