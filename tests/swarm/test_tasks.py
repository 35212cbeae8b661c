"""The task group's wait on an event: set, timed out, and a cancellation that comes as the event is
set (asyncio.wait_for before Python 3.12 lost it, and a peer's close then hung on its election loop)."""

from __future__ import annotations

import asyncio

import pytest

from swarm.tasks import wait_event


async def test_an_event_set_while_waiting_ends_the_wait() -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_event(event, 30.0))
    await asyncio.sleep(0)
    event.set()
    assert await waiting is True


async def test_an_event_never_set_ends_the_wait_at_the_timeout() -> None:
    assert await wait_event(asyncio.Event(), 0.01) is False


async def test_a_cancellation_that_comes_as_the_event_is_set_is_not_lost() -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_event(event, 30.0))
    await asyncio.sleep(0)  # it waits
    event.set()  # in the same turn of the loop as the cancellation
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(asyncio.all_tasks()) == 1  # no waiter left behind: only this test's own task
