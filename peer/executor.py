"""Runs one stage for many sessions. A session is opened with its maximum length (its KV cache is
reserved against the stage's byte budget, and refused with CacheFull beyond it), then stepped with
token ids (first stage) or hidden states and their positions, and closed; sessions idle past the
timeout are evicted. The last stage samples the next token itself, so logits never leave it: only
the token, its log-probability and those the session asked for (`SamplingParams.top_logprobs`,
`prompt_logprobs`) do. For those, the penalties and a grammar (`peer.grammar`, rebuilt from the
generated tokens when a failover reopens the session), the last stage keeps the session's token ids
(given at opening, each sampled token added). Every
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
from peer.grammar import Grammars, Matcher
from peer.kv_cache import SessionKVCache, restart_limit
from peer.profile import ModelProfile, head_dim
from peer.resources import MIB
from peer.sampling import SamplingParams, TopLogprobs, prompt_logprobs, sample_many, score_next, top_logprobs
from peer.stage import StageModel, Step

log = logging.getLogger(__name__)

MAX_SESSION_ID_CHARS = 128
# Positions whose logits are made at once when a prompt is scored: [this, V] float32 at a time,
# 48 MiB for a 49,152-token vocabulary, not [T, V] for the whole prompt.
SCORE_CHUNK_POSITIONS = 256


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
    # On the last stage: the session's token ids by position from 0 (given at opening, then each
    # token sampled), and where generation began (the tokens before it are the prompt).
    ids: list[int] | None = None
    prompt_tokens: int = 0
    prompt_scored: bool = False  # its prompt's log-probabilities went out (SamplingParams.prompt_logprobs)
    matcher: Matcher | None = None  # where it stands in its grammar (SamplingParams.grammar), on the last stage


@dataclass(frozen=True)
class StepResult:
    """What one step produced: hidden states on inner stages, sampled tokens on the last."""

    hidden: torch.Tensor | None = None  # [B, T, D] from a stage that is not the last
    tokens: torch.Tensor | None = None  # [B] next token per row, from the last stage
    logprobs: torch.Tensor | None = None  # [B] model log-probability of each chosen token
    logits: torch.Tensor | None = None  # [B, T, V], only when asked for with all_logits
    # Per row, the most likely tokens beside the chosen one (SamplingParams.top_logprobs of them).
    top: tuple[TopLogprobs, ...] = ()
    # Per row, on the step that scores the prompt (SamplingParams.prompt_logprobs): for each input
    # token after the first, its log-probability and the most likely tokens there.
    prompt: tuple[tuple[tuple[float, TopLogprobs], ...], ...] = ()
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
        grammars: Grammars | None = None,
    ) -> None:
        self.stage = stage
        self.grammars = grammars  # the last stage's, for sessions with a grammar
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
        *,
        history: Sequence[int] | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        """Reserve KV cache for up to `max_length` positions of `batch_size` sequences. `history`: the
        token ids of the session's first step (its prompt, or on a replay its prompt and the tokens
        generated since, the first `prompt_tokens` of them the prompt); the last stage needs them
        for prompt log-probabilities, penalties and grammars, and refuses such sampling without them.
        InvalidInput, PositionError, SessionExists or CacheFull when the session cannot open."""
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
            raise InvalidInput(f"session id must be a string of 1 to {MAX_SESSION_ID_CHARS} characters")
        limit = self.profile.max_position_embeddings
        if not isinstance(max_length, int) or not 0 < max_length <= limit:
            raise PositionError(f"max_length must be between 1 and the model's context of {limit}, not {max_length}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be a positive integer, not {batch_size}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InvalidInput(f"sampling must be SamplingParams, not {type(sampling).__name__}")
        ids = self._check_history(history, prompt_tokens, max_length, batch_size, sampling)
        prompt = len(ids) if ids is not None and prompt_tokens is None else prompt_tokens or 0
        matcher = None
        if sampling is not None and sampling.grammar and ids is not None:  # a replay: past the tokens generated
            if self.grammars is None:
                raise InvalidInput("this stage has no tokenizer to follow a grammar with")
            matcher = self.grammars.matcher(sampling.grammar, ids[prompt:])
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
            params = sampling or SamplingParams()
            session = Session(session_id, cache, batch_size, params, need, self.clock(), ids=ids, prompt_tokens=prompt)
            session.matcher = matcher
            self._sessions[session_id] = session
            self.stats.opened += 1

    def _check_history(
        self,
        history: Sequence[int] | None,
        prompt_tokens: int | None,
        max_length: int,
        batch_size: int,
        sampling: SamplingParams | None,
    ) -> list[int] | None:
        """The token ids the last stage keeps for a session (None elsewhere, or when not given)."""
        if history is None:
            if self.stage.is_last and sampling is not None and sampling.needs_ids:
                raise InvalidInput("prompt log-probabilities, penalties and grammars need the session's token ids")
            return None
        vocab = self.profile.vocab_size
        if isinstance(history, (str, bytes)) or not all(type(t) is int and 0 <= t < vocab for t in history):
            raise InvalidInput(f"a session's token ids are integers in [0, {vocab})")
        if not 0 < len(history) <= max_length or batch_size != 1:
            raise InvalidInput(f"a session's token ids are 1 to max_length ({max_length}) ids of one sequence")
        if prompt_tokens is not None and (type(prompt_tokens) is not int or not 0 < prompt_tokens <= len(history)):
            raise InvalidInput(f"prompt_tokens must be in [1, {len(history)}], not {prompt_tokens!r}")
        return list(history) if self.stage.is_last else None

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
        masks: dict[int, torch.Tensor] = {}  # by request: the tokens its session's grammar allows next
        with self._lock:
            for i, request in enumerate(requests):
                try:
                    session = self._get(request.session_id)
                    if session.busy or any(session is taken for _, taken, _, _ in accepted):
                        raise SessionBusy(f"session {request.session_id!r} already has a step in progress")
                    inputs = self._check_inputs(session, request.inputs)
                    positions = self._check_positions(session, request.positions, inputs.shape[1])
                    if session.matcher is not None:
                        masks[i] = self._allowed(session, int(positions[0, 0]) + inputs.shape[1])
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
            # The step that scores a session's prompt needs the logits of every position.
            every = [self.stage.is_last and _scores_prompt(session, int(positions[0, 0]))
                     for _, session, _, positions in accepted]  # fmt: skip
            try:
                outs = self.stage.forward_batch(
                    [Step(inputs, positions, session.cache, whole)
                     for (_, session, inputs, positions), whole in zip(accepted, every, strict=True)],
                    all_logits,
                )  # fmt: skip
            except BaseException:
                for _, session, _, _ in accepted:
                    session.cache.abort()
                raise
            for _, session, _, _ in accepted:
                session.cache.commit()
            results: list[StepResult] = []
            ids_after: list[list[int] | None] = []
            if self.stage.is_last:  # the draw for the token at position p depends on (seed, p, logits) only
                ends = [int(positions[0, -1]) + 1 for _, _, _, positions in accepted]
                known = [None if session.ids is None else session.ids[:end]
                         for (_, session, _, _), end in zip(accepted, ends, strict=True)]  # fmt: skip
                # A step that scores its prompt came back as final hidden states [1, T, D] (see `_scored`).
                last = [
                    out[:, -1] if all_logits else self.stage.logits(out[:, -1]) if whole else out
                    for out, whole in zip(outs, every, strict=True)
                ]
                generated = [
                    () if ids is None else ids[session.prompt_tokens :]
                    for (_, session, _, _), ids in zip(accepted, known, strict=True)
                ]
                params = [session.sampling for _, session, _, _ in accepted]
                picks = sample_many(last, params, ends, generated, [masks.get(i) for i, _, _, _ in accepted])
                elapsed = time.perf_counter() - t0
                for (_, session, _, _), out, x, whole, ids, (tokens, logprobs) in zip(
                    accepted, outs, last, every, known, picks, strict=True
                ):
                    n = session.sampling.top_logprobs
                    prompt: tuple[tuple[tuple[float, TopLogprobs], ...], ...] = ()
                    if whole and ids is not None:  # one row: a session with token ids has batch 1
                        prompt = (self._scored(out[0], ids[: min(out.shape[1], session.prompt_tokens)], n, all_logits),)
                    results.append(StepResult(
                        tokens=tokens, logprobs=logprobs, logits=out if all_logits else None, compute_s=elapsed,
                        top=top_logprobs(x, n), prompt=prompt,
                    ))  # fmt: skip
                    ids_after.append(None if ids is None else [*ids, int(tokens[0])])
                    if session.matcher is not None:  # the mask allowed the token: the grammar takes it
                        session.matcher.consume([int(tokens[0])])
            else:
                elapsed = time.perf_counter() - t0
                results = [StepResult(hidden=out, compute_s=elapsed) for out in outs]
                ids_after = [None] * len(outs)
            with self._lock:
                self.stats.batches += 1
                self.stats.compute_s += elapsed
                for (i, session, inputs, _), result, ids, whole in zip(
                    accepted, results, ids_after, every, strict=True
                ):
                    session.steps += 1
                    session.compute_s += elapsed
                    if ids is not None:
                        session.ids = ids
                    session.prompt_scored = session.prompt_scored or whole
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

    def _scored(
        self, out: torch.Tensor, ids: list[int], n: int, are_logits: bool
    ) -> tuple[tuple[float, TopLogprobs], ...]:
        """The prompt's log-probabilities: each of `ids` after the first, scored from the position
        before it. `out`: the step's logits [T, V] (`are_logits`) or final hidden states [T, D],
        made into logits SCORE_CHUNK_POSITIONS positions at a time."""
        if are_logits:
            return prompt_logprobs(out[: len(ids)], ids, n)
        scored: list[tuple[float, TopLogprobs]] = []
        for a in range(0, len(ids) - 1, SCORE_CHUNK_POSITIONS):
            b = min(a + SCORE_CHUNK_POSITIONS, len(ids) - 1)
            scored += score_next(self.stage.logits(out[a:b]), ids[a + 1 : b + 1], n)
        return tuple(scored)

    def _allowed(self, session: Session, end: int) -> torch.Tensor:
        """The tokens a session's grammar allows after its tokens up to position `end` (bool [V]);
        a step that restarts earlier rebuilds the matcher from the tokens before it. InvalidInput
        when the grammar allows nothing (it cannot go on)."""
        assert session.matcher is not None and session.ids is not None and self.grammars is not None
        if len(session.ids) > end:  # a restart: the matcher has taken tokens past the step's
            session.matcher = self.grammars.matcher(session.sampling.grammar, session.ids[session.prompt_tokens : end])
        allowed = session.matcher.allowed()
        if not bool(allowed.any()):
            raise InvalidInput("the session's grammar allows no next token")
        return allowed

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
        if session.ids is not None and len(session.ids) < start + t:
            raise PositionError(
                f"the session's token ids cover positions [0, {len(session.ids)}), not the step's up to {start + t - 1}"
            )
        return positions.to(self.device)


def _scores_prompt(session: Session, start: int) -> bool:
    """Whether a step starting at `start` is the one that scores the session's prompt."""
    return session.sampling.prompt_logprobs and not session.prompt_scored and start == 0 and session.ids is not None
