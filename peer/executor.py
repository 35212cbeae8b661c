"""Runs one stage for many sessions. A session is opened with its maximum length (its KV cache is
reserved against the stage's byte budget, and refused with CacheFull beyond it), then stepped with
token ids (first stage) or hidden states and their positions, and closed; sessions idle past the
timeout are evicted. The last stage samples the next token itself, so logits never leave it. Every
input is validated before any state changes, so a bad request leaves other sessions, and its own
session, as they were (a restart a sliding window no longer allows is refused by every stage of a
pipeline alike: the check uses the whole model's windows). A pass that fails midway keeps what its
sessions' caches still hold (`SessionKVCache.abort`). Steps of several sessions run as one forward
pass (`step_many`), which is how a stage batches the sessions that are in step. Thread-safe: calls
may come from several threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from peer.config import ExecutorConfig
from peer.errors import (
    CacheFull,
    ExecutorError,
    InvalidInput,
    PositionError,
    SessionBusy,
    SessionExists,
    UnknownSession,
)
from peer.kv_cache import SessionKVCache, restart_limit
from peer.profile import ModelProfile, head_dim
from peer.resources import MIB
from peer.sampling import SamplingParams, sample_many
from peer.stage import StageModel, Step

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128


@dataclass
class Session:
    """One open session on this stage."""

    session_id: str
    cache: SessionKVCache
    batch: int
    sampling: SamplingParams
    reserved_bytes: int
    last_used: float
    busy: bool = False
    closing: bool = False  # closed while a step ran; removed when the step ends
    steps: int = 0
    compute_s: float = 0.0


@dataclass(frozen=True)
class StepResult:
    """What one step produced: hidden states on inner stages, sampled tokens on the last."""

    hidden: torch.Tensor | None = None  # [B, T, D] from a stage that is not the last
    tokens: torch.Tensor | None = None  # [B] next token per row, from the last stage
    logprobs: torch.Tensor | None = None  # [B] model log-probability of each chosen token
    logits: torch.Tensor | None = None  # [B, T, V], only when asked for with all_logits
    compute_s: float = 0.0  # wall time of the forward pass and sampling


@dataclass(frozen=True)
class StepRequest:
    """One session's step, as `step_many` takes it: see `StageExecutor.step` for the shapes."""

    session_id: str
    inputs: torch.Tensor
    positions: torch.Tensor


