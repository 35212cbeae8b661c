"""Finding peers on the local network with mDNS (python-zeroconf). Each peer announces the service
`_swarm-infer._tcp.local.` with TXT records naming its peer id, port, protocol version and swarm-key
fingerprint, and browses for others. Discovery only proposes addresses: the node still has to
complete an authenticated exchange before a found peer becomes a member, and liveness is gossip's
job. mDNS runs on every interface unless told one (by name or address); a peer listening on every
interface announces each address it has, and a find lists the announced addresses this machine can
likely reach first (see `swarm.netif`). Tests bind every instance to 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm.errors import IdentityError
from swarm.netif import interfaces, reachable_first, resolve_interface

log = logging.getLogger(__name__)

SERVICE_TYPE = "_swarm-infer._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
MAX_PENDING_RESOLVES = 64  # a hostile LAN cannot make us resolve without bound


@dataclass(frozen=True)
class Announcement:
    """What a peer's mDNS record says about it."""

    peer_id: str
    urls: tuple[str, ...]  # one per announced address, the likeliest to reach it first
    protocol: int
    key_fingerprint: str


def mdns_interfaces(interface: str | None) -> InterfaceChoice | list[str]:
    """What python-zeroconf is given for `discovery.mdns_interface`: every interface for None, else
    the address of the one interface named (by name or address); ConfigError when there is none."""
    return InterfaceChoice.All if interface is None else [resolve_interface(interface)]


class Discovery:
    """Announces this peer over mDNS and reports the peers it finds; `async with` or start/close."""

    def __init__(
        self,
        *,
        peer_id: str,
        addresses: list[str],
        port: int,
        protocol: int,
        key_fingerprint: str,
        on_found: Callable[[Announcement], None],
        interface: str | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.addresses, self.port = addresses, port
        self.protocol = protocol
        self.key_fingerprint = key_fingerprint
        self.on_found = on_found
        self.interface = interface
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: set[asyncio.Task[None]] = set()

    def _info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.peer_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties={
                "id": self.peer_id,
                "port": str(self.port),
                "v": str(self.protocol),
                "kfp": self.key_fingerprint,
            },
        )

    async def start(self) -> None:
        """Register our service and start browsing. IdentityError when another host already announces
        this peer id (a copy of this peer's state directory runs there)."""
        self._zc = AsyncZeroconf(interfaces=mdns_interfaces(self.interface), ip_version=IPVersion.V4Only)
        try:
            await self._zc.async_register_service(self._info())
        except NonUniqueNameException as e:
            raise IdentityError(
                f"peer id {self.peer_id} is already announced over mDNS by another peer: was this peer's "
                "identity key (its state directory) copied? Give each peer its own --state-dir"
            ) from e
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mDNS: announcing %s at %s on %s", SERVICE_TYPE, ", ".join(self.addresses),
                 self.interface or "all interfaces")  # fmt: skip

    async def browse_again(self) -> None:
        """Ask the network for every peer's record now, as at start: after a link returns, records
        that expired meanwhile would otherwise wait for the browser's next query, up to an hour."""
        if self._zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    async def announce_key(self, key_fingerprint: str) -> None:
        """Announce another swarm key fingerprint (the primary key changed)."""
        self.key_fingerprint = key_fingerprint
        if self._zc is not None:
            await self._zc.async_update_service(self._info())

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed or len(self._resolving) >= MAX_PENDING_RESOLVES:
            return
        if name == f"{self.peer_id}.{SERVICE_TYPE}":
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        props = info.decoded_properties
        addresses = reachable_first(info.parsed_addresses(IPVersion.V4Only), interfaces())
        try:
            found = Announcement(
                peer_id=str(props.get("id")),
                urls=tuple(f"http://{a}:{int(info.port or 0)}" for a in addresses),
                protocol=int(props.get("v") or -1),
                key_fingerprint=str(props.get("kfp")),
            )
        except (ValueError, TypeError):
            found = None
        if found is None or not found.urls or not info.port:
            log.debug("mDNS: ignoring malformed or unreachable record %s", name)
            return
        if found.peer_id != self.peer_id:
            self.on_found(found)

    async def close(self) -> None:
        """Unregister and stop browsing; safe to call twice."""
        for task in list(self._resolving):
            task.cancel()
        for task in list(self._resolving):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            zc, self._zc = self._zc, None
            await zc.async_unregister_all_services()
            await zc.async_close()
