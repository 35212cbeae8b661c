"""OpenAI compatibility on a running three-peer swarm (the shared SmolLM2 swarm), each test sending
the exact request a client sent: log-probabilities wherever OpenAI has them (completions with
alternatives and `echo`, chat, streamed and not, aligned with the text after stop trimming) equal
Hugging Face's `log_softmax` within 1e-4; several prompts and `n` in one request; penalties and
logit bias; the details clients trip over (usage once, `developer`, nulls, a model by id,
Retry-After, a client that hangs up, stop strings that hold nothing back needlessly)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from peer.sampling import SamplingParams, adjusted
from peer.tokenizer import Tokenizer
from swarm.cli import stream_events
from swarm.local import wait_for

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

PROMPT = "The capital of France is Paris. The capital of Germany is"
TOLERANCE = 1e-4  # float32 swarm against float32 Hugging Face


@pytest.fixture(scope="module")
def swarm(smollm2_swarm: dict[str, Any]) -> dict[str, Any]:
    return smollm2_swarm


@pytest.fixture(scope="module")
def tokenizer(swarm) -> Tokenizer:
    files = swarm["files"]
    return Tokenizer.from_dir(files.meta_dir, files.load_config())


@pytest.fixture(scope="module")
def hf(swarm) -> Any:
    """Hugging Face's model from the same GGUF file, float32."""
    from transformers import AutoModelForCausalLM

    files = swarm["files"]
    return AutoModelForCausalLM.from_pretrained(
        str(files.gguf_path.parent), gguf_file=files.gguf_path.name, dtype=torch.float32
    ).eval()


def hf_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of Hugging Face's logits at every position of `ids`: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(url: str, path: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def ok(url: str, path: str, body: Any) -> dict[str, Any]:
    status, answer, _ = post(url, path, body)
    assert status == 200, answer
    return answer


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line and not line.startswith("#"))}  # fmt: skip


# ---- log-probabilities -------------------------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_the_prompt_as_hugging_face_does(swarm, tokenizer, hf) -> None:
    """lm-eval's loglikelihood request: echo, max_tokens 0, logprobs."""
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 5, "temperature": 0}
    choice = ok(swarm["stages"][1], "/v1/completions", body)["choices"][0]
    ids = tokenizer.encode(PROMPT)
    expected = hf_logprobs(hf, ids)
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert "".join(logprobs["tokens"]) == PROMPT and len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
    for i in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][i] - float(expected[i - 1, ids[i]])) < TOLERANCE, i
        best = torch.topk(expected[i - 1], 5)
        top = logprobs["top_logprobs"][i]
        wanted = {tokenizer.decode([t], skip_special_tokens=False) for t in best.indices.tolist()}
        assert wanted <= set(top) and len(top) <= 6  # the 5 most likely, and the prompt's own token
        for text, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            assert abs(top[tokenizer.decode([text], skip_special_tokens=False)] - value) < TOLERANCE


def test_completion_logprobs_with_alternatives_equal_hugging_face(swarm, tokenizer, hf) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "logprobs": 3, "temperature": 0, "ignore_eos": True}
    choice = ok(swarm["stages"][0], "/v1/completions", body)["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    ids = tokenizer.encode(PROMPT)
    for _ in range(8):  # Hugging Face's greedy continuation
        ids.append(int(hf_logprobs(hf, ids)[-1].argmax()))
    assert tokenizer.decode(ids[-8:]) == choice["text"]
    expected = hf_logprobs(hf, ids)
    for i, (value, top) in enumerate(zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)):
        row = expected[len(ids) - 9 + i]
        assert abs(value - float(row[ids[len(ids) - 8 + i]])) < TOLERANCE
        assert len(top) == 3 and abs(max(top.values()) - value) < TOLERANCE
        assert sorted(top.values(), reverse=True) == pytest.approx(torch.topk(row, 3).values.tolist(), abs=TOLERANCE)


def test_echo_with_generation_returns_the_prompt_then_the_completion(swarm) -> None:
    url = swarm["stages"][2]
    plain = ok(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0})
    echoed = ok(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
                                         "echo": True})  # fmt: skip
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    tail = echoed["choices"][0]["logprobs"]["token_logprobs"][-5:]
    assert tail == pytest.approx(plain["choices"][0]["logprobs"]["token_logprobs"], abs=TOLERANCE)
    assert echoed["usage"]["completion_tokens"] == 5


