"""The OpenAI-compatible API's request parsing and error shape, and the Prometheus metrics text, on
small stand-ins for the node: no swarm, no sockets. Serving whole requests through a running swarm
is the data-plane tests' business."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from peer.errors import InvalidInput
from peer.sampling import SamplingParams
from swarm.detokenizer import MAX_STOP_STRINGS
from swarm.entry import Timings
from swarm.membership import State
from swarm.metrics import Metrics
from swarm.openai_api import error_response
from swarm.openai_params import (
    ApiError,
    chat_logprobs,
    chat_prompt,
    completion_logprobs,
    completion_prompt,
    completion_prompts,
    parse_common,
    parse_request,
)

SPEC = "smollm2-135m"
DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 4096
MAX_PROMPT_TOKENS = 50
PROMPT_IDS = [5, 6, 7]
CHAT_IDS = [1, 2, 3, 4]


class FakeTokenizer:
    """Fixed ids, and a record of what was asked."""

    def __init__(self) -> None:
        self.encoded: list[str] = []
        self.chats: list[list[dict[str, str]]] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return list(PROMPT_IDS)

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if any(m["content"] == "refuse" for m in messages):
            raise InvalidInput("the chat template refused this conversation")
        self.chats.append(messages)
        return list(CHAT_IDS)


VOCAB = 100


PER_CLIENT = 8
SERVING = SimpleNamespace(
    default_max_tokens=DEFAULT_MAX_TOKENS,
    max_tokens_limit=MAX_TOKENS_LIMIT,
    max_prompt_tokens=MAX_PROMPT_TOKENS,
    max_sessions_per_client=PER_CLIENT,
)


def fake_node() -> Any:
    return SimpleNamespace(
        model=SimpleNamespace(spec=SPEC, profile=SimpleNamespace(vocab_size=VOCAB)),
        config=SimpleNamespace(serving=SERVING),
        tokenizer=FakeTokenizer(),
    )


def refused(fn: Any, body: dict[str, Any], status: int = 400, param: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(body, fake_node())
    assert info.value.status == status
    assert info.value.param == param
    return info.value


# ---- parse_common ---------------------------------------------------------------------------------


def test_parse_common_defaults() -> None:
    max_tokens, sampling, stops, stream = parse_common({}, fake_node())
    assert max_tokens == DEFAULT_MAX_TOKENS
    assert (sampling.temperature, sampling.top_p) == (1.0, 1.0)
    assert stops == ()
    assert stream is False
    # No seed: a fresh one per request, so repeated sampled requests differ as with OpenAI's API.
    seeds = {parse_common({}, fake_node())[1].seed for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= seed < 1 << 63 for seed in seeds)


def test_parse_common_explicit_nulls_are_defaults() -> None:
    body = {
        "model": None,
        "max_tokens": None,
        "n": None,
        "seed": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "stream": None,
        "ignore_eos": None,
        "presence_penalty": None,
        "logit_bias": None,
    }
    max_tokens, sampling, stops, stream = parse_common(body, fake_node())
    assert (max_tokens, stops, stream) == (DEFAULT_MAX_TOKENS, (), False)
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, 0)


def test_parse_common_takes_every_field() -> None:
    body = {
        "model": SPEC,
        "max_tokens": 7,
        "n": 1,
        "seed": -42,
        "temperature": 0,
        "top_p": 0.5,
        "stop": ["\n", "END"],
        "stream": True,
    }
    max_tokens, sampling, stops, stream = parse_common(body, fake_node())
    assert max_tokens == 7
    assert sampling == SamplingParams(temperature=0.0, top_p=0.5, seed=-42)
    assert sampling.greedy
    assert isinstance(sampling.temperature, float)
    assert stops == ("\n", "END")
    assert stream is True


def test_parse_common_reads_max_completion_tokens() -> None:
    assert parse_common({"max_completion_tokens": 9}, fake_node())[0] == 9
    assert parse_common({"max_tokens": 3, "max_completion_tokens": 9}, fake_node())[0] == 3


def test_parse_common_refuses_another_model() -> None:
    error = refused(parse_common, {"model": "gpt-4o"}, status=404, param="model")
    assert error.code == "model_not_found"
    assert error.kind == "invalid_request_error"
    assert "gpt-4o" in error.message
    assert SPEC in error.message


@pytest.mark.parametrize("value", [-1, MAX_TOKENS_LIMIT + 1, 10**30, True, False, "16", 16.0, [16]], ids=repr)
def test_parse_common_refuses_bad_max_tokens(value: Any) -> None:
    refused(parse_common, {"max_tokens": value}, param="max_tokens")
    refused(parse_common, {"max_completion_tokens": value}, param="max_tokens")


def test_parse_common_accepts_max_tokens_up_to_its_limit() -> None:
    assert parse_common({"max_tokens": 1}, fake_node())[0] == 1
    assert parse_common({"max_tokens": MAX_TOKENS_LIMIT}, fake_node())[0] == MAX_TOKENS_LIMIT
    error = refused(parse_common, {"max_tokens": MAX_TOKENS_LIMIT + 1}, param="max_tokens")
    assert f"limit of {MAX_TOKENS_LIMIT}" in error.message


def test_a_token_id_prompt_longer_than_the_limit_is_refused_before_its_ids_are_checked() -> None:
    error = refused(completion_prompt, {"prompt": [10**9] * (MAX_PROMPT_TOKENS + 1)}, param="prompt")
    assert error.code == "context_length_exceeded"
    assert completion_prompt({"prompt": [1] * MAX_PROMPT_TOKENS}, fake_node()) == [1] * MAX_PROMPT_TOKENS


def completions(body: dict[str, Any], node: Any = None) -> Any:
    return parse_request({"prompt": "hi", **body}, node or fake_node(), chat=False)


@pytest.mark.parametrize("n", [0, -1, True, "1", 1.0, PER_CLIENT + 1], ids=repr)
def test_n_must_be_an_integer_from_one_to_the_clients_slots(n: Any) -> None:
    refused(completions, {"n": n}, param="n")


def test_max_tokens_0_only_with_echo() -> None:
    refused(completions, {"max_tokens": 0}, param="max_tokens")
    assert completions({"max_tokens": 0, "echo": True}).max_tokens == 0


@pytest.mark.parametrize("value", [-0.01, 2.01, 100, float("nan"), float("inf"), "1.0", True, [1]], ids=repr)
def test_parse_common_refuses_bad_temperature(value: Any) -> None:
    refused(parse_common, {"temperature": value}, param="temperature")


@pytest.mark.parametrize("value", [0.0, 0.7, 2, 2.0])
def test_parse_common_accepts_temperature_in_range(value: float) -> None:
    assert parse_common({"temperature": value}, fake_node())[1].temperature == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, 2, "0.9", False, float("nan")], ids=repr)
def test_parse_common_refuses_bad_top_p(value: Any) -> None:
    refused(parse_common, {"top_p": value}, param="top_p")


@pytest.mark.parametrize("value", [1e-9, 0.1, 1, 1.0])
def test_parse_common_accepts_top_p_in_range(value: float) -> None:
    assert parse_common({"top_p": value}, fake_node())[1].top_p == float(value)


@pytest.mark.parametrize("seed", [True, False, "7", 1.5, 1 << 63, -(1 << 63) - 1], ids=repr)
def test_parse_common_refuses_bad_seeds(seed: Any) -> None:
    refused(parse_common, {"seed": seed}, param="seed")


@pytest.mark.parametrize("seed", [0, 7, -(1 << 63), (1 << 63) - 1])
def test_parse_common_accepts_64_bit_seeds(seed: int) -> None:
    assert parse_common({"seed": seed}, fake_node())[1].seed == seed


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("###", ("###",)),
        ([], ()),
        (["a"], ("a",)),
        (["a", "bb", "\n", "a"], ("a", "bb", "\n", "a")),
        (["x"] * MAX_STOP_STRINGS, ("x",) * MAX_STOP_STRINGS),
    ],
    ids=repr,
)
def test_parse_common_takes_stop_strings(stop: Any, expected: tuple[str, ...]) -> None:
    assert parse_common({"stop": stop}, fake_node())[2] == expected


@pytest.mark.parametrize(
    "stop",
    [["x"] * (MAX_STOP_STRINGS + 1), [""], ["a", ""], ["a", 1], [None], 5, {"s": "a"}, ("a",), True],
    ids=repr,
)
def test_parse_common_refuses_bad_stop(stop: Any) -> None:
    refused(parse_common, {"stop": stop}, param="stop")


@pytest.mark.parametrize("stream", ["true", 1, 0, [], {}], ids=repr)
def test_parse_common_refuses_non_boolean_stream(stream: Any) -> None:
    refused(parse_common, {"stream": stream}, param="stream")


# ---- logprobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 0, 1, 5, 20])
def test_completion_logprobs_take_0_to_20_alternatives(value: Any) -> None:
    assert completion_logprobs({"logprobs": value}) == value
    assert completion_logprobs({}) is None


@pytest.mark.parametrize("value", [-1, 21, 2.0, "1", [1], {}, True, False], ids=repr)
def test_completion_logprobs_refused(value: Any) -> None:
    with pytest.raises(ApiError) as info:
        completion_logprobs({"logprobs": value})
    assert (info.value.status, info.value.param) == (400, "logprobs")


def test_chat_logprobs_are_a_flag_with_top_logprobs_beside() -> None:
    assert chat_logprobs({}) is None
    assert chat_logprobs({"logprobs": False, "top_logprobs": None}) is None
    assert chat_logprobs({"logprobs": True}) == 0
    assert chat_logprobs({"logprobs": True, "top_logprobs": 20}) == 20
    for body, param in [({"logprobs": 1}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")]:  # fmt: skip
        with pytest.raises(ApiError) as info:
            chat_logprobs(body)
        assert (info.value.status, info.value.param) == (400, param)


# ---- prompts --------------------------------------------------------------------------------------


def test_completion_prompt_encodes_a_string_or_a_list_of_one() -> None:
    node = fake_node()
    assert completion_prompt({"prompt": "Once upon"}, node) == PROMPT_IDS
    assert completion_prompt({"prompt": ["a time"]}, node) == PROMPT_IDS
    assert node.tokenizer.encoded == ["Once upon", "a time"]


def test_completion_prompt_takes_token_ids_as_they_are() -> None:
    node = fake_node()
    assert completion_prompt({"prompt": [1, 2, 3]}, node) == [1, 2, 3]
    assert completion_prompt({"prompt": [[0, VOCAB - 1]]}, node) == [0, VOCAB - 1]
    assert node.tokenizer.encoded == []


@pytest.mark.parametrize(
    "prompt",
    [None, "", [""], [], [[]], ["a", "b"], [[1], [2]], [1, "a"], [True, 2], [1.0], [-1], [VOCAB], [[VOCAB]], 5,
     {"text": "a"}, ["a", 5], ["a", [VOCAB]]],
    ids=repr,
)  # fmt: skip
def test_completion_prompt_refuses_anything_else(prompt: Any) -> None:
    body = {} if prompt is None else {"prompt": prompt}
    refused(completion_prompt, body, param="prompt")


def test_several_prompts_are_read_one_by_one() -> None:
    node = fake_node()
    assert completion_prompts({"prompt": ["a", "b"]}, node) == [PROMPT_IDS, PROMPT_IDS]
    assert completion_prompts({"prompt": [[1], [2, 3], "c"]}, node) == [[1], [2, 3], PROMPT_IDS]
    assert completion_prompts({"prompt": [4, 5]}, node) == [[4, 5]]
    refused(completion_prompts, {"prompt": ["a"] * (PER_CLIENT + 1)}, param="prompt")


def test_choices_go_prompt_by_prompt_with_seeds_derived_per_choice() -> None:
    api = completions({"prompt": [[1], [2]], "n": 3, "seed": 7, "temperature": 1})
    generations = api.requests()
    assert [g.prompt_ids for g in generations] == [[1]] * 3 + [[2]] * 3
    seeds = [g.sampling.seed for g in generations]
    assert seeds[0] == 7 and len(set(seeds)) == 6  # choice 0 draws as a lone request with that seed would
    assert completions({"prompt": [[1], [2]], "n": 3, "seed": 7, "temperature": 1}).requests() == generations


def test_stop_strings_are_refused_beside_a_grammar() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "stop": [","]}
    with pytest.raises(ApiError) as e:
        parse_request({**chat, "response_format": {"type": "json_object"}}, fake_node(), chat=True)
    assert e.value.param == "stop"
    assert parse_request(chat, fake_node(), chat=True).stop == (",",)


@pytest.mark.parametrize("key", ["01", "+1", " 1", "\u0661", "1.0", "-1", str(VOCAB)], ids=repr)
def test_logit_bias_keys_are_token_ids_as_openai_writes_them(key: str) -> None:
    refused(completions, {"logit_bias": {key: 1}}, param="logit_bias")
    assert completions({"logit_bias": {"10": -5}}).sampling.logit_bias == ((10, -5.0),)


def test_developer_is_a_system_message() -> None:
    node = fake_node()
    chat_prompt({"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}, node)
    assert node.tokenizer.chats[-1][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    ("body", "param"),
    [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"), ({"functions": []}, "functions"),
     ({"frobnicate": 1}, "frobnicate"), ({"messages": []}, "messages")],
    ids=repr,
)  # fmt: skip
def test_parameters_not_implemented_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    error = refused(completions, body, param=param)
    assert param in error.message


def test_chat_prompt_renders_clean_messages() -> None:
    node = fake_node()
    messages = [
        {"role": "system", "content": "be brief", "name": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": ""},
    ]
    assert chat_prompt({"messages": messages}, node) == CHAT_IDS
    assert node.tokenizer.chats == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": ""},
        ]
    ]


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hello",
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"content": "hi"}],
        [{"role": "tool", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": ["text"]}],
        [{"role": "user", "content": "ok"}, {"role": "user", "content": {"text": "no"}}],
    ],
    ids=repr,
)
def test_chat_prompt_refuses_bad_messages(messages: Any) -> None:
    body = {} if messages is None else {"messages": messages}
    refused(chat_prompt, body, param="messages")


def test_chat_prompt_turns_template_refusals_into_400() -> None:
    error = refused(chat_prompt, {"messages": [{"role": "user", "content": "refuse"}]}, param="messages")
    assert "refused this conversation" in error.message


# ---- error bodies ---------------------------------------------------------------------------------


def body_of(response: web.Response) -> Any:
    assert isinstance(response.body, bytes)
    return json.loads(response.body)


def test_api_error_response_has_openai_shape() -> None:
    response = error_response(ApiError(404, "no such model", param="model", code="model_not_found"))
    assert response.status == 404
    assert response.content_type == "application/json"
    assert "Retry-After" not in response.headers
    assert body_of(response) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_api_error_defaults_to_null_param_and_code() -> None:
    response = error_response(ApiError(400, "bad"))
    assert body_of(response)["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_api_error_503_asks_to_retry() -> None:
    response = error_response(ApiError(503, "not ready", "server_error", code="swarm_not_ready"))
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert body_of(response)["error"]["type"] == "server_error"
    for status in (500, 502):
        assert "Retry-After" not in error_response(ApiError(status, "x", "server_error")).headers
    assert error_response(ApiError(429, "busy", "rate_limit_error")).headers["Retry-After"] == "5"


# ---- metrics --------------------------------------------------------------------------------------


def metrics_node(
    states: list[State], *, ready: bool, term: int, epoch: int | None, sessions: int, drops: dict[str, int]
) -> Any:
    members = {f"peer-{i}": SimpleNamespace(state=s) for i, s in enumerate(states)}
    return SimpleNamespace(
        membership=SimpleNamespace(members=members),
        ready=lambda: ready,
        election=SimpleNamespace(term=term),
        layer_map=None if epoch is None else SimpleNamespace(epoch=epoch),
        service=SimpleNamespace(
            sessions=lambda: sessions,
            dropped=5,
            frames_out=4,
            send_s=0.5,
            batches=SimpleNamespace(passes=6, steps=9, queued_s=0.25, pass_s=1.5),
        ),
        transport=SimpleNamespace(frames_sent={"pass": 6, "tokens": 2}),
        drops=drops,
    )


def samples(text: str) -> dict[str, float]:
    """Sample lines of Prometheus text, by name with labels."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name not in out, f"sample {name} appears twice"
            out[name] = float(value)
    return out


