"""Batching at a stage: a step that finds the stage idle runs at once; the steps that arrive while a
forward pass runs go together into the next one, up to the token limit; each caller gets its own
result or refusal, and a caller that gave up is skipped. At the head of a pipeline a pass is one
micro-batch (1/K of the open sessions), at most K are in flight, and steps enqueued with a tag
come back, pass by pass, to the `on_pass` callback. The executor here is a stand-in that
records each pass and can be held inside one, so the test decides what is queued when."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from peer.errors import ExecutorError, UnknownSession
from peer.executor import StepRequest, StepResult
from swarm.batcher import Batcher, BatchStats
from swarm.errors import MessageRejected


class Recorder:
    """step_many that records the sessions of each pass; the first pass can be held until released."""

    def __init__(self, hold_first: bool = False, max_sessions: int = 64) -> None:
        self.config = SimpleNamespace(max_sessions=max_sessions)
        self.open: set[str] | None = None  # the sessions it holds; None: every session it has seen
        self.passes: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_next = False

    def session_ids(self) -> list[str]:
        return sorted(self.open if self.open is not None else {s for p in self.passes for s in p})

    def step_many(self, requests: Sequence[StepRequest]) -> list[StepResult | ExecutorError]:
        self.passes.append([r.session_id for r in requests])
        self.entered.set()
        assert self.release.wait(timeout=30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the forward pass broke")
        return [
            UnknownSession(f"{r.session_id} is not open") if r.session_id.startswith("gone")
            else StepResult(tokens=torch.tensor([len(self.passes)]))
            for r in requests
        ]  # fmt: skip


CREATED: list[Batcher] = []  # closed after each test


@pytest.fixture(autouse=True)
def close_batchers() -> Iterator[None]:
    yield
    while CREATED:
        CREATED.pop().close()


def request(session: str, tokens: int = 1) -> StepRequest:
    return StepRequest(session, torch.zeros((1, tokens), dtype=torch.int64), torch.arange(tokens))


def batcher(recorder: Recorder, max_batch_tokens: int = 64) -> Batcher:
    CREATED.append(Batcher(recorder, max_batch_tokens, 0.0, BatchStats()))  # type: ignore[arg-type]
    return CREATED[-1]


async def hold_first_pass(b: Batcher, recorder: Recorder, session: str) -> asyncio.Task[StepResult]:
    """Start a pass with `session` and return once the executor is inside it."""
    first = asyncio.ensure_future(b.step(request(session)))
    await asyncio.to_thread(recorder.entered.wait, 30)
    return first


def test_a_lone_step_runs_at_once_in_a_pass_of_its_own() -> None:
    recorder = Recorder()

    async def main() -> None:
        b = batcher(recorder)
        result = await b.step(request("a"))
        assert result.tokens is not None and int(result.tokens[0]) == 1
        await b.step(request("b"))
        assert b.stats.passes == 2 and b.stats.steps == 2

    asyncio.run(main())
    assert recorder.passes == [["a"], ["b"]]


def test_steps_queued_during_a_pass_run_together_in_the_next() -> None:
    recorder = Recorder(hold_first=True)

    async def main() -> None:
        b = batcher(recorder)
        first = await hold_first_pass(b, recorder, "a")
        later = [b.submit(request(s)) for s in ("b", "c", "d")]
        recorder.release.set()
        results = await asyncio.gather(first, *later)
        assert [int(r.tokens[0]) for r in results] == [1, 2, 2, 2]  # the pass each ran in
        assert b.stats.passes == 2 and b.stats.steps == 4

    asyncio.run(main())
    assert recorder.passes == [["a"], ["b", "c", "d"]]


def test_a_pass_takes_queued_steps_up_to_the_token_limit_in_order() -> None:
    recorder = Recorder(hold_first=True)

    async def main() -> None:
        b = batcher(recorder, max_batch_tokens=8)
        first = await hold_first_pass(b, recorder, "a")
        sizes = {"p5": 5, "q3": 3, "r1": 1, "s9": 9, "t1": 1}
        later = [b.submit(request(s, n)) for s, n in sizes.items()]
        recorder.release.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    # 5 + 3 fill a pass; 1 + 9 would pass the limit; a step over the limit on its own runs alone.
    assert recorder.passes == [["a"], ["p5", "q3"], ["r1"], ["s9"], ["t1"]]


def test_a_refused_step_fails_alone_and_a_broken_pass_fails_only_its_steps() -> None:
    recorder = Recorder(hold_first=True)

    async def main() -> None:
        b = batcher(recorder)
        first = await hold_first_pass(b, recorder, "a")
        ok, gone = b.submit(request("b")), b.submit(request("gone"))
        recorder.release.set()
        assert int((await first).tokens[0]) == 1
        assert int((await ok).tokens[0]) == 2
        with pytest.raises(UnknownSession):
            await gone
        recorder.fail_next = True
        with pytest.raises(MessageRejected) as broken:
            await b.step(request("c"))
        assert broken.value.reason == "stage_failed" and "broke" in str(broken.value)
        assert int((await b.step(request("d"))).tokens[0]) == 4  # the stage carries on
        assert b.stats.passes == 3 and b.stats.steps == 3  # passes that ran a step, and the steps they ran

    asyncio.run(main())
    assert recorder.passes == [["a"], ["b", "gone"], ["c"], ["d"]]


def test_a_full_queue_refuses_at_once_and_others_carry_on() -> None:
    recorder = Recorder(hold_first=True, max_sessions=2)

    async def main() -> None:
        b = batcher(recorder)
        first = await hold_first_pass(b, recorder, "a")
        queued = [b.submit(request("b")), b.submit(request("c"))]
        extra = b.submit(request("d"))
        assert extra.done()
        with pytest.raises(MessageRejected) as full:
            await extra
        assert full.value.reason == "cache_full" and "2 steps are queued" in str(full.value)
        recorder.release.set()
        await asyncio.gather(first, *queued)

    asyncio.run(main())
    assert recorder.passes == [["a"], ["b", "c"]]


def test_a_caller_that_gave_up_is_left_out_of_the_next_pass() -> None:
    recorder = Recorder(hold_first=True)

    async def main() -> None:
        b = batcher(recorder)
        first = await hold_first_pass(b, recorder, "a")
        quitter, stayer = b.submit(request("quitter")), b.submit(request("stayer"))
        quitter.cancel()
        recorder.release.set()
        await asyncio.gather(first, stayer)
        assert quitter.cancelled()

    asyncio.run(main())
    assert recorder.passes == [["a"], ["stayer"]]


# ---- waiting for the sessions that are due --------------------------------------------------------

ROUND_S = 10.0  # each session's pace here, on the fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def paced(sessions: list[str], recorder: Recorder, clock: FakeClock, wait_s: float = 30.0) -> Batcher:
    """A batcher that has run `sessions` together twice, ROUND_S apart; the clock is at their next round."""
    b = Batcher(recorder, 64, wait_s, BatchStats(), clock=clock)  # type: ignore[arg-type]
    CREATED.append(b)
    for _ in range(2):
        await asyncio.gather(*(b.submit(request(s)) for s in sessions))
        clock.now += ROUND_S
    return b


def test_stats_count_each_steps_wait_for_its_pass_on_the_batchers_clock() -> None:
    recorder, clock = Recorder(hold_first=True), FakeClock()

    async def main() -> Batcher:
        b = Batcher(recorder, 64, 0.0, BatchStats(), clock=clock)  # type: ignore[arg-type]
        CREATED.append(b)
        first = await hold_first_pass(b, recorder, "a")  # its pass began as it arrived: no wait
        clock.now += 2.0
        second = b.submit(request("b"))
        clock.now += 3.0
        third = b.submit(request("c"))
        clock.now += 0.5  # the next pass begins now: b waited 3.5, c 0.5
        recorder.release.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), 30)
        return b

    b = asyncio.run(main())
    assert recorder.passes == [["a"], ["b", "c"]]
    assert (b.stats.passes, b.stats.steps, b.stats.queued_s) == (2, 3, 4.0) and b.stats.pass_s > 0


def test_a_pass_waits_for_the_sessions_that_are_due_and_runs_them_together() -> None:
    recorder, clock = Recorder(), FakeClock()

    async def main() -> None:
        b = await paced(["a", "b", "c"], recorder, clock)
        first = b.submit(request("a"))
        await asyncio.wait_for(b.gathering.wait(), 10)  # the pass is holding for b and c
        assert recorder.passes[-1] == ["a", "b", "c"]  # a has not run alone
        rest = [b.submit(request("b")), b.submit(request("c"))]
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)

    asyncio.run(main())
    assert recorder.passes == [["a", "b", "c"]] * 3


def test_a_lone_session_and_a_closed_companion_cost_no_wait() -> None:
    recorder, clock = Recorder(), FakeClock()

    async def main() -> None:
        b = await paced(["a"], recorder, clock)
        await asyncio.wait_for(b.step(request("a")), 10)  # due is only itself: no wait (the wait is 30 s)
        b2 = await paced(["x", "y"], recorder, clock)
        b2.forget("y")  # closed here
        await asyncio.wait_for(b2.step(request("x")), 10)

    asyncio.run(main())
    assert recorder.passes[-1] == ["x"]


def test_sessions_far_from_due_or_long_overdue_are_not_waited_for() -> None:
    recorder, clock = Recorder(), FakeClock()

    async def main() -> None:
        b = await paced(["a", "b"], recorder, clock, wait_s=1.0)
        clock.now -= ROUND_S / 2  # b is due in 5 s: beyond the 1 s a pass may wait
        await asyncio.wait_for(b.step(request("a")), 10)
        b2 = await paced(["c", "d"], recorder, clock)
        clock.now += ROUND_S  # d is a whole round late: it went elsewhere
        await asyncio.wait_for(b2.step(request("c")), 10)
        clock.now += 4 * ROUND_S  # and after four rounds of silence it is not waited for again
        await asyncio.wait_for(b2.step(request("c")), 10)

    asyncio.run(main())
    assert recorder.passes == [["a", "b"], ["a", "b"], ["a"], ["c", "d"], ["c", "d"], ["c"], ["c"]]


def test_a_closed_batcher_refuses_steps_as_not_ready_and_the_pass_under_way_delivers() -> None:
    recorder = Recorder(hold_first=True)

    async def main() -> None:
        b = batcher(recorder)
        first = await hold_first_pass(b, recorder, "a")
        queued = b.submit(request("b"))
        b.close()
        b.close()  # twice is fine
        later = b.submit(request("c"))
        recorder.release.set()
        assert int((await first).tokens[0]) == 1
        for refused in (queued, later):
            with pytest.raises(MessageRejected) as info:
                await refused
            assert info.value.reason == "not_ready"  # recoverable: the entry sends it again

    asyncio.run(main())
    assert recorder.passes == [["a"]]


def test_a_due_session_that_does_not_come_is_waited_for_at_most_batch_wait_s() -> None:
    recorder, clock = Recorder(), FakeClock()

    async def main() -> None:
        b = await paced(["a", "b"], recorder, clock, wait_s=0.05)  # b is due now and never comes
        await asyncio.wait_for(b.step(request("a")), 10)

    asyncio.run(main())
    assert recorder.passes[-1] == ["a"]


def test_sessions_the_executor_no_longer_holds_are_not_waited_for() -> None:
    recorder, clock = Recorder(), FakeClock()

    async def main() -> None:
        b = await paced(["a", "b"], recorder, clock)
        recorder.open = {"a"}  # b was evicted, or closed without a close message reaching here
        await asyncio.wait_for(b.step(request("a")), 10)  # no wait for b (the wait would be 30 s)
        assert set(b._pace) == {"a"}  # and the table keeps only what the executor holds

    asyncio.run(main())
    assert recorder.passes[-1] == ["a"]


def test_passes_run_on_the_thread_pool_given_to_the_batcher() -> None:
    """The daemon gives each stage a compute thread of normal priority (its event loop runs niced)."""
    import concurrent.futures

    recorder, names = Recorder(), []
    step_many = recorder.step_many

    def recording(requests: Sequence[StepRequest]) -> list[StepResult | ExecutorError]:
        names.append(threading.current_thread().name)
        return step_many(requests)

    recorder.step_many = recording  # type: ignore[method-assign]
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-compute")

    async def main() -> None:
        b = Batcher(recorder, 64, 0.0, BatchStats(), threads=pool)  # type: ignore[arg-type]
        CREATED.append(b)
        await b.step(request("a"))
        await b.step(request("b"))

    try:
        asyncio.run(main())
    finally:
        pool.shutdown(wait=True)
    assert names == ["stage-compute_0", "stage-compute_0"]


# ---- micro-batches at the head of the pipeline ---------------------------------------------------


def head(recorder: Recorder, k: int, on_pass: Any = None) -> Batcher:
    """A head-of-pipeline batcher with K = `k` micro-batches in flight; a pass stays in flight until
    its sessions step again (no time limit here)."""
    b = Batcher(recorder, 64, 0.0, BatchStats(), on_pass=on_pass, micro_batches=lambda: k,  # type: ignore[arg-type]
                in_flight_s=3600.0)  # fmt: skip
    CREATED.append(b)
    return b


async def turns(n: int = 50) -> None:
    """Let the event loop run `n` rounds: whatever can happen without new input has happened."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_pass_at_the_head_takes_one_micro_batch_of_the_open_sessions() -> None:
    recorder = Recorder(hold_first=True)
    recorder.open = {f"s{i}" for i in range(6)}

    async def main() -> None:
        b = head(recorder, k=3)
        first = await hold_first_pass(b, recorder, "s0")
        later = [b.submit(request(f"s{i}")) for i in range(1, 5)]
        recorder.release.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    # Six open sessions, K = 3: at most two rows a pass, oldest first (three passes in flight now).
    assert recorder.passes == [["s0"], ["s1", "s2"], ["s3", "s4"]]


