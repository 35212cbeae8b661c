"""The data plane's frames, built and parsed. Everything a frame carries is hostile until parsed
here, and parsing only refuses (`MessageRejected`, "malformed"): it never touches a session.

- `pass`: one forward pass's rows on their way to the next stage, as one frame per hop. A row is
  one session's step: its id, its entry peer, the entry's step number, its first position and
  its length, `open` on the session's first step (its length bound, sampling parameters, and token
  ids, which the last stage keeps for log-probabilities and penalties), and its trail (what each stage so far reports:
  the wire time of the hop into it, the bytes that hop carried for this row, and the pass's compute
  time). The rows' inputs travel as one tensor, concatenated along the token axis: token ids
  `[1, ΣT]` into the first stage, hidden states `[1, ΣT, D]` after it.
- `tokens`: from the last stage straight to an entry peer: per row, the token sampled, its
  log-probability, the most likely alternatives the session asked for, on the step that scored
  it the prompt's log-probabilities, and the trail.
- `refused`: from any stage to an entry peer: these rows did not run, and why.
- `close`: sessions to close, from the entry along the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peer.errors import ExecutorError
from peer.sampling import MAX_TOP_LOGPROBS, SamplingParams, TopLogprobs
from swarm.errors import MessageRejected

MAX_ID_CHARS = 128  # a session or peer id
MAX_REASON_CHARS = 64
MAX_MESSAGE_CHARS = 500
MAX_PROMPT_LOGPROBS = 1 << 20  # prompt positions a tokens row may score (the frame's byte limit binds first)
Trail = tuple[tuple[float, int, float], ...]  # per stage so far: (wire_in_s, bytes_in, compute_s)
PromptLogprobs = tuple[tuple[float, TopLogprobs], ...]  # per input token after the first: (logprob, top)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "top_logprobs", "prompt_logprobs", "presence_penalty",
                   "frequency_penalty", "logit_bias", "grammar")  # fmt: skip


@dataclass(frozen=True)
class Opening:
    """What a stage needs to open a session: its length bound, its sampling parameters, and the
    token ids of its first step (`history`, the first `prompt_tokens` of them its prompt)."""

    max_length: int
    sampling: SamplingParams
    history: tuple[int, ...] = ()  # empty: not sent (the row's length otherwise)
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Row:
    """One session's step in a pass."""

    session: str
    entry: str  # the peer that owns the session and gets its token
    step: int  # the entry's number for this step, echoed home
    start: int  # position of the row's first token
    length: int  # tokens in the row (> 0)
    opening: Opening | None = None  # on the session's first step
    trail: Trail = ()

    def to_wire(self) -> list[Any]:
        opening = None
        if self.opening is not None:
            o = self.opening
            sampling = {name: getattr(o.sampling, name) for name in SAMPLING_FIELDS}
            sampling["logit_bias"] = [list(pair) for pair in o.sampling.logit_bias]
            opening = [o.max_length, sampling, o.prompt_tokens, list(o.history)]
        return [self.session, self.entry, self.step, self.start, self.length, opening, [list(t) for t in self.trail]]


@dataclass(frozen=True)
class Pass:
    """A parsed pass frame; `input` is still the raw tensor mapping (the stage knows its shape)."""

    map_id: str
    epoch: int
    rows: tuple[Row, ...]
    input: Any


@dataclass(frozen=True)
class Sampled:
    """One row of a tokens frame."""

    session: str
    step: int
    token: int
    logprob: float
    trail: Trail
    top: TopLogprobs = ()  # the most likely tokens at this position, best first
    prompt: PromptLogprobs = ()  # on the step that scored the prompt


@dataclass(frozen=True)
class Refusal:
    """A refused frame: its rows (session, step), the reason and a message."""

    rows: tuple[tuple[str, int], ...]
    reason: str
    message: str


def pass_frame(map_id: str, epoch: int, rows: list[Row], tensor: dict[str, Any]) -> dict[str, Any]:
    """The frame of a pass over `rows`, whose inputs are the packed `tensor`."""
    return {"kind": "pass", "map": map_id, "epoch": epoch, "rows": [r.to_wire() for r in rows], "input": tensor}


