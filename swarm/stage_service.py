"""This peer's stage in the data plane. A `pass` frame (`swarm.frames`) brings rows, each one
session's step, from the entry peer (to the first stage) or from the stage before. The stage checks
the frame against the layer map it follows, opens the sessions that start here, and queues the rows
on its batcher (`swarm.batcher`), which runs them in forward passes in a worker thread. Each pass
leaves as one frame: hidden states to the next stage, or, from the last stage, the sampled tokens
straight home to each session's entry peer, so that no stage waits on a reply. Rows that cannot run
are refused to their entry peer with the reason; a link to the next stage that breaks is reported
the same way for the rows sent over it, and the peer behind it is probed (`on_unreachable`). A
`close` frame walks the pipeline the same way. The service receives the transport, a task group, a
read-only view of the swarm and the stage it holds; it never reaches into the node."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from peer.errors import CacheFull, ExecutorError, SessionExists, UnknownSession
from peer.executor import StageExecutor, StepRequest, StepResult
from peer.grammar import Grammars
from peer.stage import StageModel
from swarm.batcher import Batcher, BatchStats, Outcome
from swarm.config import SwarmConfig
from swarm.errors import MessageRejected
from swarm.frames import (
    Pass,
    Row,
    Sampled,
    close_frame,
    parse_close,
    parse_pass,
    pass_frame,
    refusal_frame,
    tokens_frame,
)
from swarm.layer_map import MAX_STAGES, LayerMap, Stage
from swarm.link import Link
from swarm.tasks import TaskGroup
from swarm.tensors import pack, unpack
from swarm.transport import Transport
from swarm.view import SwarmView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opened:
    """What a stage remembers of a session it opened."""

    map_id: str  # the layer map it was opened on
    epoch: int
    entry: str  # the peer that owns it


@dataclass(frozen=True)
class _Queued:
    """A row on its way through this stage's batcher."""

    row: Row  # its entry resolved
    map_id: str
    epoch: int
    next: Stage | None  # where its hidden states go; None on the last stage
    wire_s: float  # the hop into this stage
    bytes_in: int  # this row's share of that hop's frame
    opened: bool  # opened by this step: closed again if the step fails


@dataclass(frozen=True)
class _Sent:
    """The latest step of a session this stage sent on, and over which link."""

    entry: str
    step: int
    link: Link


