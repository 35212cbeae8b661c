"""A task group: the background tasks one component starts (gossip exchanges, probes, link readers,
frames on their way), kept so that they can all be cancelled when it closes, and their failures
logged rather than lost; and a wait on an event with a timeout that never loses a cancellation. It
knows asyncio and nothing of what the tasks do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskGroup:
    """Tasks started with `spawn`, all cancelled by `close` (safe to call twice)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def spawn(
        self, coro: Coroutine[Any, Any, Any], expected: tuple[type[BaseException], ...] = ()
    ) -> asyncio.Task[Any] | None:
        """Run `coro` in the background; None (and the coroutine discarded) once the group is closed.
        A failure of an `expected` kind is its awaiter's to handle, not logged here."""
        if self.closed:
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, expected))
        return task

    def _done(self, task: asyncio.Task[Any], expected: tuple[type[BaseException], ...]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), expected):
            log.error("background task failed", exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set, at most `timeout_s` seconds; whether it is set. A cancellation of
    the caller always propagates. asyncio.wait_for before Python 3.12 returns normally when the
    cancellation comes as the event is set (CPython gh-86296, bpo-42130), and a loop waiting that
    way can outlive its own cancellation: its owner's close() then waits on it for ever."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()
