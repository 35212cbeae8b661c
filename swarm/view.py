"""What the data plane may see of the control plane: a read-only view of the layer map, the
readiness of its stages and the members' addresses, a probe for a peer that stopped answering, and
a signal that fires whenever the map or its readiness may have changed, so that waiting is an
event rather than a poll. The node implements it; the stage service and the entry receive it and
never reach into the node."""

from __future__ import annotations

import asyncio
from typing import Protocol

from swarm.layer_map import LayerMap
from swarm.tasks import wait_event


class Signal:
    """Wakes every waiter at the next `notify()`; a waiter rechecks what it waits for, as with a
    condition variable."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake the current waiters."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Return at the next notify, or after `timeout_s`."""
        await wait_event(self._event, timeout_s)


class SwarmView(Protocol):
    """The control plane as the data plane sees it."""

    @property
    def layer_map(self) -> LayerMap | None:
        """The layer map this peer follows."""
        ...

    @property
    def stopping(self) -> bool:
        """Whether this peer is shutting down."""
        ...

    @property
    def changes(self) -> Signal:
        """Notified when the layer map, a stage's readiness or the membership changed."""
        ...

    def ready(self) -> bool:
        """Whether every stage of the current layer map is loaded."""
        ...

    def url_of(self, peer_id: str) -> str | None:
        """A member's address, if it is one."""
        ...

    def name_of(self, peer_id: str) -> str:
        """A member's readable node id (its peer id if it is not known)."""
        ...

    def capacity_error(self) -> str | None:
        """What is missing when the live members cannot hold the model."""
        ...

    def errors(self) -> list[str]:
        """Why the swarm is not ready, as far as this peer knows."""
        ...

    async def check_peer(self, peer_id: str, why: str) -> bool:
        """Probe a peer that failed on the data path (`why`); True if it is dead."""
        ...