def test_metrics_record_sums_requests() -> None:
    metrics = Metrics()
    for first, total, tokens in ((0.25, 1.0, 4), (0.5, 2.0, 6)):
        t = Timings(started=0.0, first_token_s=first, total_s=total, tokens=tokens, entry_s=total / 8)
        # entry -> a: 0.125 s, 10 bytes; a -> b: 0.25 s, 100 bytes; b -> entry: 0.0625 s, 0 bytes.
        t.add_step(((0.125, 10, 0.5), (0.25, 100, 1.0)), ["a", "b"], home_wire_s=0.0625, home_bytes=0)
        metrics.record(t)
    assert metrics.requests_completed == 2
    assert metrics.tokens_generated == 10
    assert metrics.time_to_first_token_s_sum == 0.75
    assert metrics.request_s_sum == 3.0
    assert metrics.bytes_sent == 220
    assert dict(metrics.compute_s) == {"a": 1.0, "b": 2.0}
    assert dict(metrics.wire_s) == {"entry->a": 0.25, "a->b": 0.5, "b->entry": 0.125}
    assert metrics.entry_s == 0.375


def test_metrics_render_is_prometheus_text() -> None:
    metrics = Metrics(requests_started=3, requests_failed=1)
    t = Timings(started=0.0, first_token_s=0.5, total_s=2.5, tokens=8, entry_s=0.375)
    t.add_step(((0.25, 64, 0.75), (0.5, 4096, 1.25)), ["a", "b"], home_wire_s=0.125, home_bytes=0)
    metrics.record(t)
    node = metrics_node(
        [State.ALIVE, State.ALIVE, State.SUSPECT, State.DEAD, State.DEAD, State.DEAD],
        ready=True,
        term=7,
        epoch=3,
        sessions=2,
        drops={"replay": 4, "bad_signature": 1},
    )
    text = metrics.render(node)
    assert text.endswith("\n")

    declared = {}
    for m in re.finditer(r"^# TYPE (swarm_\w+) (\w+)$", text, re.MULTILINE):
        declared[m.group(1)] = m.group(2)
        assert re.search(rf"^# HELP {m.group(1)} \S", text, re.MULTILINE), m.group(1)
    assert declared == {
        "swarm_requests_total": "counter",
        "swarm_tokens_generated_total": "counter",
        "swarm_time_to_first_token_seconds_sum": "counter",
        "swarm_request_seconds_sum": "counter",
        "swarm_bytes_sent_total": "counter",
        "swarm_stage_compute_seconds_total": "counter",
        "swarm_hop_wire_seconds_total": "counter",
        "swarm_entry_seconds_total": "counter",
        "swarm_ready": "gauge",
        "swarm_term": "gauge",
        "swarm_layer_map_epoch": "gauge",
        "swarm_peers": "gauge",
        "swarm_stage_sessions": "gauge",
        "swarm_stage_sessions_dropped_total": "counter",
        "swarm_stage_forward_passes_total": "counter",
        "swarm_stage_steps_total": "counter",
        "swarm_stage_queued_seconds_total": "counter",
        "swarm_stage_pass_seconds_total": "counter",
        "swarm_stage_frames_out_total": "counter",
        "swarm_stage_send_seconds_total": "counter",
        "swarm_frames_sent_total": "counter",
        "swarm_dropped_messages_total": "counter",
    }
    for name in declared:  # every sample comes after its own TYPE line
        assert all(re.split(r"[{ ]", line)[0] == name for line in _block(text, name)), name

    assert samples(text) == {
        'swarm_requests_total{outcome="started"}': 3,
        'swarm_requests_total{outcome="completed"}': 1,
        'swarm_requests_total{outcome="failed"}': 1,
        "swarm_tokens_generated_total": 8,
        "swarm_time_to_first_token_seconds_sum": 0.5,
        "swarm_request_seconds_sum": 2.5,
        "swarm_bytes_sent_total": 64 + 4096,
        'swarm_stage_compute_seconds_total{stage="a"}': 0.75,
        'swarm_stage_compute_seconds_total{stage="b"}': 1.25,
        'swarm_hop_wire_seconds_total{hop="a->b"}': 0.5,
        'swarm_hop_wire_seconds_total{hop="b->entry"}': 0.125,
        'swarm_hop_wire_seconds_total{hop="entry->a"}': 0.25,
        "swarm_entry_seconds_total": 0.375,
        "swarm_ready": 1,
        "swarm_term": 7,
        "swarm_layer_map_epoch": 3,
        'swarm_peers{state="alive"}': 3,  # this peer and two others
        'swarm_peers{state="suspect"}': 1,
        'swarm_peers{state="dead"}': 3,
        "swarm_stage_sessions": 2,
        "swarm_stage_sessions_dropped_total": 5,
        "swarm_stage_forward_passes_total": 6,
        "swarm_stage_steps_total": 9,
        "swarm_stage_queued_seconds_total": 0.25,
        "swarm_stage_pass_seconds_total": 1.5,
        "swarm_stage_frames_out_total": 4,
        "swarm_stage_send_seconds_total": 0.5,
        'swarm_frames_sent_total{kind="pass"}': 6,
        'swarm_frames_sent_total{kind="tokens"}': 2,
        'swarm_dropped_messages_total{reason="bad_signature"}': 1,
        'swarm_dropped_messages_total{reason="replay"}': 4,
    }


