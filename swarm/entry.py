"""The entry peer's side of a request: whichever peer a client reached owns the session. It holds
the token history, sends the prompt and then one token per step to the first stage of the current
layer map (a `pass` frame), receives each sampled token straight from the last stage (a `tokens`
frame: the pipeline is a ring) with the log-probabilities the request asked for, turns them into
text (`swarm.detokenizer`), and stops on an end-of-sequence token, a stop string or `max_tokens`.
A step that a stage refuses, or whose stage stops answering, is replayed with the whole history on
the pipeline the swarm moves on to. It also adds up the request's timings. It receives the
transport, a task group and a read-only view of the swarm; it knows tokens and text, and HTTP
formats (OpenAI's or the CLI's) are the API module's business."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from peer.errors import InvalidInput
from peer.sampling import SamplingParams, TopLogprobs
from peer.tokenizer import Tokenizer
from swarm.config import SwarmConfig
from swarm.detokenizer import Chunk, Detokenizer
from swarm.errors import MessageRejected, NotReady, Relayed
from swarm.frames import Opening, PromptLogprobs, Row, Trail, close_frame, parse_refusal, parse_tokens, pass_frame
from swarm.layer_map import MAX_STAGES, LayerMap
from swarm.link import Link
from swarm.tasks import TaskGroup
from swarm.tensors import pack
from swarm.transport import Transport, status_of
from swarm.view import SwarmView

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0  # longest wait before retrying the same layer map after a failure
FIRST_BACKOFF_S = 0.1  # the first such wait; it doubles with each failure in a row
# Refusals that a new pipeline can cure: a stage gone or moved on, or its session lost with it.
RECOVERABLE = frozenset({"unreachable", "stale_epoch", "unknown_session", "not_ready", "mismatch", "session_exists"})


@dataclass(frozen=True)
class Request:
    """One generation, already tokenized."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever comes (for benchmarks)
    # First send the prompt back as text and tokens, scored when sampling.prompt_logprobs is set
    # (OpenAI's `echo`); max_tokens may then be 0, to score the prompt alone.
    echo: bool = False


@dataclass
class Timings:
    """Where a request's time went."""

    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    compute_s: dict[str, float] = field(default_factory=dict)  # per stage (node id)
    wire_s: dict[str, float] = field(default_factory=dict)  # per hop: "entry->a", "a->b", ..., "z->entry"
    bytes_sent: int = 0
    # At this peer, from a token arriving home to the next step going out (the sampler's output
    # streamed, the next step built), summed over the steps that went out once.
    entry_s: float = 0.0

    def add_step(self, trail: Trail, names: list[str], home_wire_s: float, home_bytes: int) -> None:
        """Fold one step's trail in: per stage of the route (`names`), the wire time and bytes of the
        hop into it and its compute time; then the hop home from the last stage."""
        for i, (name, (wire, size, compute)) in enumerate(zip(names, trail, strict=False)):
            hop = f"entry->{name}" if i == 0 else f"{names[i - 1]}->{name}"
            self.wire_s[hop] = self.wire_s.get(hop, 0.0) + wire
            self.compute_s[name] = self.compute_s.get(name, 0.0) + compute
            self.bytes_sent += size
        if names:
            hop = f"{names[-1]}->entry"
            self.wire_s[hop] = self.wire_s.get(hop, 0.0) + home_wire_s
            self.bytes_sent += home_bytes

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
            "entry_s": round(self.entry_s, 6),
            "communication_overhead": round(wire / (wire + compute), 4) if wire + compute > 0 else None,
        }


@dataclass(frozen=True)
class _Home:
    """A step's token as it came home."""

    token: int
    logprob: float
    top: TopLogprobs
    prompt: PromptLogprobs
    trail: Trail
    wire_s: float  # the hop home from the last stage
    bytes_in: int  # this row's share of that hop's frame
    arrived_s: float = field(default_factory=time.perf_counter)  # when it came home


