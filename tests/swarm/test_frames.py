"""The data plane's frames: what a stage or an entry builds, the other side parses back as it was
(an opening's sampling and token ids, a tokens row's alternatives and prompt log-probabilities),
and anything else is refused as malformed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from peer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from swarm.errors import MessageRejected
from swarm.frames import Opening, Row, Sampled, parse_pass, parse_tokens, pass_frame, tokens_frame

SAMPLING = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=-3, top_logprobs=4, prompt_logprobs=True,
                          presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((3, -100.0), (7, 2.5)))  # fmt: skip


def wire(frame: dict[str, Any]) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.packb(frame))  # as a link carries it


def test_an_opening_crosses_with_its_sampling_and_token_ids() -> None:
    row = Row("s1", "entry", 1, 0, 3, Opening(40, SAMPLING, (5, 6, 7), 2), ((0.5, 10, 0.25),))
    frame = wire(pass_frame("map", 3, [row], {"raw": b""}))
    parsed = parse_pass(frame, max_rows=4, max_stages=4)
    assert parsed.rows == (row,)
    plain = Row("s2", "entry", 1, 0, 2, Opening(40, SamplingParams()))
    assert parse_pass(wire(pass_frame("map", 3, [plain], {})), max_rows=4, max_stages=4).rows == (plain,)


def test_a_tokens_row_crosses_with_its_alternatives_and_prompt_scores() -> None:
    row = Sampled("s1", 4, 17, -0.25, ((0.5, 10, 0.25),), ((17, -0.25), (3, -2.0)), ((-1.5, ((2, -0.5),)), (-3.0, ())))
    assert parse_tokens(wire(tokens_frame([row])), max_rows=4, max_stages=4) == [row]


@pytest.mark.parametrize(
    "opening",
    [
        [40, {}, 1, [5, 6]],  # token ids that are not the row's (length 3)
        [40, {}, 4, [5, 6, 7]],  # a prompt longer than the ids
        [40, {}, 0, [5, 6, 7]],  # no prompt
        [40, {}, 1, [5, 6, -7]],
        [40, {}, 1, "abc"],
        [40, {"temperature": 1.0, "mystery": 1}, 0, []],
        [40, {"logit_bias": [[1]]}, 0, []],
        [40, {"logit_bias": {"1": 2.0}}, 0, []],
        [40, {"top_logprobs": MAX_TOP_LOGPROBS + 1}, 0, []],
        [40, [0.0, 0, 1.0, 0], 0, []],  # the old list form
        [40, {}],
    ],
    ids=repr,
)
def test_bad_openings_are_malformed(opening: list[Any]) -> None:
    raw = {"kind": "pass", "map": "m", "epoch": 1, "rows": [["s", "e", 1, 0, 3, opening, []]], "input": {}}
    with pytest.raises(MessageRejected) as e:
        parse_pass(raw, max_rows=4, max_stages=4)
    assert e.value.reason == "malformed"


def test_token_ids_only_open_a_session_from_position_0() -> None:
    raw = {"kind": "pass", "map": "m", "epoch": 1, "rows": [["s", "e", 1, 2, 3, [40, {}, 1, [5, 6, 7]], []]]}
    with pytest.raises(MessageRejected, match="position 0"):
        parse_pass(raw, max_rows=4, max_stages=4)


@pytest.mark.parametrize(
    ("top", "prompt"),
    [
        ([[1, 0.5]], []),  # a positive log-probability
        ([[1, -0.5]] * (MAX_TOP_LOGPROBS + 1), []),
        ([[-1, -0.5]], []),
        ([[1]], []),
        ([], [[0.5, []]]),
        ([], [[-0.5]]),
        ([], [[-0.5, [[1, 1.0]]]]),
        (None, []),
        ([], None),
    ],
    ids=repr,
)
def test_bad_tokens_rows_are_malformed(top: Any, prompt: Any) -> None:
    with pytest.raises(MessageRejected) as e:
        parse_tokens({"rows": [["s", 1, 2, -0.5, top, prompt, []]]}, max_rows=4, max_stages=4)
    assert e.value.reason == "malformed"