def tokens_frame(rows: list[Sampled]) -> dict[str, Any]:
    """The frame that takes sampled tokens home to their entry peer."""
    return {"kind": "tokens", "rows": [[r.session, r.step, r.token, r.logprob, [list(t) for t in r.top],
                                        [[lp, [list(t) for t in top]] for lp, top in r.prompt],
                                        [list(t) for t in r.trail]] for r in rows]}  # fmt: skip


def refusal_frame(rows: list[tuple[str, int]], reason: str, message: str) -> dict[str, Any]:
    """The frame that tells an entry peer its rows did not run."""
    rows_json = [list(r) for r in rows]
    return {"kind": "refused", "rows": rows_json, "reason": reason, "message": message[:MAX_MESSAGE_CHARS]}


def close_frame(map_id: str, epoch: int, sessions: list[str]) -> dict[str, Any]:
    """The frame that closes sessions along the pipeline."""
    return {"kind": "close", "map": map_id, "epoch": epoch, "sessions": sessions}


def parse_pass(body: dict[str, Any], *, max_rows: int, max_stages: int) -> Pass:
    """A pass frame's map, rows and raw input."""
    map_id, epoch, raw = body.get("map"), body.get("epoch"), body.get("rows")
    if not isinstance(map_id, str) or not _is_id(map_id) or type(epoch) is not int or not _is_count(epoch):
        raise MessageRejected("malformed", "a pass names its layer map (id and epoch)")
    if not isinstance(raw, list) or not 0 < len(raw) <= max_rows:
        raise MessageRejected("malformed", f"a pass has 1 to {max_rows} rows")
    rows = tuple(_row(r, max_stages) for r in raw)
    if len({r.session for r in rows}) != len(rows):
        raise MessageRejected("malformed", "a session appears once in a pass")
    return Pass(map_id, epoch, rows, body.get("input"))


def _row(raw: Any, max_stages: int) -> Row:
    if not isinstance(raw, list) or len(raw) != 7:
        raise MessageRejected("malformed", "a row is [session, entry, step, start, length, open, trail]")
    session, entry, step, start, length, opening, trail = raw
    if not (_is_id(session) and _is_id(entry) and _is_count(step) and _is_count(start)):
        raise MessageRejected("malformed", "a row's session and entry are ids, its step and start counts")
    if not _is_count(length) or length == 0:
        raise MessageRejected("malformed", "a row has at least one token")
    parsed = _opening(opening)
    if parsed is not None and parsed.history and (start != 0 or len(parsed.history) != length):
        raise MessageRejected("malformed", "an opening's token ids are its row's, from position 0")
    return Row(session, entry, step, start, length, parsed, parse_trail(trail, max_stages))


def _opening(raw: Any) -> Opening | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == 4 and _is_count(raw[0]) and _is_count(raw[2])):
        raise MessageRejected("malformed", "open is [max_length, sampling, prompt_tokens, token ids]")
    max_length, sampling, prompt_tokens, history = raw
    if not (isinstance(history, list) and all(_is_count(t) for t in history)):
        raise MessageRejected("malformed", "an opening's token ids are a list of counts")
    if history and not 0 < prompt_tokens <= len(history):
        raise MessageRejected("malformed", "an opening's prompt is 1 to all of its token ids")
    return Opening(max_length, sampling_of(sampling), tuple(history), prompt_tokens)


def sampling_of(raw: Any) -> SamplingParams:
    """Parse hostile sampling parameters."""
    if not isinstance(raw, dict) or not set(raw) <= set(SAMPLING_FIELDS):
        raise MessageRejected("malformed", f"sampling is a mapping of {', '.join(SAMPLING_FIELDS)}")
    fields = dict(raw)
    bias = fields.get("logit_bias")
    if bias is not None:
        if not (isinstance(bias, list) and all(isinstance(p, list) and len(p) == 2 for p in bias)):
            raise MessageRejected("malformed", "sampling's logit_bias is a list of [token, bias] pairs")
        fields["logit_bias"] = tuple(tuple(p) for p in bias)
    try:
        return SamplingParams(**fields)
    except (ExecutorError, TypeError) as e:
        raise MessageRejected("malformed", f"sampling: {e}") from e