def test_at_most_k_passes_are_in_flight_until_one_of_their_sessions_comes_back() -> None:
    recorder = Recorder()
    recorder.open = {"a", "b", "c", "d"}

    async def main() -> None:
        b = head(recorder, k=1)
        await asyncio.gather(b.submit(request("a")), b.submit(request("b")))  # one pass: a, b in flight
        late = b.submit(request("c"))
        await turns()
        assert not late.done() and recorder.passes == [["a", "b"]]  # K = 1: c waits for that pass
        # a is back: its token came home, so the whole pass has cleared every stage; b's client may be slow.
        again = b.submit(request("a"))
        await asyncio.gather(late, again)
        assert recorder.passes[-1] == ["c", "a"]
        await turns()
        b.forget("c")  # a session of the pass in flight closed: that pass is over too
        await b.submit(request("d"))

    asyncio.run(main())
    assert recorder.passes[-1] == ["d"]


def test_tagged_steps_come_back_pass_by_pass_and_refusals_at_once() -> None:
    recorder = Recorder(hold_first=True, max_sessions=3)
    delivered: list[list[tuple[str, Any, str]]] = []
    second: asyncio.Future[None] | None = None

    def on_pass(items: list[tuple[Any, Any, Any]]) -> None:
        delivered.append([(r.session_id, tag, type(outcome).__name__) for r, tag, outcome in items])
        if len(delivered) == 2 and second is not None:
            second.set_result(None)

    async def main() -> None:
        nonlocal second
        second = asyncio.get_running_loop().create_future()
        b = Batcher(recorder, 64, 0.0, BatchStats(), on_pass=on_pass)  # type: ignore[arg-type]
        CREATED.append(b)
        first = await hold_first_pass(b, recorder, "a")
        for s in ("b", "gone", "c"):
            b.enqueue(request(s), tag=s.upper())
        b.enqueue(request("d"), tag="D")  # the queue holds 3: refused at once
        assert delivered == [[("d", "D", "MessageRejected")]]
        recorder.release.set()
        await first
        await asyncio.wait_for(second, 30)  # the second pass ran on the compute thread and came back
        b.close()

    asyncio.run(main())
    assert delivered[1] == [("b", "B", "StepResult"), ("gone", "GONE", "UnknownSession"), ("c", "C", "StepResult")]
    assert recorder.passes == [["a"], ["b", "gone", "c"]]
