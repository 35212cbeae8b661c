"""The entry peer's side of a request: whichever peer a client reached owns the session. It holds
the token history, sends the prompt and then one token per step to the first stage of the current
layer map, receives each sampled token back from the last, decodes text as it streams, and stops
on an end-of-sequence token, a stop string or `max_tokens`. It also adds up the request's timings.
It knows tokens and text; HTTP formats (OpenAI's or the CLI's) are the API module's business."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from peer.errors import InvalidInput
from peer.sampling import SamplingParams
from swarm.errors import MessageRejected
from swarm.stage_service import route_json
from swarm.tensors import pack

if TYPE_CHECKING:
    from swarm.layer_map import LayerMap
    from swarm.node import Node

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
RENEW_POLL_S = 0.1  # how often a session waiting for a new pipeline looks again
MAX_BACKOFF_S = 2.0  # longest wait before retrying the same layer map after a failure
# Refusals that a new pipeline can cure: a stage gone or moved on, or its session lost with it.
RECOVERABLE = frozenset({"unreachable", "stale_epoch", "unknown_session", "not_ready", "mismatch", "session_exists"})


class NotReady(Exception):
    """The swarm has no complete, loaded layer map right now, or this peer has too much queued."""


@dataclass(frozen=True)
class Request:
    """One generation, already tokenized."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever comes (for benchmarks)


