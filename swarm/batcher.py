"""Batching at a stage: the steps that reach this peer's stage while it is busy run together, as one
forward pass, when the current one ends. A pass also waits, briefly, for the sessions that are due:
those that stepped here lately and whose next step is expected within `batch_wait_s` (each
session's pace is the time between its last two steps here). Sessions that share the pipeline thus
fall into step and stay there, instead of running in fragments that contend for the same cores,
while a lone session never waits.

At the head of a pipeline (the first stage) passes are also micro-batches: with K micro-batches
(`micro_batches`), a pass takes at most 1/K of the open sessions, and at most K passes are in flight
at once, a pass being in flight until one of its sessions steps here again or closes (its tokens
went home in one frame, so the whole pass has cleared every stage: a slow client does not hold
the others back), or `in_flight_s` has passed. Every stage then computes at once on a different
micro-batch; with K = 1 the sessions move as one gang and a
stage idles while the others compute. The queue is bounded; a step
beyond it is refused at once. It knows executors and asyncio; what the steps mean and where their
results go is the stage service's business (`on_pass`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peer.errors import ExecutorError
from peer.executor import StageExecutor, StepRequest, StepResult
from swarm.errors import MessageRejected

log = logging.getLogger(__name__)

LATE_ROUNDS = 0.5  # a due session is waited for until this many of its rounds past its expected arrival
STALE_ROUNDS = 4.0  # a session not seen for this many rounds is no longer waited for


@dataclass
class BatchStats:
    """Counters across the batchers of a stage's successive executors, for metrics."""

    passes: int = 0  # forward passes run
    steps: int = 0  # session steps they ran (steps / passes: the mean batch)
    queued_s: float = 0.0  # over the steps run: from each step's arrival here to its pass starting
    pass_s: float = 0.0  # over the passes: their wall time on the event loop (compute and thread hand-offs)


@dataclass
class _Pace:
    last_s: float  # when its latest step arrived (the batcher's clock)
    round_s: float | None = None  # the time between its last two steps


@dataclass
class _Queued:
    request: StepRequest
    future: asyncio.Future[StepResult] | None  # None: the outcome goes to on_pass alone
    arrived_s: float
    tag: Any = None  # the caller's, handed back with the outcome

    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()


Outcome = StepResult | ExecutorError | MessageRejected
# Called after each pass (and for steps refused when the batcher closes) with each enqueued step,
# its tag and its outcome, in queue order: the stage sends one frame per pass from here.
OnPass = Callable[[list[tuple[StepRequest, Any, Outcome]]], None]