class StageService:
    """Runs this peer's layers for every session that passes through it."""

    def __init__(
        self,
        peer_id: str,
        config: SwarmConfig,
        *,
        stage: Callable[[], StageModel | None],
        view: SwarmView,
        grammars: Callable[[], Grammars | None] = lambda: None,
        transport: Transport,
        tasks: TaskGroup,
        on_unreachable: Callable[[str, str], None],
    ) -> None:
        self.peer_id = peer_id
        self.config = config
        self._stage_source = stage  # the stage model held now (None while standing by)
        self._grammars = grammars  # the tokenizer's grammar form, with the last stage
        self.view = view
        self.transport = transport
        self.tasks = tasks
        self.on_unreachable = on_unreachable  # a peer this stage could not send to, and why
        self.max_rows = config.peer.executor.max_sessions
        self._executor: StageExecutor | None = None
        self._batcher: Batcher | None = None
        self.batches = BatchStats()  # over every executor this stage has had
        # Frames of results this stage sent out on a link (onward, or tokens home), and the seconds
        # from their pass's end to each being written to its link (a first frame's dial included).
        self.frames_out = 0
        self.send_s = 0.0
        self._stage: StageModel | None = None
        self._opened: dict[str, Opened] = {}  # session -> its layer map and entry peer
        self._sent: dict[str, _Sent] = {}  # session -> the latest step sent on from here
        self._machines = ("", 1)  # (layer-map id, the machines its stages run on)
        self.dropped = 0  # sessions dropped because their layer map was abandoned or their entry died
        # Where forward passes run (set by the daemon to a thread of normal priority, see
        # `swarm.daemon.lower_loop_priority`); None: asyncio's default thread pool.
        self.compute_threads: concurrent.futures.Executor | None = None
        transport.handlers["pass"] = self.on_pass
        transport.handlers["close"] = self.on_close
        transport.on_link_closed.append(self.on_link_closed)

    def executor(self) -> StageExecutor | None:
        """The executor over the stage held now (a new one, with no sessions, after each load)."""
        stage = self._stage_source()
        if stage is not self._stage:
            self._stage = stage
            if self._batcher is not None:
                self._batcher.close()
            self._executor = (
                StageExecutor(stage, self.config.peer.executor, grammars=self._grammars())
                if stage is not None
                else None
            )
            serving = self.config.serving
            head = stage is not None and stage.is_first
            self._batcher = (
                Batcher(
                    self._executor,
                    serving.max_batch_tokens,
                    serving.batch_wait_s if head else 0.0,  # later stages run each frame as it comes
                    self.batches,
                    threads=self.compute_threads,
                    on_pass=self._on_pass,
                    micro_batches=self._micro_batches if head else None,
                    in_flight_s=serving.hop_check_after_s,
                )
                if self._executor is not None
                else None
            )
            self._opened.clear()
            self._sent.clear()
        return self._executor

    def _micro_batches(self) -> int:
        """K: the configured number, or one per machine the layer map's stages run on. Stages on one
        machine share its cores, so pipelining them buys nothing, while each extra micro-batch costs a
        pass (measured on 2 cores, 3 peers, 16 sessions of SmolLM2: 4.7 x one stream with K = 3,
        6.1 x with K = 1)."""
        if self.config.serving.micro_batches:
            return self.config.serving.micro_batches
        layer_map = self.view.layer_map
        if layer_map is None:
            return 1
        if self._machines[0] != layer_map.id:  # asked several times a pass: counted once per map
            self._machines = (layer_map.id, len({urlsplit(s.url).hostname for s in layer_map.stages}))
        return self._machines[1]

    def stop(self) -> None:
        """Stop the stage's forward passes (the node is closing); safe to call twice."""
        if self._batcher is not None:
            self._batcher.close()

    def drop_other_maps(self, layer_map: LayerMap) -> None:
        """Close every session opened on another layer map that is not newer than `layer_map` (an
        older epoch, or another leader's map of the same epoch): the swarm moved on, so their entry
        peers replay them on the new pipeline and nothing will step them here again."""
        self._drop(
            lambda o: o.map_id != layer_map.id and o.epoch <= layer_map.epoch,
            f"of layer maps other than epoch {layer_map.epoch}",
        )

    def drop_entry(self, peer_id: str) -> None:
        """Close every session whose entry peer is `peer_id` (it died: nobody will step them again),
        and free their KV cache now rather than at idle eviction."""
        self._drop(lambda o: o.entry == peer_id, f"whose entry peer {peer_id} is dead")

    def _drop(self, which: Callable[[Opened], bool], why: str) -> None:
        executor = self._executor
        open_now = set(executor.session_ids()) if executor is not None else set()
        doomed = [sid for sid, o in self._opened.items() if which(o) and sid in open_now]
        self._opened = {sid: o for sid, o in self._opened.items() if sid in open_now and sid not in doomed}
        if executor is None:
            return
        dropped = sum(executor.close_session(sid) for sid in doomed)
        for sid in doomed:
            self._forget(sid)
        if dropped:
            self.dropped += dropped
            log.info("dropped %d session(s) %s", dropped, why)

    def _forget(self, session: str) -> None:
        self._sent.pop(session, None)
        if self._batcher is not None:
            self._batcher.forget(session)

    def sessions(self) -> int:
        """Sessions open on this stage."""
        ex = self._executor
        return len(ex.session_ids()) if ex is not None else 0

    # ---- a pass comes in ------------------------------------------------------------------------------

    def on_pass(self, sender: str, body: dict[str, Any], wire_s: float, size: int) -> None:
        """Take in a pass frame: queue its rows, or refuse them to their entry peers."""
        frame = parse_pass(body, max_rows=self.max_rows, max_stages=MAX_STAGES)
        # A row that has been through no stage yet comes from its entry peer itself.
        rows = [row if row.trail else _with_entry(row, sender) for row in frame.rows]
        try:
            index, layer_map, executor = self._check_frame(sender, frame, rows)
        except MessageRejected as e:
            # Refusals go to the entry peers named only where the sender may speak for them: an
            # entry for its own rows, and a member stage for the rows it passes on.
            verified = e.reason == "not_ready"  # raised only after the sender's checks passed
            if all(not r.trail for r in rows) or verified or (e.reason == "stale_epoch" and self.view.url_of(sender)):
                self._refuse(rows, e)
            if e.reason in ("malformed", "mismatch"):
                raise  # counted and logged (once per kind) by the transport
            self.transport.drops[e.reason] += 1  # an honest miss: a map that moved on, layers loading
            log.debug("refused a pass from %s: %s", sender, e)
            return
        try:
            inputs = self._inputs(frame, rows, executor)
        except MessageRejected as e:
            self._refuse(rows, e)  # their entry peers learn why at once, rather than at their watchdog
            raise
        batcher = self._batcher
        assert batcher is not None
        nxt = layer_map.stages[index + 1] if index + 1 < len(layer_map.stages) else None
        total, offset = sum(r.length for r in rows), 0
        for row in rows:
            x = inputs[:, offset : offset + row.length]
            offset += row.length
            opened = False
            owner = self._opened.get(row.session)
            if row.opening is None and owner is not None and owner.entry != row.entry:
                # Only the session's own entry peer steps it: another may not rewind its KV cache.
                self.transport.drops["mismatch"] += 1
                self._refuse([row], MessageRejected("unknown_session", f"session {row.session} is not yours"))
                continue
            if row.opening is not None:
                try:
                    o = row.opening
                    executor.open_session(row.session, o.max_length, o.sampling, history=o.history or None,
                                          prompt_tokens=o.prompt_tokens or None)  # fmt: skip
                except ExecutorError as e:
                    self._refuse([row], _rejection(e))
                    continue
                opened = True
                open_now = set(executor.session_ids())  # forget sessions closed or evicted meanwhile
                self._opened = {sid: o for sid, o in self._opened.items() if sid in open_now}
                self._opened[row.session] = Opened(frame.map_id, frame.epoch, row.entry)
            positions = torch.arange(row.start, row.start + row.length, dtype=torch.int64)
            tag = _Queued(row, frame.map_id, frame.epoch, nxt, wire_s, size * row.length // total, opened)
            batcher.enqueue(StepRequest(row.session, x, positions), tag)

    def _check_frame(self, sender: str, frame: Pass, rows: list[Row]) -> tuple[int, LayerMap, StageExecutor]:
        """This stage's index in the map the frame is for, the map, and the executor; MessageRejected
        when the frame is not for the map this stage follows, not from the stage before, or the layers
        are not loaded."""
        layer_map = self.view.layer_map
        if layer_map is None or frame.map_id != layer_map.id or frame.epoch != layer_map.epoch:
            # The id names the map's leader and term too: two leaders on two sides of a partition may
            # each have made an epoch N, and a stage must never run a session of one on the other.
            have = layer_map.id if layer_map else None
            raise MessageRejected("stale_epoch", f"a pass for layer map {frame.map_id}, this peer follows {have}")
        index = _index_of(layer_map, self.peer_id)
        if index is None:
            raise MessageRejected("mismatch", "this peer holds no stage of that layer map")
        if any(len(r.trail) != index for r in rows):
            raise MessageRejected("mismatch", f"rows that have not been through the {index} stage(s) before this one")
        if index > 0 and sender != layer_map.stages[index - 1].peer_id:
            raise MessageRejected("mismatch", "only the previous stage sends to this one")
        mine = layer_map.stages[index]
        executor = self.executor()
        if executor is None or (executor.stage.start, executor.stage.end) != (mine.start, mine.end):
            raise MessageRejected("not_ready", f"layers [{mine.start}, {mine.end}) are not loaded here yet")
        return index, layer_map, executor

    def _inputs(self, frame: Pass, rows: list[Row], executor: StageExecutor) -> torch.Tensor:
        """The frame's inputs, checked: token ids [1, ΣT] on the first stage, hidden states [1, ΣT, D] after."""
        stage, limit = executor.stage, self.config.serving.max_activation_bytes
        total = sum(r.length for r in rows)
        context = stage.config.max_position_embeddings
        if any(r.start + r.length > context for r in rows):
            raise MessageRejected("malformed", f"positions beyond the model's context of {context}")
        if stage.is_first:
            inputs = unpack(frame.input, dtype=torch.int64, shape=(1, total), max_bytes=limit)
            if int(inputs.min()) < 0 or int(inputs.max()) >= stage.config.vocab_size:
                raise MessageRejected("malformed", "token ids outside the vocabulary")
            return inputs
        inputs = unpack(frame.input, shape=(1, total, stage.config.hidden_size), max_bytes=limit)
        if not inputs.is_floating_point():
            raise MessageRejected("mismatch", f"hidden states must be floating point, not {inputs.dtype}")
        # Peers may compute in different dtypes (a GPU in bfloat16, a CPU in float32): the hidden
        # states are cast at the stage boundary, as they would be between two layers of mixed precision.
        return inputs.to(executor.dtype)

    # ---- a pass goes out ------------------------------------------------------------------------------

    def _on_pass(self, items: list[tuple[StepRequest, Any, Outcome]]) -> None:
        """One pass ran: send its hidden states on as one frame, or its tokens home; refuse what failed."""
        ended = time.monotonic()
        ran: list[tuple[_Queued, StepResult]] = []
        for _, tag, outcome in items:
            assert isinstance(tag, _Queued)
            if isinstance(outcome, StepResult):
                ran.append((tag, outcome))
                continue
            if tag.opened and self._executor is not None:
                self._executor.close_session(tag.row.session)
                self._opened.pop(tag.row.session, None)
            self._refuse([tag.row], outcome if isinstance(outcome, MessageRejected) else _rejection(outcome))
        home: dict[str, list[Sampled]] = defaultdict(list)
        onward: dict[tuple[str, int, Stage], list[tuple[_Queued, StepResult]]] = defaultdict(list)
        for tag, result in ran:  # one frame per pass, unless the map moved on in the middle of it
            if tag.next is not None:
                onward[(tag.map_id, tag.epoch, tag.next)].append((tag, result))
                continue
            assert result.tokens is not None and result.logprobs is not None
            row = tag.row
            trail = (*row.trail, (tag.wire_s, tag.bytes_in, result.compute_s))
            top, prompt = result.top[0] if result.top else (), result.prompt[0] if result.prompt else ()
            home[row.entry].append(Sampled(row.session, row.step, int(result.tokens[0]),
                                           float(result.logprobs[0]), trail, top, prompt))  # fmt: skip
        for entry, sampled in home.items():
            self.tasks.spawn(self._deliver(entry, self.view.url_of(entry), tokens_frame(sampled), ended))
        for (map_id, epoch, nxt), group in onward.items():
            rows = [_onward(tag, result) for tag, result in group]
            hidden = torch.cat([result.hidden for _, result in group if result.hidden is not None], dim=1)
            self.tasks.spawn(self._forward(nxt, pass_frame(map_id, epoch, rows, pack(hidden)), rows, ended))

    def _sent_out(self, ended: float) -> None:
        self.frames_out += 1
        self.send_s += time.monotonic() - ended

    async def _forward(self, nxt: Stage, frame: dict[str, Any], rows: list[Row], ended: float) -> None:
        try:
            link = await self.transport.send(nxt.peer_id, nxt.url, frame)
        except MessageRejected as e:
            self._refuse(rows, e)
            if e.reason == "unreachable":  # this hop: probe it now, not on gossip
                self.on_unreachable(nxt.peer_id, str(e))
            return
        if link is None:
            return
        if not link.open:  # it closed while the frame went out: the frame may be lost, and nobody else will say so
            self._refuse(rows, MessageRejected("unreachable", f"the link to {self.view.name_of(nxt.peer_id)} closed"))
            self.on_unreachable(nxt.peer_id, "the link closed as a pass went out")
            return
        self._sent_out(ended)
        if len(self._sent) > 2 * self.max_rows:  # forget sessions closed or evicted since
            open_now = set(self._executor.session_ids()) if self._executor is not None else set()
            self._sent = {sid: sent for sid, sent in self._sent.items() if sid in open_now}
        for row in rows:
            self._sent[row.session] = _Sent(row.entry, row.step, link)

    def _refuse(self, rows: list[Row], error: MessageRejected) -> None:
        """Tell each row's entry peer that it did not run, and why."""
        self._refuse_steps([(row.entry, row.session, row.step) for row in rows], error)

    def _refuse_steps(self, steps: list[tuple[str, str, int]], error: MessageRejected) -> None:
        """Tell the entry peer of each (entry, session, step) that the step did not run, one frame an entry."""
        by_entry: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for entry, session, step in steps:
            by_entry[entry].append((session, step))
        for entry, refused in by_entry.items():
            frame = refusal_frame(refused, error.reason, str(error))
            self.tasks.spawn(self._deliver(entry, self.view.url_of(entry), frame))

    async def _deliver(self, peer_id: str, url: str | None, frame: dict[str, Any], ended: float | None = None) -> None:
        """Send a frame nobody waits on here (tokens home, a refusal, a close): if it cannot go, the
        peer is gone or will find out on its own (a watchdog, idle eviction). `ended`: the end of
        the pass whose results it carries."""
        try:
            link = await self.transport.send(peer_id, url, frame)
            if ended is not None and link is not None:  # results that left on a link (not to this peer itself)
                self._sent_out(ended)
        except MessageRejected as e:
            log.debug("a %s frame could not reach %s: %s", frame["kind"], peer_id, e)

    def on_link_closed(self, peer_id: str, link: Link) -> None:
        """A link to `peer_id` closed: the steps last sent over it may be lost, so their entry
        peers hear so now (they replay them), and the peer is probed unless either side closed the
        link on purpose (a retired key, a newer link: the hop itself is fine)."""
        lost = [(sid, sent) for sid, sent in self._sent.items() if sent.link is link]
        if not lost:
            return
        for sid, _ in lost:
            del self._sent[sid]
        why = f"the link to the next stage, {self.view.name_of(peer_id)}, closed"
        error = MessageRejected(
            "not_ready" if link.retired else "unreachable", why + (f" ({link.retired})" if link.retired else "")
        )
        self._refuse_steps([(sent.entry, sid, sent.step) for sid, sent in lost], error)
        if not link.retired:
            self.on_unreachable(peer_id, str(error))

    # ---- close ----------------------------------------------------------------------------------------

    def on_close(self, sender: str, body: dict[str, Any], wire_s: float = 0.0, size: int = 0) -> None:
        """Close sessions here and on the later stages: at the first stage only their entry peer may,
        after it only the stage before. Unknown sessions are not an error."""
        map_id, sessions = parse_close(body, max_rows=self.max_rows)
        layer_map = self.view.layer_map
        index = _index_of(layer_map, self.peer_id)
        if layer_map is not None and index is not None and index > 0 and map_id == layer_map.id:
            if sender != layer_map.stages[index - 1].peer_id:
                raise MessageRejected("mismatch", "only the previous stage sends to this one")
            mine = sessions
        else:
            mine = [s for s in sessions if (o := self._opened.get(s)) is not None and o.entry == sender]
        executor = self._executor
        for session in mine:
            if executor is not None:
                executor.close_session(session)
            self._opened.pop(session, None)
            self._forget(session)
        if layer_map is None or index is None or map_id != layer_map.id or not mine:
            return
        if index + 1 >= len(layer_map.stages):
            return
        nxt = layer_map.stages[index + 1]
        self.tasks.spawn(self._deliver(nxt.peer_id, nxt.url, close_frame(map_id, layer_map.epoch, mine)))


def _index_of(layer_map: LayerMap | None, peer_id: str) -> int | None:
    """The index of `peer_id`'s stage in `layer_map`, if it holds one."""
    if layer_map is None:
        return None
    return next((i for i, s in enumerate(layer_map.stages) if s.peer_id == peer_id), None)


def _with_entry(row: Row, entry: str) -> Row:
    return Row(row.session, entry, row.step, row.start, row.length, row.opening, row.trail)


def _onward(tag: _Queued, result: StepResult) -> Row:
    """The row as the next stage gets it: its trail one stage longer."""
    row = tag.row
    trail = (*row.trail, (tag.wire_s, tag.bytes_in, result.compute_s))
    return Row(row.session, row.entry, row.step, row.start, row.length, row.opening, trail)


def _rejection(error: ExecutorError) -> MessageRejected:
    """The message rejection that reports an executor's refusal."""
    if isinstance(error, CacheFull):
        return MessageRejected("cache_full", str(error))
    if isinstance(error, UnknownSession):
        return MessageRejected("unknown_session", str(error))
    if isinstance(error, SessionExists):
        return MessageRejected("session_exists", str(error))
    return MessageRejected("mismatch", str(error))