@dataclass
class Timings:
    """Where a request's time went."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    compute_s: dict[str, float] = field(default_factory=dict)  # per stage (node id)
    wire_s: dict[str, float] = field(default_factory=dict)  # per hop "a->b", and "entry->first"
    bytes_sent: int = 0

    def add_step(self, timings: Any, names: list[str], entry_wire_s: float, entry_bytes: int) -> None:
        """Fold one step's per-stage timings in; `names` are the route's stages, which name them.

        What the stages report is checked: an entry that is not a sane set of numbers is ignored."""
        self.wire_s[f"entry->{names[0]}"] = self.wire_s.get(f"entry->{names[0]}", 0.0) + entry_wire_s
        self.bytes_sent += entry_bytes
        if not isinstance(timings, list):
            return
        for i, (name, this) in enumerate(zip(names, timings, strict=False)):
            compute, wire, sent = _seconds(this, "compute_s"), _seconds(this, "wire_s"), _count(this, "bytes_out")
            if compute is None or wire is None or sent is None:
                continue
            self.compute_s[name] = self.compute_s.get(name, 0.0) + compute
            if i + 1 < len(names):
                hop = f"{name}->{names[i + 1]}"
                self.wire_s[hop] = self.wire_s.get(hop, 0.0) + wire
            self.bytes_sent += sent

    def to_json(self) -> dict[str, Any]:
        """The `timings` object of a response."""
        compute, wire = sum(self.compute_s.values()), sum(self.wire_s.values())
        decode_s = self.total_s - (self.first_token_s or 0.0)
        return {
            "time_to_first_token_s": round(self.first_token_s or 0.0, 6),
            "total_s": round(self.total_s, 6),
            "tokens": self.tokens,
            "tokens_per_s": round((self.tokens - 1) / decode_s, 3) if self.tokens > 1 and decode_s > 0 else None,
            "compute_s_per_stage": {k: round(v, 6) for k, v in self.compute_s.items()},
            "wire_s_per_hop": {k: round(v, 6) for k, v in self.wire_s.items()},
            "bytes_sent": self.bytes_sent,
            "communication_overhead": round(wire / (wire + compute), 4) if wire + compute > 0 else None,
        }


@dataclass(frozen=True)
class Event:
    """One step of a generation as the client sees it."""

    text: str  # new text, possibly empty while a stop string might still be forming
    token: int | None  # the token sampled this step (None on the final event of a stop string)
    logprob: float | None
    finish_reason: str | None = None  # "stop" or "length" on the last event


class Entry:
    """Runs generations from this peer through the swarm's current pipeline."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.limit = asyncio.Semaphore(node.config.serving.max_concurrent_requests)
        self.waiting = 0  # requests queued for a free slot
        self.max_waiting = 4 * node.config.serving.max_concurrent_requests

    def check(self, request: Request) -> None:
        """Refuse a request this swarm cannot run, before anything is sent."""
        context = self.node.model.profile.max_position_embeddings
        if not request.prompt_ids:
            raise InvalidInput("the prompt must have at least one token")
        if request.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        if len(request.prompt_ids) + request.max_tokens > context:
            raise InvalidInput(
                f"the prompt's {len(request.prompt_ids)} tokens plus max_tokens {request.max_tokens} exceed "
                f"the model's context of {context} tokens"
            )

    async def generate(self, request: Request, timings: Timings) -> AsyncGenerator[Event, None]:
        """Yield the generation's events; the session is closed on every stage however it ends."""
        self.check(request)
        node, tokenizer = self.node, self.node.tokenizer
        assert tokenizer is not None
        if self.limit.locked() and self.waiting >= self.max_waiting:
            raise NotReady(f"this peer is busy: {self.waiting} requests are already waiting; try again shortly")
        self.waiting += 1
        try:
            await self.limit.acquire()
        finally:
            self.waiting -= 1
        try:
            pipe = _Pipeline(node, await self.wait_ready())  # the map of the moment the request gets its turn
            opening = {"max_length": len(request.prompt_ids) + request.max_tokens, "sampling": _sampling_json(request)}
            decoder = tokenizer.stream(request.prompt_ids)
            text, emitted, hold = "", 0, max(0, max((len(s) for s in request.stop), default=1) - 1)
            history = list(request.prompt_ids)  # every token the session has, prompt and generated
            ids, start = list(request.prompt_ids), 0
            try:
                for n in range(request.max_tokens):
                    t0 = time.perf_counter()
                    reply, sent, ids, start = await self._step(pipe, history, ids, start, opening, first=n == 0)
                    token, logprob = _token_of(reply)
                    elapsed = time.perf_counter() - t0
                    pipeline = reply.get("elapsed_s")
                    pipeline_s = (
                        float(pipeline) if isinstance(pipeline, float) and 0 <= pipeline <= elapsed else elapsed
                    )
                    timings.add_step(reply.get("timings"), pipe.names, elapsed - pipeline_s, sent)
                    timings.tokens += 1
                    if timings.first_token_s is None:
                        timings.first_token_s = time.perf_counter() - timings.started
                    start += len(ids)
                    ids = [token]
                    history.append(token)
                    if token in tokenizer.eos_token_ids and not request.ignore_eos:
                        timings.total_s = time.perf_counter() - timings.started
                        yield Event(text[emitted:] + decoder.flush(), token, logprob, "stop")
                        return
                    text += decoder.push(token)
                    cut = _first_stop(text, request.stop)
                    if cut is not None:
                        timings.total_s = time.perf_counter() - timings.started
                        yield Event(text[emitted:cut], token, logprob, "stop")
                        return
                    last = n == request.max_tokens - 1
                    if last:
                        text += decoder.flush()
                        timings.total_s = time.perf_counter() - timings.started
                        yield Event(text[emitted:], token, logprob, "length")
                        return
                    safe = max(emitted, len(text) - hold)
                    yield Event(text[emitted:safe], token, logprob)
                    emitted = safe
            finally:
                timings.total_s = time.perf_counter() - timings.started
                node._spawn(self._close(pipe.route[0], dict(pipe.base)))
        finally:
            self.limit.release()

    async def wait_ready(self) -> LayerMap:
        """The current layer map once every stage of it is loaded. NotReady at once when the live
        peers cannot hold the model, or after `serving.recovery_timeout_s` of waiting."""
        node = self.node
        deadline = time.monotonic() + node.config.serving.recovery_timeout_s
        while True:
            _check_running(node)
            if node.layer_map is not None and node.ready():
                return node.layer_map
            too_small = node.capacity_error()
            if too_small is not None:
                raise NotReady(too_small)
            if time.monotonic() >= deadline:
                errors = "; ".join(node.status()["errors"]) or "its layers are still being assigned or loaded"
                raise NotReady(f"the swarm is not ready: {errors}")
            await asyncio.sleep(RENEW_POLL_S)

    async def _step(
        self, pipe: _Pipeline, history: list[int], ids: list[int], start: int, opening: dict[str, Any], first: bool
    ) -> tuple[dict[str, Any], int, list[int], int]:
        """One step through the pipeline; if a stage fails or the layer map moves on, wait for the
        new map to be ready and replay the whole history through it. Returns the reply, the bytes
        sent, and the input and start actually used (the history from 0 after a replay)."""
        deadline = time.monotonic() + self.node.config.serving.recovery_timeout_s
        while True:
            _check_running(self.node)
            body = {**pipe.base, "start": start, "input": pack(torch.tensor([ids], dtype=torch.int64))}
            if first:
                body["open"] = opening
            try:
                reply, sent = await self._watched(pipe, body)
                pipe.retries = 0
                return reply, sent, ids, start
            except MessageRejected as e:
                if e.reason not in RECOVERABLE:
                    raise
                failed = e
            if failed.reason == "unreachable":  # probe the route now; gossip would take its timeouts
                for stage in pipe.route:
                    self.node._spawn(self.node.check_peer(stage.peer_id, str(failed)))
            log.warning("session %s on epoch %d: %s; replaying %d tokens once the swarm is ready again",
                        pipe.session[:8], pipe.epoch, failed, len(history))  # fmt: skip
            old = (pipe.route[0], dict(pipe.base))
            await pipe.renew(deadline, failed)
            self.node._spawn(self._close(*old))
            ids, start, first = list(history), 0, True

    async def _watched(self, pipe: _Pipeline, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Send a step and watch it, so that a stage that stops answering (paused, its host gone
        silent) is caught by this peer itself: a step with no reply for `serving.hop_check_after_s`
        has its route's stages probed, again every gossip interval. A stage found dead, or the map
        moving on to a new epoch that is ready, abandons the step as a recoverable failure."""
        node = self.node
        step = asyncio.ensure_future(node.data_request(pipe.route[0], "step", body))
        check: asyncio.Future[tuple[str, str] | None] | None = None
        try:
            done, _ = await asyncio.wait({step}, timeout=node.config.serving.hop_check_after_s)
            while not done:
                check = asyncio.ensure_future(self._check_route(pipe))
                await asyncio.wait([step, check], return_when=asyncio.FIRST_COMPLETED)
                if step.done():
                    break
                problem = check.result()
                if problem is not None:
                    raise MessageRejected(*problem)
                done, _ = await asyncio.wait({step}, timeout=node.config.gossip.interval_s)
            return step.result()
        finally:
            for task in (step, check):
                if task is not None and not task.done():
                    task.cancel()

    async def _check_route(self, pipe: _Pipeline) -> tuple[str, str] | None:
        """Why the pipeline of a step that is taking long cannot answer, if it cannot."""
        node = self.node
        layer_map = node.layer_map
        if layer_map is not None and layer_map.id != pipe.map_id and node.ready():
            return "stale_epoch", f"the layer map moved on to epoch {layer_map.epoch} during the step"
        why = f"no reply to a step for over {node.config.serving.hop_check_after_s:g} s"
        dead = await asyncio.gather(*(node.check_peer(s.peer_id, why) for s in pipe.route))
        gone = [name for name, is_dead in zip(pipe.names, dead, strict=True) if is_dead]
        return ("unreachable", f"stage(s) {', '.join(gone)} stopped answering ({why})") if gone else None

    async def _close(self, first: Any, base: dict[str, Any]) -> None:
        with contextlib.suppress(MessageRejected):  # stages evict abandoned sessions on their own
            await self.node.data_request(first, "close", base)


def _seconds(entry: Any, key: str) -> float | None:
    value = entry.get(key, 0.0) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1e6:
        return None  # also NaN, which fails every comparison
    return float(value)


def _count(entry: Any, key: str) -> int | None:
    value = entry.get(key, 0) if isinstance(entry, dict) else None
    return value if type(value) is int and 0 <= value < 1 << 40 else None


class _Pipeline:
    """The route a session runs on, and its renewal after a failure."""

    def __init__(self, node: Node, layer_map: LayerMap) -> None:
        self.node = node
        self.retries = 0  # renewals so far
        self._use(layer_map)

    def _use(self, layer_map: LayerMap) -> None:
        self.epoch, self.map_id = layer_map.epoch, layer_map.id
        self.route = list(layer_map.stages)
        self.session = uuid.uuid4().hex
        self.base: dict[str, Any] = {"session": self.session, "epoch": layer_map.epoch, "map": layer_map.id}
        self.base["route"] = route_json(self.route)
        self.names = [self.node.name_of(s.peer_id) for s in self.route]

    async def renew(self, deadline: float, failed: MessageRejected) -> None:
        """Wait until the swarm is ready on a new pipeline. After a stage was unreachable that is a
        newer map (or the same one, if after a dead timeout its stage still answers gossip); after
        any other failure (a stage behind or ahead by an epoch, its session lost) the same map may
        serve again, after a short backoff. NotReady at once when the live peers cannot hold the
        model, or at the deadline."""
        node = self.node
        self.retries += 1
        wait = (
            0.0
            if failed.reason != "unreachable"
            else node.config.gossip.dead_after_s + 2 * node.config.gossip.interval_s
        )
        same_epoch_after = time.monotonic() + max(wait, min(MAX_BACKOFF_S, RENEW_POLL_S * 2 ** (self.retries - 1)))
        while True:
            _check_running(node)
            too_small = node.capacity_error()
            if too_small is not None:
                raise NotReady(f"the swarm could not continue the generation ({failed}): {too_small}")
            layer_map = node.layer_map
            moved_on = layer_map is not None and (layer_map.id != self.map_id or time.monotonic() >= same_epoch_after)
            if layer_map is not None and moved_on and node.ready():
                self._use(layer_map)
                return
            if time.monotonic() >= deadline:
                missing = "; ".join(node.status()["errors"]) or "no layer map is ready"
                raise NotReady(f"the swarm could not continue the generation ({failed}): {missing}")
            await asyncio.sleep(RENEW_POLL_S)


def _check_running(node: Node) -> None:
    if node.stopping:
        raise NotReady("this peer is shutting down; send the request to another peer")


def _sampling_json(request: Request) -> dict[str, Any]:
    s = request.sampling
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed}


def _token_of(reply: dict[str, Any]) -> tuple[int, float]:
    token, logprob = reply.get("token"), reply.get("logprob")
    if type(token) is not int or not isinstance(logprob, float):
        raise MessageRejected("malformed", "the last stage's reply has no token")
    return token, logprob


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, if any has appeared."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