@dataclass
class ExecutorStats:
    """Counters for metrics and logs."""

    steps: int = 0  # session steps
    batches: int = 0  # forward passes, each running one or more session steps
    tokens_in: int = 0
    compute_s: float = 0.0
    opened: int = 0
    closed: int = 0
    evicted: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class StageExecutor:
    """Sessions, KV-cache budget and validated steps for one loaded stage."""

    def __init__(
        self,
        stage: StageModel,
        config: ExecutorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.config = config or ExecutorConfig()
        self.clock = clock
        cfg = stage.config
        self.dtype = stage.compute_dtype
        self.device = next(stage.parameters()).device
        self.profile = ModelProfile.from_config(cfg, self.dtype)
        self.budget_bytes = self.config.kv_cache_budget_mb * MIB
        self.stats = ExecutorStats()
        self._kv_heads, self._head_dim = cfg.num_key_value_heads, head_dim(cfg)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- session lifetime ------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        """KV-cache bytes reserved by open sessions."""
        with self._lock:
            return sum(s.reserved_bytes for s in self._sessions.values())

    def session_ids(self) -> list[str]:
        """Ids of the open sessions."""
        with self._lock:
            return [sid for sid, s in self._sessions.items() if not s.closing]

    def open_session(
        self,
        session_id: str,
        max_length: int,
        sampling: SamplingParams | None = None,
        batch_size: int = 1,
    ) -> None:
        """Reserve KV cache for up to `max_length` positions of `batch_size` sequences."""
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
            raise InvalidInput(f"session id must be a string of 1 to {MAX_SESSION_ID_CHARS} characters")
        limit = self.profile.max_position_embeddings
        if not isinstance(max_length, int) or not 0 < max_length <= limit:
            raise PositionError(f"max_length must be between 1 and the model's context of {limit}, not {max_length}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be a positive integer, not {batch_size}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InvalidInput(f"sampling must be SamplingParams, not {type(sampling).__name__}")
        need = self.profile.kv_bytes(self.stage.start, self.stage.end, max_length, batch_size)
        self.evict_idle()
        with self._lock:
            if session_id in self._sessions:
                raise SessionExists(f"session {session_id!r} is already open on this stage")
            free = self.budget_bytes - sum(s.reserved_bytes for s in self._sessions.values())
            if len(self._sessions) >= self.config.max_sessions:
                self._refuse("sessions")
                raise CacheFull(
                    f"this stage already has the maximum of {self.config.max_sessions} open sessions",
                    needed_bytes=need,
                    free_bytes=max(free, 0),
                )
            if need > free:
                self._refuse("budget")
                raise CacheFull(
                    f"session {session_id!r} needs {need / MIB:.1f} MiB of KV cache for {max_length} positions "
                    f"but only {max(free, 0) / MIB:.1f} of {self.budget_bytes / MIB:.0f} MiB are free on this stage",
                    needed_bytes=need,
                    free_bytes=max(free, 0),
                )
            cache = SessionKVCache(
                first_layer=self.stage.start,
                num_layers=self.stage.end - self.stage.start,
                batch=batch_size,
                kv_heads=self._kv_heads,
                head_dim=self._head_dim,
                max_length=max_length,
                dtype=self.dtype,
                device=self.device,
                chunk_tokens=self.config.kv_cache_chunk_tokens,
                windows=self.stage.windows,
            )
            self._sessions[session_id] = Session(
                session_id, cache, batch_size, sampling or SamplingParams(), need, self.clock()
            )
            self.stats.opened += 1

    def close_session(self, session_id: str) -> bool:
        """Free a session's KV cache (after its step, if one is running); False when it was not open."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.closing:
                return False
            self.stats.closed += 1
            if session.busy:
                session.closing = True  # the step's end removes it, so its memory stays reserved till then
            else:
                del self._sessions[session_id]
            return True

    def evict_idle(self) -> list[str]:
        """Close sessions with no step for longer than the idle timeout; return their ids."""
        deadline = self.clock() - self.config.session_idle_timeout_s
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if not s.busy and s.last_used < deadline]
            for sid in stale:
                del self._sessions[sid]
            self.stats.evicted += len(stale)
        for sid in stale:
            log.info("evicted idle session %s", sid)
        return stale

    def session_length(self, session_id: str) -> int:
        """Positions cached for a session."""
        with self._lock:
            return self._get(session_id).cache.length

    # -- steps -----------------------------------------------------------------------------------

    def step(
        self,
        session_id: str,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        *,
        all_logits: bool = False,
    ) -> StepResult:
        """Run one step of a session. inputs: token ids [B, T] or hidden [B, T, D]; positions: [T] or [B, T].

        Positions must be contiguous and start at or before the session's cached length (an earlier
        start replays: the cache is cut back first; past a sliding window, at most one position
        earlier, see `SessionKVCache.earliest_start`). all_logits (last stage only) returns logits for
        every position as well as the sampled token; tests compare them with Hugging Face.
        """
        result = self.step_many([StepRequest(session_id, inputs, positions)], all_logits=all_logits)[0]
        if isinstance(result, ExecutorError):
            raise result
        return result

    @torch.inference_mode()
    def step_many(
        self, requests: Sequence[StepRequest], *, all_logits: bool = False
    ) -> list[StepResult | ExecutorError]:
        """Run one step of each of several sessions in a single forward pass (see `step`).

        Each request gets its result, or the error that refused it; a refused request changes
        nothing and does not hold the others back. A session may appear once per call."""
        outcomes: list[StepResult | ExecutorError] = []
        accepted: list[tuple[int, Session, torch.Tensor, torch.Tensor]] = []
        with self._lock:
            for i, request in enumerate(requests):
                try:
                    session = self._get(request.session_id)
                    if session.busy or any(session is taken for _, taken, _, _ in accepted):
                        raise SessionBusy(f"session {request.session_id!r} already has a step in progress")
                    inputs = self._check_inputs(session, request.inputs)
                    positions = self._check_positions(session, request.positions, inputs.shape[1])
                except ExecutorError as e:
                    if not isinstance(e, UnknownSession):  # _get counted that one
                        self._refuse(type(e).__name__)
                    outcomes.append(e)
                    continue
                accepted.append((i, session, inputs, positions))
                outcomes.append(StepResult())
            if not self.stage.is_first:
                accepted = self._refuse_non_finite(accepted, outcomes)
            for _, session, _, _ in accepted:  # only now: a check that raised leaves no session busy
                session.busy = True
        if not accepted:
            return outcomes
        try:
            t0 = time.perf_counter()
            for _, session, inputs, positions in accepted:
                session.cache.begin_step(int(positions[0, 0]), inputs.shape[1])
            try:
                outs = self.stage.forward_batch(
                    [Step(inputs, positions, session.cache) for _, session, inputs, positions in accepted], all_logits
                )
            except BaseException:
                for _, session, _, _ in accepted:
                    session.cache.abort()
                raise
            for _, session, _, _ in accepted:
                session.cache.commit()
            picks = None
            if self.stage.is_last:  # the draw for the token at position p depends on (seed, p, logits) only
                picks = sample_many(
                    [out[:, -1] if all_logits else out for out in outs],
                    [session.sampling for _, session, _, _ in accepted],
                    [int(positions[0, -1]) + 1 for _, _, _, positions in accepted],
                )
            elapsed = time.perf_counter() - t0
            if picks is None:
                results = [StepResult(hidden=out, compute_s=elapsed) for out in outs]
            else:
                results = [
                    StepResult(tokens=tokens, logprobs=logprobs, logits=out if all_logits else None, compute_s=elapsed)
                    for (tokens, logprobs), out in zip(picks, outs, strict=True)
                ]
            with self._lock:
                self.stats.batches += 1
                self.stats.compute_s += elapsed
                for (i, session, inputs, _), result in zip(accepted, results, strict=True):
                    session.steps += 1
                    session.compute_s += elapsed
                    self.stats.steps += 1
                    self.stats.tokens_in += inputs.shape[0] * inputs.shape[1]
                    outcomes[i] = result
        finally:
            with self._lock:
                for _, session, _, _ in accepted:
                    session.busy = False
                    session.last_used = self.clock()
                    if session.closing:  # closed mid-step: its reservation is released only now
                        self._sessions.pop(session.session_id, None)
        return outcomes

    def _get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except (KeyError, TypeError) as e:
            self._refuse("UnknownSession")
            raise UnknownSession(
                f"session {session_id!r} is not open on this stage (closed, evicted or never opened)"
            ) from e

    def _refuse(self, reason: str) -> None:
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1

    def _check_inputs(self, session: Session, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):
            raise InvalidInput(f"inputs must be a tensor, not {type(inputs).__name__}")
        b = session.batch
        if self.stage.is_first:
            if inputs.dtype != torch.int64 or inputs.dim() != 2 or inputs.shape[0] != b or inputs.shape[1] == 0:
                raise InvalidInput(
                    f"the first stage takes token ids int64 [{b}, T>0], got {inputs.dtype} {tuple(inputs.shape)}"
                )
            vocab = self.profile.vocab_size
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
                raise InvalidInput(f"token ids must be in [0, {vocab}), got [{int(inputs.min())}, {int(inputs.max())}]")
        else:
            d = self.profile.hidden_size
            if inputs.dim() != 3 or inputs.shape[0] != b or inputs.shape[1] == 0 or inputs.shape[2] != d:
                raise InvalidInput(f"this stage takes hidden states [{b}, T>0, {d}], got {tuple(inputs.shape)}")
            if inputs.dtype != self.dtype:
                raise InvalidInput(f"this stage takes hidden states of dtype {self.dtype}, got {inputs.dtype}")
        return inputs.to(self.device)

    def _refuse_non_finite(
        self,
        accepted: list[tuple[int, Session, torch.Tensor, torch.Tensor]],
        outcomes: list[StepResult | ExecutorError],
    ) -> list[tuple[int, Session, torch.Tensor, torch.Tensor]]:
        """The steps whose hidden states are all finite; the others are refused with InvalidInput in
        `outcomes`. One check covers the whole pass; only a pass that fails it is checked step by
        step. Called with the lock held, before any session is marked busy."""
        rows = [x for _, _, x, _ in accepted]
        if not rows or bool(
            torch.isfinite(torch.cat([x.reshape(-1) for x in rows]) if len(rows) > 1 else rows[0]).all()
        ):
            return accepted
        finite = []
        for step in accepted:
            if bool(torch.isfinite(step[2]).all()):
                finite.append(step)
            else:
                self._refuse("InvalidInput")
                outcomes[step[0]] = InvalidInput("hidden states contain NaN or infinite values")
        return finite

    def _check_positions(self, session: Session, positions: torch.Tensor, t: int) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
            raise InvalidInput("positions must be an int64 tensor [T] or [B, T]")
        if positions.dim() == 1:
            positions = positions[None, :].expand(session.batch, -1)
        if positions.dim() != 2 or tuple(positions.shape) != (session.batch, t):
            raise InvalidInput(
                f"positions must have shape [{t}] or [{session.batch}, {t}], got {tuple(positions.shape)}"
            )
        start = int(positions[0, 0])
        if t > 1 or session.batch > 1:  # one position of one row is contiguous by itself
            expected = torch.arange(start, start + t, dtype=torch.int64)
            if not bool((positions.cpu() == expected).all()):
                raise PositionError("positions must be contiguous and the same for every row")
        cached = session.cache.length
        if start < 0 or start > cached:
            raise PositionError(f"step starts at position {start} but the session holds positions [0, {cached})")
        # The whole model's windows: every stage of a pipeline holds a session at one length, so each
        # refuses a restart that any of them (not only this one) can no longer serve.
        earliest = restart_limit(cached, self.profile.layer_windows)
        if start < earliest:
            raise PositionError(
                f"step starts at position {start} but the model's sliding-window layers keep only their last "
                f"positions: a step of this session may start no earlier than {earliest}"
            )
        if start + t > session.cache.max_length:
            raise PositionError(
                f"positions up to {start + t - 1} exceed the session's maximum length {session.cache.max_length}"
            )
        return positions.to(self.device)