def test_chat_logprobs_and_top_logprobs(swarm) -> None:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    choice = ok(swarm["stages"][0], "/v1/chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])
        assert bytes(t["bytes"]).decode() == t["token"]
    without = ok(swarm["stages"][0], "/v1/chat/completions", {**body, "logprobs": None, "top_logprobs": None})
    assert without["choices"][0]["logprobs"] is None
    assert without["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_streamed_logprobs_equal_the_whole_ones(swarm) -> None:
    url = swarm["stages"][1]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = ok(url, "/v1/completions", body)["choices"][0]
    chunks = [e["choices"][0] for e in stream_events(url, "/v1/completions", body) if e["choices"]]
    assert all(c["logprobs"] is not None and "".join(c["logprobs"]["tokens"]) == c["text"] for c in chunks)
    joined = {key: [x for c in chunks for x in c["logprobs"][key]] for key in whole["logprobs"]}
    assert joined == whole["logprobs"]  # text offsets run on across chunks
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 1}  # fmt: skip
    whole_chat = ok(url, "/v1/chat/completions", chat)["choices"][0]["logprobs"]["content"]
    streamed = [t for e in stream_events(url, "/v1/chat/completions", chat) if e["choices"]
                for t in (e["choices"][0].get("logprobs") or {"content": []})["content"]]  # fmt: skip
    assert streamed == whole_chat


def test_stop_trimmed_logprob_tokens_join_up_to_the_text(swarm) -> None:
    """The issue's example: prompt "1, 2, 3, 4,", stop [" 7"]."""
    body = {"prompt": "1, 2, 3, 4,", "stop": [" 7"], "max_tokens": 12, "temperature": 0, "logprobs": 1}
    choice = ok(swarm["stages"][0], "/v1/completions", body)["choices"][0]
    assert choice["text"] == " 5, 6," and choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    streamed = [e["choices"][0] for e in stream_events(swarm["stages"][0], "/v1/completions", body) if e["choices"]]
    assert "".join(t for c in streamed for t in c["logprobs"]["tokens"]) == choice["text"]


# ---- several generations in one request ----------------------------------------------------------------


def test_several_prompts_run_at_once_and_come_back_in_order(swarm, tokenizer) -> None:
    url = swarm["stages"][0]
    prompts = ["Once upon a time", "def fibonacci(n):", tokenizer.encode("Paris is the capital of")]
    lone = [ok(url, "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0})["choices"][0]["text"]
            for p in prompts]  # fmt: skip
    together = ok(url, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [c["text"] for c in together["choices"]] == lone
    assert together["usage"]["completion_tokens"] == 18
    streamed: dict[int, str] = {}
    for event in stream_events(url, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0}):
        for c in event["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[i] for i in range(3)] == lone


def test_n_choices_draw_with_seeds_derived_per_choice(swarm) -> None:
    url = swarm["stages"][1]
    body = {"prompt": "My favourite animal is", "max_tokens": 8, "temperature": 1.0, "seed": 11}
    lone = ok(url, "/v1/completions", body)["choices"][0]["text"]
    choices = ok(url, "/v1/completions", {**body, "n": 3})["choices"]
    assert choices[0]["text"] == lone  # choice 0 draws with the request's own seed
    assert len({c["text"] for c in choices}) > 1
    assert [c["text"] for c in ok(url, "/v1/completions", {**body, "n": 3})["choices"]] == [c["text"] for c in choices]
    chat = {"messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 5, "temperature": 1.0,
            "seed": 3, "n": 2}  # fmt: skip
    assert [c["index"] for c in ok(url, "/v1/chat/completions", chat)["choices"]] == [0, 1]


# ---- penalties and bias ------------------------------------------------------------------------------


def test_penalties_and_bias_are_applied_at_the_last_stage_as_openai_defines_them(swarm, tokenizer, hf) -> None:
    prompt = "the the the the the"
    bias_token = tokenizer.encode(" cat")[0]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "presence_penalty": 1.5,
            "frequency_penalty": 0.7, "logit_bias": {str(bias_token): 4.0}}  # fmt: skip
    text = ok(swarm["stages"][2], "/v1/completions", body)["choices"][0]["text"]
    params = SamplingParams(presence_penalty=1.5, frequency_penalty=0.7, logit_bias=((bias_token, 4.0),))
    ids = tokenizer.encode(prompt)
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            logits = hf(torch.tensor([ids + generated])).logits[0, -1:].float()
            generated.append(int(adjusted(logits, params, generated).argmax()))
    assert text == tokenizer.decode(generated)
    plain = ok(swarm["stages"][2], "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                        "ignore_eos": True})["choices"][0]["text"]  # fmt: skip
    assert plain != text
    forced = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logit_bias": {str(bias_token): 100}}
    assert ok(swarm["stages"][0], "/v1/completions", forced)["choices"][0]["text"] == " cat" * 3


# ---- the details clients trip over -------------------------------------------------------------------


def test_a_model_is_retrieved_by_id(swarm) -> None:
    import openai

    client = openai.OpenAI(base_url=swarm["stages"][0] + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_developer_messages_are_system_messages(swarm) -> None:
    url = swarm["stages"][0]
    turn = {"role": "user", "content": "What is 2 + 2?"}
    answers = [ok(url, "/v1/chat/completions", {"messages": [{"role": role, "content": "Answer in one word."}, turn],
                                                "max_tokens": 8, "temperature": 0})["choices"][0]["message"]["content"]
               for role in ("system", "developer")]  # fmt: skip
    assert answers[0] == answers[1]


def test_null_means_the_default(swarm) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": None, "ignore_eos": None, "n": None,
            "logprobs": None, "echo": None, "stop": None, "seed": None, "user": None, "logit_bias": None}  # fmt: skip
    answer = ok(swarm["stages"][0], "/v1/completions", body)
    assert answer["object"] == "text_completion" and answer["choices"][0]["logprobs"] is None


def test_stop_strings_hold_back_only_what_could_start_one(swarm) -> None:
    url = swarm["stages"][1]
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    plain = [e["choices"][0]["text"] for e in stream_events(url, "/v1/completions", body) if e["choices"]]
    held = [e["choices"][0]["text"] for e in stream_events(url, "/v1/completions", {**body, "stop": ["@@@@"]})
            if e["choices"]]  # fmt: skip
    assert held == plain  # no text of this answer could start "@@@@": every token's text goes out at once


def test_a_client_that_hangs_up_stops_its_generation(swarm) -> None:
    url = swarm["stages"][0]
    before = metrics(url)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "ignore_eos": True}).encode()
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_for(lambda: all(metrics(u)["swarm_stage_sessions"] >= 1 for u in swarm["stages"]), 60, "the session")
    # 4000 tokens would take minutes; the entry notices within a step and closes the session everywhere.
    failed, completed = 'swarm_requests_total{outcome="failed"}', 'swarm_requests_total{outcome="completed"}'
    wait_for(lambda: metrics(url)[failed] > before[failed], 120, "the request to end")
    wait_for(lambda: all(metrics(u)["swarm_stage_sessions"] == 0 for u in swarm["stages"]), 60, "sessions closed")
    assert metrics(url)[completed] == before[completed]  # ended as abandoned, not run to its end


def test_a_429_says_when_to_retry(swarm) -> None:
    url = swarm["stages"][2]
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    streams = [stream_events(url, "/v1/completions", body) for _ in range(8)]  # every slot of this client
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(next, streams))  # each has produced a chunk: all eight run
        status, answer, headers = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 429 and answer["error"]["code"] == "too_many_sessions"
        assert int(headers["Retry-After"]) > 0
    finally:
        for s in streams:
            s.close()