@dataclass
class _Waiting:
    """A session's step in flight, waiting for its token."""

    step: int
    route: frozenset[str]  # the stages that may refuse it
    last: str  # the stage whose tokens frame answers it
    home: asyncio.Future[_Home]


class Entry:
    """Runs generations from this peer through the swarm's current pipeline."""

    def __init__(
        self,
        peer_id: str,
        config: SwarmConfig,
        *,
        view: SwarmView,
        transport: Transport,
        tasks: TaskGroup,
        tokenizer: Tokenizer | None,
        context_tokens: int,
        vocab_size: int = 1 << 31,
    ) -> None:
        self.peer_id = peer_id
        self.config = config
        self.view = view
        self.transport = transport
        self.tasks = tasks
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens  # the model's context (max_position_embeddings)
        self.vocab_size = vocab_size  # a token id from a last stage is below it
        self.limit = asyncio.Semaphore(config.serving.max_concurrent_requests)
        self.waiting = 0  # requests queued for a free slot
        self.max_waiting = 4 * config.serving.max_concurrent_requests
        self._steps: dict[str, _Waiting] = {}  # session -> its step in flight (one per generation)
        transport.handlers["tokens"] = self.on_tokens
        transport.handlers["refused"] = self.on_refused
        transport.on_link_closed.append(self.on_link_closed)

    def check(self, request: Request) -> None:
        """Refuse a request this swarm cannot run, before anything is sent."""
        context = self.context_tokens
        if not request.prompt_ids:
            raise InvalidInput("the prompt must have at least one token")
        if request.max_tokens < (0 if request.echo else 1):
            raise InvalidInput("max_tokens must be at least 1 (or 0 with echo, to score the prompt alone)")
        if len(request.prompt_ids) + request.max_tokens > context:
            raise InvalidInput(
                f"the prompt's {len(request.prompt_ids)} tokens plus max_tokens {request.max_tokens} exceed "
                f"the model's context of {context} tokens"
            )

    async def generate(self, request: Request, timings: Timings) -> AsyncGenerator[Chunk, None]:
        """Yield the generation's chunks of text, with the tokens that make each (`echo`: the prompt's
        first); the last one has a finish_reason. The session is closed on every stage however it ends."""
        self.check(request)
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if self.limit.locked() and self.waiting >= self.max_waiting:
            raise NotReady(f"this peer is busy: {self.waiting} requests are already waiting; try again shortly")
        self.waiting += 1
        try:
            await self.limit.acquire()
        finally:
            self.waiting -= 1
        try:
            pipe = _Pipeline(self.view, await self.wait_ready())  # the map of the moment the request gets its turn
            prompt = request.prompt_ids
            sampling = request.sampling
            if sampling.prompt_logprobs and not request.echo:
                sampling = replace(sampling, prompt_logprobs=False)
            opening = Opening(len(prompt) + request.max_tokens, sampling, prompt_tokens=len(prompt))
            text = Detokenizer(tokenizer, prompt, request.stop)
            history = list(prompt)  # every token the session has, prompt and generated
            ids, start = list(prompt), 0
            try:
                came: float | None = None  # when the last token came home
                for n in range(max(request.max_tokens, 1)):
                    sent = pipe.steps
                    home, ids, start = await self._step(pipe, history, ids, start, opening, first=n == 0)
                    if n == 0 and request.echo:
                        yield text.prompt(home.prompt)
                        # A replay scores nothing again: the prompt's log-probabilities are home.
                        opening = replace(opening, sampling=replace(sampling, prompt_logprobs=False))
                    if request.max_tokens == 0:
                        timings.total_s = time.perf_counter() - timings.started
                        yield Chunk("", (), "length")
                        return
                    if came is not None and pipe.steps == sent + 1:  # not replayed
                        timings.entry_s += pipe.sent_s - came
                    came = home.arrived_s
                    timings.add_step(home.trail, pipe.names, home.wire_s, home.bytes_in)
                    timings.tokens += 1
                    if timings.first_token_s is None:
                        timings.first_token_s = time.perf_counter() - timings.started
                    token = home.token
                    start += len(ids)
                    ids = [token]
                    history.append(token)
                    eos = token in tokenizer.eos_token_ids and not request.ignore_eos
                    chunk = text.add(token, home.logprob, home.top, end_of_sequence=eos)
                    if chunk.finish_reason is None and n == request.max_tokens - 1:
                        last = text.finish()
                        chunk = Chunk(chunk.text + last.text, chunk.tokens + last.tokens, last.finish_reason)
                    if chunk.finish_reason is not None:
                        timings.total_s = time.perf_counter() - timings.started
                        yield chunk
                        return
                    if chunk.text or chunk.tokens:
                        yield chunk
            finally:
                timings.total_s = time.perf_counter() - timings.started
                self._steps.pop(pipe.session, None)
                self._close(pipe)
        finally:
            self.limit.release()

    async def wait_ready(self) -> LayerMap:
        """The current layer map once every stage of it is loaded. NotReady at once when the live
        peers cannot hold the model, or after `serving.recovery_timeout_s` of waiting."""
        view = self.view
        deadline = time.monotonic() + self.config.serving.recovery_timeout_s
        while True:
            _check_running(view)
            layer_map = view.layer_map
            if layer_map is not None and view.ready():
                return layer_map
            too_small = view.capacity_error()
            if too_small is not None:
                raise NotReady(too_small)
            left = deadline - time.monotonic()
            if left <= 0:
                errors = "; ".join(view.errors()) or "its layers are still being assigned or loaded"
                raise NotReady(f"the swarm is not ready: {errors}")
            await view.changes.wait(left)

    async def _step(
        self, pipe: _Pipeline, history: list[int], ids: list[int], start: int, opening: Opening, first: bool
    ) -> tuple[_Home, list[int], int]:
        """One step through the pipeline; if a stage fails or the layer map moves on, wait for the
        new map to be ready and replay the whole history through it. Returns the token as it came
        home, and the input and start actually used (the history from 0 after a replay)."""
        deadline = time.monotonic() + self.config.serving.recovery_timeout_s
        while True:
            _check_running(self.view)
            try:
                home = await self._watched(pipe, ids, start, opening if first else None)
                pipe.retries = 0
                return home, ids, start
            except MessageRejected as e:
                if e.reason not in RECOVERABLE:
                    raise
                failed = e
            if failed.reason == "unreachable":  # probe the route now; gossip would take its timeouts
                for stage in pipe.route:
                    self.tasks.spawn(self.view.check_peer(stage.peer_id, str(failed)))
            log.warning("session %s on epoch %d: %s; replaying %d tokens once the swarm is ready again",
                        pipe.session[:8], pipe.epoch, failed, len(history))  # fmt: skip
            self._steps.pop(pipe.session, None)
            # Closed before the replay opens a new session: the old one's KV cache is not held twice.
            self._send_close(pipe.route[0], pipe.map_id, pipe.epoch, pipe.session)
            await pipe.renew(deadline, failed, self.config)
            ids, start, first = list(history), 0, True

    async def _watched(self, pipe: _Pipeline, ids: list[int], start: int, opening: Opening | None) -> _Home:
        """Send a step and wait for its token, watching it, so that a stage that stops answering
        (paused, its host gone silent) is caught by this peer itself: a step with no token for
        `serving.hop_check_after_s` has its route's stages probed, again every gossip interval. A
        stage found dead, the map moving on to a new epoch that is ready, or no token within
        `serving.step_timeout_s` abandons the step as a recoverable failure."""
        serving = self.config.serving
        pipe.steps += 1
        home: asyncio.Future[_Home] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(pipe.steps, frozenset(s.peer_id for s in pipe.route), pipe.route[-1].peer_id, home)
        self._steps[pipe.session] = waiting
        if opening is not None:
            opening = replace(opening, history=tuple(ids))
        row = Row(pipe.session, self.peer_id, pipe.steps, start, len(ids), opening)  # opening: with the step's ids
        frame = pass_frame(pipe.map_id, pipe.epoch, [row], pack(torch.tensor([ids], dtype=torch.int64)))
        first = pipe.route[0]
        check: asyncio.Task[tuple[str, str] | None] | None = None
        give_up = time.monotonic() + serving.step_timeout_s
        try:
            pipe.sent_s = time.perf_counter()
            await self.transport.send(first.peer_id, first.url, frame)
            done, _ = await asyncio.wait({home}, timeout=serving.hop_check_after_s)
            while not done:
                if time.monotonic() >= give_up:
                    raise MessageRejected("unreachable", f"no token within {serving.step_timeout_s:g} s")
                check = asyncio.create_task(self._check_route(pipe))
                await asyncio.wait([home, check], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
                if home.done():
                    break
                problem = check.result()
                if problem is not None:
                    raise MessageRejected(*problem)
                done, _ = await asyncio.wait({home}, timeout=self.config.gossip.interval_s)
            return home.result()
        finally:
            if self._steps.get(pipe.session) is waiting:
                del self._steps[pipe.session]
            for task in (home, check):
                if task is not None and not task.done():
                    task.cancel()
                elif task is not None and not task.cancelled():
                    task.exception()  # seen: a refusal that came after the step was given up is no error

    async def _check_route(self, pipe: _Pipeline) -> tuple[str, str] | None:
        """Why the pipeline of a step that is taking long cannot answer, if it cannot."""
        view = self.view
        layer_map = view.layer_map
        if layer_map is not None and layer_map.id != pipe.map_id and view.ready():
            return "stale_epoch", f"the layer map moved on to epoch {layer_map.epoch} during the step"
        why = f"no token for over {self.config.serving.hop_check_after_s:g} s"
        dead = await asyncio.gather(*(view.check_peer(s.peer_id, why) for s in pipe.route))
        gone = [name for name, is_dead in zip(pipe.names, dead, strict=True) if is_dead]
        return ("unreachable", f"stage(s) {', '.join(gone)} stopped answering ({why})") if gone else None

    # ---- frames home ----------------------------------------------------------------------------------

    def on_tokens(self, sender: str, body: dict[str, Any], wire_s: float, size: int) -> None:
        """Tokens from a last stage: each answers its session's step in flight, if it is the one."""
        rows = parse_tokens(body, max_rows=self.config.peer.executor.max_sessions, max_stages=MAX_STAGES)
        vocab = self.vocab_size
        for row in rows:
            waiting = self._steps.get(row.session)
            tops = (row.top, *(top for _, top in row.prompt))
            if row.token >= vocab or any(t >= vocab for top in tops for t, _ in top):
                raise MessageRejected("malformed", f"a token id outside the vocabulary of {vocab}")
            if waiting is None or waiting.step != row.step or waiting.last != sender or waiting.home.done():
                log.debug("a token from %s for session %s step %d that nobody waits for", sender, row.session[:8],
                          row.step)  # fmt: skip
                continue
            home = _Home(row.token, row.logprob, row.top, row.prompt, row.trail, wire_s, size // len(rows))
            waiting.home.set_result(home)

    def on_refused(self, sender: str, body: dict[str, Any], wire_s: float = 0.0, size: int = 0) -> None:
        """A stage refused steps: each fails with the stage's reason, if it is the step in flight."""
        refusal = parse_refusal(body, max_rows=self.config.peer.executor.max_sessions)
        for session, step in refusal.rows:
            waiting = self._steps.get(session)
            if waiting is None or waiting.step != step or sender not in waiting.route or waiting.home.done():
                continue
            where = f"stage {self.view.name_of(sender)}"
            waiting.home.set_exception(
                Relayed(refusal.reason, f"{where}: {refusal.message}", status_of(refusal.reason))
            )

    def on_link_closed(self, peer_id: str, link: Link) -> None:
        """A link to a stage closed: the steps that went that way, or were to come home that way,
        may be lost; they are replayed (at once when either side closed it on purpose: the hop is fine)."""
        for waiting in self._steps.values():
            if peer_id in waiting.route and not waiting.home.done():
                why = f"the link to stage {self.view.name_of(peer_id)} closed"
                error = MessageRejected("not_ready", f"{why} ({link.retired})") if link.retired else None
                waiting.home.set_exception(error or MessageRejected("unreachable", why))

    def stop(self) -> None:
        """This peer is shutting down: every step in flight ends now, with NotReady."""
        for waiting in self._steps.values():
            if not waiting.home.done():
                waiting.home.set_exception(NotReady("this peer is shutting down; send the request to another peer"))

    def _close(self, pipe: _Pipeline) -> None:
        self._send_close(pipe.route[0], pipe.map_id, pipe.epoch, pipe.session)

    def _send_close(self, first: Any, map_id: str, epoch: int, session: str) -> None:
        async def send() -> None:
            try:
                await self.transport.send(first.peer_id, first.url, close_frame(map_id, epoch, [session]))
            except MessageRejected as e:  # stages evict abandoned sessions on their own
                log.debug("closing session %s: %s", session[:8], e)

        self.tasks.spawn(send())


class _Pipeline:
    """The route a session runs on, and its renewal after a failure."""

    def __init__(self, view: SwarmView, layer_map: LayerMap) -> None:
        self.view = view
        self.retries = 0  # renewals so far
        self.steps = 0  # steps sent on this pipeline (echoed home, so a late token is told apart)
        self.sent_s = 0.0  # when the latest step went out (time.perf_counter)
        self._use(layer_map)

    def _use(self, layer_map: LayerMap) -> None:
        self.epoch, self.map_id = layer_map.epoch, layer_map.id
        self.route = list(layer_map.stages)
        self.session = uuid.uuid4().hex
        self.names = [self.view.name_of(s.peer_id) for s in self.route]

    async def renew(self, deadline: float, failed: MessageRejected, config: SwarmConfig) -> None:
        """Wait until the swarm is ready on a new pipeline. After a stage was unreachable that is a
        newer map (or the same one, if after a dead timeout its stage still answers gossip); after
        any other failure (a stage behind or ahead by an epoch, its session lost) the same map may
        serve again, after a short backoff. NotReady at once when the live peers cannot hold the
        model, or at the deadline."""
        view = self.view
        self.retries += 1
        wait = 0.0 if failed.reason != "unreachable" else config.gossip.dead_after_s + 2 * config.gossip.interval_s
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self.retries - 1))
        same_map_after = time.monotonic() + max(wait, backoff)
        while True:
            _check_running(view)
            too_small = view.capacity_error()
            if too_small is not None:
                raise NotReady(f"the swarm could not continue the generation ({failed}): {too_small}")
            layer_map, now = view.layer_map, time.monotonic()
            moved_on = layer_map is not None and (layer_map.id != self.map_id or now >= same_map_after)
            if layer_map is not None and moved_on and view.ready():
                self._use(layer_map)
                return
            if now >= deadline:
                missing = "; ".join(view.errors()) or "no layer map is ready"
                raise NotReady(f"the swarm could not continue the generation ({failed}): {missing}")
            wake = deadline if layer_map is None or layer_map.id != self.map_id else min(deadline, same_map_after)
            await view.changes.wait(max(0.0, wake - now))


def _check_running(view: SwarmView) -> None:
    if view.stopping:
        raise NotReady("this peer is shutting down; send the request to another peer")
