"""This peer's stage in the data plane. A `step` message names a session, the layer map (its epoch
and id), its entry peer, the
route of stages still to run (this peer first) and the input: token ids on the first stage,
hidden states after. The stage checks all of it, runs its layers in a worker thread (batched with
other sessions' steps that arrive while the stage is busy, see `swarm.batcher`), and sends its
hidden states straight to the next stage; the last stage samples and the token travels back
along the chain of replies, each stage adding its compute time, the wire time of its hop and the
bytes it sent. `close` walks the same route. Every message is a sealed envelope of the swarm."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from peer.errors import CacheFull, ExecutorError, SessionExists, UnknownSession
from peer.executor import StageExecutor, StepRequest
from peer.sampling import SamplingParams
from peer.stage import StageModel
from swarm.batcher import Batcher, BatchStats
from swarm.errors import MessageRejected, Relayed
from swarm.layer_map import LayerMap, Stage
from swarm.tensors import pack, unpack

if TYPE_CHECKING:
    from swarm.node import Checked, Node

log = logging.getLogger(__name__)

STAGE_PATH = "/swarm/stage"

# HTTP status for each reason a data-plane message is refused.
STATUS = {
    "malformed": 400,
    "forged": 401,
    "unknown_key": 401,
    "oversized": 413,
    "not_ready": 503,
    "cache_full": 503,
    "unreachable": 502,
    "stage_failed": 500,
}


def route_of(raw: Any) -> list[Stage]:
    """Parse a hostile route: the stages still to run, in order."""
    if not isinstance(raw, list) or not 0 < len(raw) <= 256:
        raise MessageRejected("malformed", "route must be a non-empty list of stages")
    stages = []
    for s in raw:
        if not isinstance(s, dict):
            raise MessageRejected("malformed", "a route stage is {peer_id, url, start, end}")
        peer_id, url, start, end = (s.get(k) for k in ("peer_id", "url", "start", "end"))
        if not (isinstance(peer_id, str) and isinstance(url, str) and type(start) is int and type(end) is int):
            raise MessageRejected("malformed", "a route stage is {peer_id, url, start, end}")
        stages.append(Stage(peer_id, url, start, end))
    return stages


def route_json(route: list[Stage]) -> list[dict[str, Any]]:
    """Wire form of a route."""
    return [{"peer_id": s.peer_id, "url": s.url, "start": s.start, "end": s.end} for s in route]


@dataclass(frozen=True)
class Opened:
    """What a stage remembers of a session it opened."""

    map_id: str  # the layer map it was opened on
    epoch: int
    entry: str  # the peer that owns it


def sampling_of(raw: Any) -> SamplingParams:
    """Parse hostile sampling parameters."""
    if not isinstance(raw, dict):
        raise MessageRejected("malformed", "sampling must be a mapping")
    try:
        return SamplingParams(**{k: raw[k] for k in ("temperature", "top_k", "top_p", "seed") if k in raw})
    except (ExecutorError, TypeError) as e:
        raise MessageRejected("malformed", f"sampling: {e}") from e


class StageService:
    """Runs this peer's layers for every session that passes through it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._executor: StageExecutor | None = None
        self._batcher: Batcher | None = None
        self.batches = BatchStats()  # over every executor this stage has had
        self._stage: StageModel | None = None
        self._opened: dict[str, Opened] = {}  # session -> its layer map and entry peer
        self.dropped = 0  # sessions dropped because their layer map was abandoned or their entry died
        # Where forward passes run (set by the daemon to a thread of normal priority, see
        # `swarm.daemon.lower_loop_priority`); None: asyncio's default thread pool.
        self.compute_threads: concurrent.futures.Executor | None = None

    def executor(self) -> StageExecutor | None:
        """The executor over the stage held now (a new one, with no sessions, after each load)."""
        host = self.node.host
        stage = host.stage if host is not None else None
        if stage is not self._stage:
            self._stage = stage
            if self._batcher is not None:
                self._batcher.close()
            self._executor = StageExecutor(stage, self.node.config.peer.executor) if stage is not None else None
            serving = self.node.config.serving
            self._batcher = (
                Batcher(
                    self._executor,
                    serving.max_batch_tokens,
                    serving.batch_wait_s,
                    self.batches,
                    threads=self.compute_threads,
                )
                if self._executor is not None
                else None
            )
            self._opened.clear()
        return self._executor

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
        if self._batcher is not None:
            for sid in doomed:
                self._batcher.forget(sid)
        if dropped:
            self.dropped += dropped
            log.info("dropped %d session(s) %s", dropped, why)

    def sessions(self) -> int:
        """Sessions open on this stage."""
        ex = self._executor
        return len(ex.session_ids()) if ex is not None else 0

    def _route_here(self, checked: Checked) -> list[Stage]:
        """The message's route, checked: the rest of the current map from this peer on, sent by the
        stage before this one (or, to the first stage, by any member: the entry peer)."""
        body = checked.msg.body
        epoch, map_id, route = body.get("epoch"), body.get("map"), route_of(body.get("route"))
        layer_map = self.node.layer_map
        if type(epoch) is not int or not isinstance(map_id, str):
            raise MessageRejected("malformed", "epoch must be an integer and map a layer-map id")
        if layer_map is None or map_id != layer_map.id or epoch != layer_map.epoch:
            # The id names the map's leader and term too: two leaders on two sides of a partition may
            # each have made an epoch N, and a stage must never run a session of one on the other.
            have = layer_map.id if layer_map else None
            raise MessageRejected("stale_epoch", f"message for layer map {map_id}, this peer follows {have}")
        index = len(layer_map.stages) - len(route)
        if index < 0 or tuple(route) != layer_map.stages[index:] or route[0].peer_id != self.node.peer_id:
            raise MessageRejected("mismatch", "the route is not the rest of the current layer map from this peer")
        if index > 0 and checked.msg.sender != layer_map.stages[index - 1].peer_id:
            raise MessageRejected("mismatch", "only the previous stage sends to this one")
        return route

    def _my_stage(self, checked: Checked) -> tuple[list[Stage], StageExecutor]:
        route = self._route_here(checked)
        executor = self.executor()
        held = self.node.host.range if self.node.host else None
        if executor is None or held != (route[0].start, route[0].end):
            raise MessageRejected("not_ready", f"layers [{route[0].start}, {route[0].end}) are not loaded here yet")
        return route, executor

    async def step(self, checked: Checked) -> dict[str, Any]:
        """Run one step here and on every later stage; the sampled token and the timings come back."""
        t_in = time.perf_counter()
        body = checked.msg.body
        route, executor = self._my_stage(checked)
        batcher = self._batcher
        assert batcher is not None and batcher.executor is executor
        session, start, opening = body.get("session"), body.get("start"), body.get("open")
        # The entry peer owns the session: the first stage hears from it, later stages from the stage before.
        entry = checked.msg.sender if route[0].start == 0 else body.get("entry")
        if not isinstance(entry, str) or len(entry) > 64:
            raise MessageRejected("malformed", "entry must be the entry peer's id")
        stage = executor.stage
        context = stage.config.max_position_embeddings
        if not isinstance(session, str) or type(start) is not int or not 0 <= start < context:
            raise MessageRejected("malformed", f"session must be a string and start an integer in [0, {context})")
        limit = self.node.config.serving.max_activation_bytes
        if stage.is_first:
            inputs = unpack(body.get("input"), dtype=torch.int64, shape=(1, None), max_bytes=limit)
        else:
            width = stage.config.hidden_size
            inputs = unpack(body.get("input"), shape=(1, None, width), max_bytes=limit)
            if not inputs.is_floating_point():
                raise MessageRejected("mismatch", f"hidden states must be floating point, not {inputs.dtype}")
            # Peers may compute in different dtypes (a GPU in bfloat16, a CPU in float32): the hidden
            # states are cast at the stage boundary, as they would be between two layers of mixed precision.
            inputs = inputs.to(executor.dtype)
        if inputs.shape[1] == 0:
            raise MessageRejected("malformed", "a step needs at least one position")
        if stage.is_first and (int(inputs.min()) < 0 or int(inputs.max()) >= stage.config.vocab_size):
            raise MessageRejected("malformed", "token ids outside the vocabulary")
        if start + inputs.shape[1] > context:
            raise MessageRejected("malformed", f"positions beyond the model's context of {context}")
        positions = torch.arange(start, start + inputs.shape[1], dtype=torch.int64)
        if opening is not None:
            if not isinstance(opening, dict) or type(opening.get("max_length")) is not int:
                raise MessageRejected("malformed", "open must be {max_length, sampling}")
            sampling = sampling_of(opening.get("sampling", {}))
            self._run(executor.open_session, session, opening["max_length"], sampling)
            open_now = set(executor.session_ids())  # forget sessions closed or evicted meanwhile
            self._opened = {sid: o for sid, o in self._opened.items() if sid in open_now}
            self._opened[session] = Opened(body["map"], body["epoch"], entry)
        try:
            result = await batcher.step(StepRequest(session, inputs, positions))
        except ExecutorError as e:
            if opening is not None:
                executor.close_session(session)
                self._opened.pop(session, None)
            raise _rejection(e) from e
        except BaseException:
            if opening is not None:
                executor.close_session(session)
                self._opened.pop(session, None)
            raise
        me = {"peer_id": self.node.peer_id, "node_id": self.node.node_id, "compute_s": result.compute_s}
        if stage.is_last:
            assert result.tokens is not None and result.logprobs is not None
            token, logprob = int(result.tokens[0]), float(result.logprobs[0])
            me.update(wire_s=0.0, bytes_out=0)
            return {"token": token, "logprob": logprob, "timings": [me], "elapsed_s": time.perf_counter() - t_in}
        assert result.hidden is not None
        forward = {"session": session, "epoch": body["epoch"], "map": body["map"], "start": start, "open": opening}
        forward["entry"] = entry
        forward.update(route=route_json(route[1:]), input=pack(result.hidden))
        t_out = time.perf_counter()
        try:
            reply, sent = await self.node.data_request(route[1], "step", forward)
        except MessageRejected as e:
            if e.reason == "unreachable" and not isinstance(e, Relayed):  # this hop: probe it now, not on gossip
                self.node._spawn(self.node.check_peer(route[1].peer_id, str(e)))
            raise
        hop_s = time.perf_counter() - t_out
        downstream = reply.get("elapsed_s")
        downstream_s = float(downstream) if isinstance(downstream, float) else 0.0
        me.update(wire_s=max(0.0, hop_s - downstream_s), bytes_out=sent)
        timings = reply.get("timings")
        later = list(timings) if isinstance(timings, list) else []
        elapsed = time.perf_counter() - t_in
        return {
            "token": reply.get("token"),
            "logprob": reply.get("logprob"),
            "timings": [me, *later],
            "elapsed_s": elapsed,
        }

    async def close(self, checked: Checked) -> dict[str, Any]:
        """Close a session here and on every later stage; unknown sessions are not an error."""
        body = checked.msg.body
        session, route = body.get("session"), self._route_here(checked)
        if not isinstance(session, str):
            raise MessageRejected("malformed", "session must be a string")
        executor = self._executor
        closed = executor.close_session(session) if executor is not None else False
        if self._batcher is not None:
            self._batcher.forget(session)
        self._opened.pop(session, None)
        if len(route) > 1 and route[0].peer_id == self.node.peer_id:
            try:
                forward = {"session": session, "epoch": body.get("epoch"), "map": body.get("map")}
                forward["route"] = route_json(route[1:])
                await self.node.data_request(route[1], "close", forward)
            except MessageRejected as e:
                log.debug("closing session %s downstream: %s", session, e)
        return {"closed": closed}

    @staticmethod
    def _run(fn: Any, *args: Any) -> Any:
        """Call an executor method, turning its refusals into message rejections."""
        try:
            return fn(*args)
        except ExecutorError as e:
            raise _rejection(e) from e


def _rejection(error: ExecutorError) -> MessageRejected:
    """The message rejection that reports an executor's refusal."""
    if isinstance(error, CacheFull):
        return MessageRejected("cache_full", str(error))
    if isinstance(error, UnknownSession):
        return MessageRejected("unknown_session", str(error))
    if isinstance(error, SessionExists):
        return MessageRejected("session_exists", str(error))
    return MessageRejected("mismatch", str(error))