# ---- structured output and tools ----------------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"enum": ["France", "Germany", "Italy", "Spain"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Describe the capital of France as JSON."}]


def matches_city(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert set(value) == {"city", "country", "population_millions"}, value
    assert isinstance(value["city"], str) and len(value["city"]) <= 24
    assert value["country"] in CITY["properties"]["country"]["enum"]
    assert isinstance(value["population_millions"], int) and 0 <= value["population_millions"] <= 50
    return value


def test_json_schema_output_parses_and_matches_on_every_entry_peer(swarm) -> None:
    schema = {"name": "city", "schema": CITY, "strict": True}
    body = {"messages": QUESTION, "max_tokens": 80, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": schema}}  # fmt: skip
    answers = [ok(url, "/v1/chat/completions", body)["choices"][0] for url in swarm["stages"]]
    assert all(a["finish_reason"] == "stop" for a in answers)
    matches_city(answers[0]["message"]["content"])
    assert len({a["message"]["content"] for a in answers}) == 1  # greedy: the same on every entry peer
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in
                       stream_events(swarm["stages"][0], "/v1/chat/completions", body) if e["choices"])  # fmt: skip
    assert streamed == answers[0]["message"]["content"]
    sampled = [ok(swarm["stages"][1], "/v1/chat/completions", {**body, "temperature": 1.0, "seed": s})
               for s in range(3)]  # fmt: skip
    for answer in sampled:
        matches_city(answer["choices"][0]["message"]["content"])


def test_json_object_output_is_a_json_object(swarm) -> None:
    body = {"messages": [{"role": "user", "content": "Give me a JSON object with a name and an age."}],
            "max_tokens": 120, "temperature": 0, "response_format": {"type": "json_object"}}  # fmt: skip
    choice = ok(swarm["stages"][2], "/v1/chat/completions", body)["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize(
    "response_format",
    [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
     {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}],
    ids=repr,
)  # fmt: skip
def test_a_bad_response_format_is_a_400(swarm, response_format: Any) -> None:
    status, answer, _ = post(swarm["stages"][0], "/v1/chat/completions",
                             {"messages": QUESTION, "response_format": response_format})  # fmt: skip
    assert status == 400 and answer["error"]["param"] == "response_format"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                       "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                       "additionalProperties": False},
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def weather_call(message: dict[str, Any]) -> dict[str, Any]:
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    return call


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=repr)
def test_a_forced_tool_call_is_a_valid_call(swarm, choice: Any) -> None:
    body = {"messages": ASK, "tools": [TIME, WEATHER] if choice == "required" else [WEATHER, TIME],
            "tool_choice": choice, "max_tokens": 60, "temperature": 0}  # fmt: skip
    answer = ok(swarm["stages"][0], "/v1/chat/completions", body)["choices"][0]
    assert answer["finish_reason"] == "tool_calls"
    if choice != "required":
        assert weather_call(answer["message"])["function"]["name"] == "get_weather"
    else:
        (call,) = answer["message"]["tool_calls"]
        assert call["function"]["name"] in ("get_weather", "get_time")
        json.loads(call["function"]["arguments"])
    events = list(stream_events(swarm["stages"][1], "/v1/chat/completions", body))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["arguments"] == ""
    assert calls[0]["function"]["name"] == answer["message"]["tool_calls"][0]["function"]["name"]
    assert "".join(c["function"]["arguments"] for c in calls) == answer["message"]["tool_calls"][0]["function"][
        "arguments"]  # fmt: skip
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