def parse_trail(raw: Any, max_stages: int) -> Trail:
    """A row's trail: at most `max_stages` entries of (seconds, bytes, seconds), each sane."""
    if not isinstance(raw, list) or len(raw) > max_stages:
        raise MessageRejected("malformed", f"a trail is a list of at most {max_stages} stages")
    trail = []
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise MessageRejected("malformed", "a trail entry is [wire_in_s, bytes_in, compute_s]")
        wire, size, compute = entry
        if not (_is_seconds(wire) and _is_count(size) and _is_seconds(compute)):
            raise MessageRejected("malformed", "a trail entry is [wire_in_s, bytes_in, compute_s]")
        trail.append((float(wire), size, float(compute)))
    return tuple(trail)


def parse_tokens(body: dict[str, Any], *, max_rows: int, max_stages: int) -> list[Sampled]:
    """A tokens frame's rows."""
    raw = body.get("rows")
    if not isinstance(raw, list) or not 0 < len(raw) <= max_rows:
        raise MessageRejected("malformed", f"a tokens frame has 1 to {max_rows} rows")
    rows = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 7):
            raise MessageRejected("malformed", "a tokens row is [session, step, token, logprob, top, prompt, trail]")
        session, step, token, logprob, top, prompt, trail = r
        if not (_is_id(session) and _is_count(step) and _is_count(token)):
            raise MessageRejected("malformed", "a tokens row's session is an id, its step and token counts")
        if not _is_logprob(logprob):
            raise MessageRejected("malformed", "a log-probability is a float <= 0")
        if not isinstance(prompt, list) or len(prompt) > MAX_PROMPT_LOGPROBS:
            raise MessageRejected("malformed", "a tokens row's prompt log-probabilities are a list")
        scored = []
        for entry in prompt:
            if not (isinstance(entry, list) and len(entry) == 2 and _is_logprob(entry[0])):
                raise MessageRejected("malformed", "a prompt log-probability is [logprob, top]")
            scored.append((entry[0], _top(entry[1])))
        rows.append(Sampled(session, step, token, logprob, parse_trail(trail, max_stages), _top(top), tuple(scored)))
    return rows


def _top(raw: Any) -> TopLogprobs:
    if not isinstance(raw, list) or len(raw) > MAX_TOP_LOGPROBS:
        raise MessageRejected("malformed", f"top log-probabilities are at most {MAX_TOP_LOGPROBS} [token, logprob]")
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_count(pair[0]) and _is_logprob(pair[1])):
            raise MessageRejected("malformed", "a top log-probability is [token, logprob]")
    return tuple((pair[0], pair[1]) for pair in raw)


def _is_logprob(value: Any) -> bool:
    return isinstance(value, float) and (value <= 0.0 or math.isnan(value))


def parse_refusal(body: dict[str, Any], *, max_rows: int) -> Refusal:
    """A refused frame's rows, reason and message."""
    raw, reason, message = body.get("rows"), body.get("reason"), body.get("message")
    if not isinstance(raw, list) or not 0 < len(raw) <= max_rows:
        raise MessageRejected("malformed", f"a refusal names 1 to {max_rows} rows")
    if not (isinstance(reason, str) and 0 < len(reason) <= MAX_REASON_CHARS and isinstance(message, str)):
        raise MessageRejected("malformed", "a refusal has a reason and a message")
    rows = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 2 and _is_id(r[0]) and _is_count(r[1])):
            raise MessageRejected("malformed", "a refused row is [session, step]")
        rows.append((r[0], r[1]))
    return Refusal(tuple(rows), reason, message[:MAX_MESSAGE_CHARS])


def parse_close(body: dict[str, Any], *, max_rows: int) -> tuple[str, list[str]]:
    """A close frame's layer-map id and sessions."""
    map_id, sessions = body.get("map"), body.get("sessions")
    if not isinstance(map_id, str) or not _is_id(map_id):
        raise MessageRejected("malformed", "a close names its layer map")
    if not isinstance(sessions, list) or not 0 < len(sessions) <= max_rows or not all(_is_id(s) for s in sessions):
        raise MessageRejected("malformed", f"a close names 1 to {max_rows} sessions")
    return map_id, list(dict.fromkeys(sessions))


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 53


def _is_seconds(value: Any) -> bool:
    return isinstance(value, float) and 0.0 <= value < 1e6  # also refuses NaN
