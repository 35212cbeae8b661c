"""The swarm package's errors, under the project's one base, `peer.errors.SwarmError`. Messages
from the network that fail a check raise `MessageRejected` with a short reason that the receiver
counts and logs; a swarm that cannot hold its model raises `SwarmTooSmall` naming the bytes."""

from __future__ import annotations

from peer.errors import SwarmError


class IdentityError(SwarmError):
    """A key file or state directory is missing, unreadable or malformed."""


class SwarmKeyError(SwarmError):
    """The swarm key is missing where it is required, or not 32 bytes of hex."""


class MessageRejected(SwarmError):
    """A peer message failed validation or authentication; `reason` is the counter it bumps."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Relayed(MessageRejected):
    """A later stage refused a data-plane message; passed back up the chain as it is, with its status."""

    def __init__(self, reason: str, detail: str, status: int) -> None:
        super().__init__(reason, detail)
        self.status = status


class Answered(MessageRejected):
    """A refusal the peer answers with a sealed reply of its own, `kind` with `body`, so that the
    sender can trust it and act on it (raise its incarnation; stop, its identity being held elsewhere)."""

    def __init__(self, reason: str, detail: str, kind: str, body: dict[str, object]) -> None:
        super().__init__(reason, detail)
        self.kind = kind
        self.body = body


class LayerMapError(SwarmError):
    """A layer map is malformed or does not cover the model's layers exactly once."""


class SwarmTooSmall(SwarmError):
    """The peers' memory cannot hold the model; names the bytes needed and the bytes available."""

    def __init__(self, needed_bytes: int, available_bytes: int, detail: str = "") -> None:
        mib = 1024 * 1024
        message = (
            f"the swarm cannot hold the model: it needs {needed_bytes} bytes ({needed_bytes / mib:.1f} MiB) "
            f"for weights and KV-cache reserve, the peers have {available_bytes} bytes "
            f"({available_bytes / mib:.1f} MiB) usable"
        )
        super().__init__(f"{message}; {detail}" if detail else message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class NotReady(SwarmError):
    """The swarm has no complete, loaded layer map right now, or this peer has too much queued."""