def test_a_conversation_goes_on_after_a_tool_call(swarm) -> None:
    """The later turns a client sends after a call: the assistant's tool_calls with content null,
    then the tool's result; the model answers from it."""
    url = swarm["stages"][2]
    first = ok(url, "/v1/chat/completions", {"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                              "max_tokens": 60, "temperature": 0})["choices"][0]["message"]  # fmt: skip
    call = weather_call(first)
    turns = [
        *ASK,
        first,
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 31, "sky": "clear"}'},
    ]
    answer = ok(url, "/v1/chat/completions", {"messages": turns, "tools": [WEATHER], "max_tokens": 30,
                                              "temperature": 0})["choices"][0]  # fmt: skip
    assert answer["finish_reason"] in ("stop", "length", "tool_calls")
    assert answer["message"]["content"] or answer["message"].get("tool_calls")
    status, refused, _ = post(url, "/v1/chat/completions", {"messages": [*ASK, {"role": "tool", "content": "x"}]})
    assert status == 400 and "tool_call_id" in refused["error"]["message"]


def test_tool_choice_auto_and_none(swarm) -> None:
    url = swarm["stages"][0]
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 60, "temperature": 0}
    auto = ok(url, "/v1/chat/completions", body)["choices"][0]
    if auto["finish_reason"] == "tool_calls":  # the model chose to call: it is a valid call
        weather_call(auto["message"])
    else:
        assert isinstance(auto["message"]["content"], str)
    streamed = [e for e in stream_events(url, "/v1/chat/completions", body) if e["choices"]]
    assert streamed[-1]["choices"][0]["finish_reason"] == auto["finish_reason"]
    plain = ok(url, "/v1/chat/completions", {"messages": ASK, "max_tokens": 20, "temperature": 0})
    none = ok(url, "/v1/chat/completions", {**body, "tool_choice": "none", "max_tokens": 20})
    assert none["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