class Batcher:
    """One forward pass at a time over an executor, each taking every step queued since the last."""

    def __init__(
        self,
        executor: StageExecutor,
        max_batch_tokens: int,
        batch_wait_s: float = 0.0,
        stats: BatchStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        threads: concurrent.futures.Executor | None = None,
        *,
        on_pass: OnPass | None = None,
        micro_batches: Callable[[], int] | None = None,
        in_flight_s: float = 2.0,
    ) -> None:
        self.executor = executor
        self.threads = threads  # where forward passes run; None: asyncio's default thread pool
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_s
        self.stats = stats or BatchStats()
        self.clock = clock  # paces the sessions; the waits themselves run on the event loop
        self.on_pass = on_pass
        # K, the micro-batches kept in flight (the pipeline's head); None: no cap, no window.
        self.micro_batches = micro_batches
        self.in_flight_s = in_flight_s  # a pass whose sessions have not all come back counts this long at most
        # Steps that may wait here at once: one per session the executor can hold (an entry sends
        # a session's next step only after the last one's token came home).
        self.max_queued = executor.config.max_sessions
        self.gathering = asyncio.Event()  # set while a pass waits for sessions that are due
        self.closed = False
        self._queue: list[_Queued] = []
        self._worker: asyncio.Task[None] | None = None
        self._pace: dict[str, _Pace] = {}  # open sessions that ran here (pruned after every pass)
        self._arrival: asyncio.Future[None] | None = None  # resolved by the next submit, while waiting
        # Passes in flight: (the sessions it ran, when it ran).
        self._in_flight: list[tuple[set[str], float]] = []

    def close(self) -> None:
        """Take no more steps: queued ones, and any sent later, are refused as `not_ready` (the entry
        sends them again on the current layer map); a pass under way still delivers its results.
        Safe to call twice."""
        self.closed = True
        refused: list[tuple[StepRequest, Any, Outcome]] = [
            (q.request, q.tag, _closed()) for q in self._queue if q.future is None
        ]
        for q in self._queue:
            if q.future is not None and not q.future.done():
                q.future.set_exception(_closed())
        self._queue.clear()
        self._wake()
        if refused and self.on_pass is not None:
            self.on_pass(refused)

    async def step(self, request: StepRequest) -> StepResult:
        """The step's result once a forward pass has run it; its ExecutorError if it was refused."""
        return await self.submit(request)

    def submit(self, request: StepRequest) -> asyncio.Future[StepResult]:
        """Queue a step (a pass starts at once if none is running); cancel the future to withdraw it.
        Refused at once (MessageRejected) when the batcher is closed or its queue is full."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        refusal = self._admit(request, future, None)
        if refusal is not None:
            future.set_exception(refusal)
        return future

    def enqueue(self, request: StepRequest, tag: Any) -> None:
        """Queue a step whose outcome goes to `on_pass` with `tag` (at once, if it is refused)."""
        refusal = self._admit(request, None, tag)
        if refusal is not None and self.on_pass is not None:
            self.on_pass([(request, tag, refusal)])

    def _admit(
        self, request: StepRequest, future: asyncio.Future[StepResult] | None, tag: Any
    ) -> MessageRejected | None:
        self._queue = [q for q in self._queue if not q.abandoned()]
        if self.closed:
            return _closed()
        if len(self._queue) >= self.max_queued:
            return MessageRejected("cache_full", f"this stage is overloaded: {len(self._queue)} steps are queued")
        self._back(request.session_id)
        self._queue.append(_Queued(request, future, self.clock(), tag))
        self._wake()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return None

    def forget(self, session_id: str) -> None:
        """A session closed: no pass waits for it any more."""
        self._pace.pop(session_id, None)
        self._back(session_id)
        self._wake()

    def _back(self, session_id: str) -> None:
        """A session stepped here again (or closed): its last pass is no longer in flight for it."""
        self._in_flight = [(sessions, ran) for sessions, ran in self._in_flight if session_id not in sessions]

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def _rows_cap(self) -> int:
        """Most steps one pass takes: at the head, one micro-batch's share of the open sessions."""
        if self.micro_batches is None:
            return self.max_queued
        k = max(1, self.micro_batches())
        return max(1, math.ceil(len(self.executor.session_ids()) / k))

    def _take(self) -> list[_Queued]:
        """The oldest queued steps up to max_batch_tokens and the row cap (at least one), dropping
        abandoned ones."""
        self._queue = [q for q in self._queue if not q.abandoned()]
        batch: list[_Queued] = []
        tokens, cap = 0, self._rows_cap()
        while self._queue and len(batch) < cap:
            n = _tokens(self._queue[0].request)
            if batch and tokens + n > self.max_batch_tokens:
                break
            batch.append(self._queue.pop(0))
            tokens += n
        return batch

    def _due_until(self, now: float) -> float | None:
        """Until when to wait for the sessions that are due and not queued (None: none is due)."""
        live = [q for q in self._queue if not q.abandoned()]
        if self.closed or sum(_tokens(q.request) for q in live) >= self.max_batch_tokens:
            return None
        if len(live) >= self._rows_cap():
            return None
        queued, open_now = {q.request.session_id for q in live}, set(self.executor.session_ids())
        until = None
        for sid, pace in self._pace.items():
            if pace.round_s is None or sid in queued or sid not in open_now:
                continue
            if now > pace.last_s + STALE_ROUNDS * pace.round_s:
                continue
            expected = pace.last_s + pace.round_s
            if expected <= now + self.batch_wait_s and now < expected + LATE_ROUNDS * pace.round_s:
                until = max(until or now, expected + LATE_ROUNDS * pace.round_s)
        return until

    async def _wait_arrival(self, timeout_s: float) -> bool:
        """Wait for the next submit (or forget) at most `timeout_s`; False if none came."""
        self._arrival = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._arrival, timeout_s)
            return True
        except asyncio.TimeoutError:  # builtin TimeoutError only from Python 3.11
            return False
        finally:
            self._arrival = None

    async def _gather(self) -> None:
        """Wait for the sessions that are due until the queue holds a full pass, at most batch_wait_s."""
        deadline = self.clock() + self.batch_wait_s
        while (until := self._due_until(self.clock())) is not None and (
            remaining := min(until, deadline) - self.clock()
        ) > 0:
            self.gathering.set()
            try:
                if not await self._wait_arrival(remaining):
                    return
            finally:
                self.gathering.clear()

    async def _window(self) -> None:
        """At the head, wait until fewer than K passes are in flight."""
        if self.micro_batches is None:
            return
        while not self.closed:
            now, open_now = time.monotonic(), set(self.executor.session_ids())
            self._in_flight = [
                (sessions, ran) for sessions, ran in self._in_flight
                if sessions <= open_now and now - ran < self.in_flight_s
            ]  # fmt: skip
            if len(self._in_flight) < max(1, self.micro_batches()):
                return
            await self._wait_arrival(max(0.001, self._in_flight[0][1] + self.in_flight_s - now))

    async def _drain(self) -> None:
        while not self.closed:
            waited = time.monotonic()
            await self._window()
            if self.batch_wait_s > 0:
                await self._gather()
            started, begun = time.monotonic(), self.clock()
            batch = [] if self.closed else self._take()
            if not batch:
                return
            outcomes: list[Outcome]
            try:
                requests = [q.request for q in batch]
                loop = asyncio.get_running_loop()
                outcomes = list(await loop.run_in_executor(self.threads, self.executor.step_many, requests))
            except asyncio.CancelledError:
                for q in batch:
                    if q.future is not None:
                        q.future.cancel()
                raise
            except Exception as e:  # a fault in the forward pass itself (out of memory?): every step in it fails
                log.exception("forward pass of %d step(s) failed", len(batch))
                outcomes = [MessageRejected("stage_failed", f"the forward pass failed: {e}") for _ in batch]
            ran_ms, waited_ms = 1000 * (time.monotonic() - started), 1000 * (started - waited)
            ran = [q for q, outcome in zip(batch, outcomes, strict=True) if isinstance(outcome, StepResult)]
            self.stats.passes += bool(ran)
            self.stats.steps += len(ran)
            if ran:
                self.stats.pass_s += ran_ms / 1000
                self.stats.queued_s += sum(max(0.0, begun - q.arrived_s) for q in ran)
            log.debug("pass of %d step(s), %d token(s): waited %.1f ms, ran %.1f ms",
                      len(ran), sum(_tokens(q.request) for q in ran), waited_ms, ran_ms)  # fmt: skip
            self._paced(ran)
            if self.micro_batches is not None and ran:
                self._in_flight.append(({q.request.session_id for q in ran}, time.monotonic()))
            self._deliver(batch, outcomes)

    def _deliver(self, batch: list[_Queued], outcomes: list[Outcome]) -> None:
        tagged = []
        for q, outcome in zip(batch, outcomes, strict=True):
            if q.future is None:
                tagged.append((q.request, q.tag, outcome))
            elif q.future.done():  # its caller went away meanwhile
                continue
            elif isinstance(outcome, StepResult):
                q.future.set_result(outcome)
            else:
                q.future.set_exception(outcome)  # an ExecutorError or a MessageRejected
        if tagged and self.on_pass is not None:
            try:
                self.on_pass(tagged)
            except Exception:
                log.exception("delivering a pass of %d step(s) failed", len(tagged))

    def _paced(self, ran: list[_Queued]) -> None:
        """Note the sessions that stepped; forget those the executor no longer holds (closed,
        evicted), so the table never outgrows its open sessions."""
        for q in ran:
            sid = q.request.session_id
            pace = self._pace.get(sid)
            if pace is None:
                self._pace[sid] = _Pace(q.arrived_s)
            else:
                pace.round_s, pace.last_s = q.arrived_s - pace.last_s, q.arrived_s
        open_now = set(self.executor.session_ids())
        self._pace = {sid: p for sid, p in self._pace.items() if sid in open_now}


def _closed() -> MessageRejected:
    return MessageRejected("not_ready", "this stage's layers changed or it is stopping; send the step again")


def _tokens(request: StepRequest) -> int:
    return int(request.inputs.shape[0] * request.inputs.shape[1])