def test_metrics_render_before_anything_happened() -> None:
    node = metrics_node([], ready=False, term=0, epoch=None, sessions=0, drops={})
    node.membership = None
    values = samples(Metrics().render(node))
    assert values["swarm_ready"] == 0
    assert values["swarm_layer_map_epoch"] == 0
    assert values['swarm_peers{state="alive"}'] == 1  # only this peer
    assert values['swarm_peers{state="dead"}'] == 0
    assert values['swarm_requests_total{outcome="completed"}'] == 0
    assert not any(name.startswith(("swarm_stage_compute", "swarm_hop_wire", "swarm_dropped")) for name in values)


def _block(text: str, name: str) -> list[str]:
    """The sample lines between `name`'s TYPE line and the next comment."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"# TYPE {name} "))) + 1
    block = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        block.append(line)
    return block


def test_an_empty_stop_string_is_refused_and_n_must_be_an_integer() -> None:
    node = fake_node()
    for body in ({"stop": ""}, {"n": 1.0}, {"n": True}):
        with pytest.raises(ApiError) as e:
            completions(body, node)
        assert e.value.status == 400
    assert parse_common({"max_tokens": None, "max_completion_tokens": 5}, node)[0] == 5


def test_metrics_keep_full_precision_and_escape_labels() -> None:
    from swarm.metrics import _label, _number

    assert _number(1234567) == "1234567" and _number(12345.678) == "12345.678"
    assert _label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
