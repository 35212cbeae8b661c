"""The conformance suite: the shared three-peer SmolLM2 swarm driven by the clients users run against
an OpenAI-compatible server, offline, as a new user would: openai (plain, structured output parsed
into a Pydantic model, tools), litellm (chat with logprobs, streams), langchain-openai (merged stream
usage, `.batch()` of completions, structured output, tools) and lm-eval (`local-completions`: a
multiple-choice task through its loglikelihood path, equal to Hugging Face's scores, and a
generate_until task, on small task files kept in tests/swarm/data/lm_eval)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

DATA = Path(__file__).parent / "data" / "lm_eval"
QUESTION = "What is the capital of France?"


class City(BaseModel):
    city: str = Field(max_length=24)
    country: Literal["France", "Germany", "Italy"]


class Located(BaseModel):
    place: City


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def swarm(smollm2_swarm: dict[str, Any]) -> dict[str, Any]:
    return smollm2_swarm


@pytest.fixture(scope="module")
def model_id(swarm) -> str:
    import openai

    client = openai.OpenAI(base_url=swarm["stages"][0] + "/v1", api_key="unused", max_retries=0)
    return client.models.list().data[0].id


# ---- openai ------------------------------------------------------------------------------------------


def test_openai_parses_structured_output_and_tool_calls(swarm, model_id) -> None:
    import openai

    client = openai.OpenAI(base_url=swarm["stages"][1] + "/v1", api_key="unused", max_retries=0, timeout=300)
    messages: Any = [{"role": "user", "content": "Describe the capital of France as JSON."}]
    parsed = client.chat.completions.parse(model=model_id, messages=messages, response_format=City, max_tokens=60,
                                           temperature=0)  # fmt: skip
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.country in ("France", "Germany", "Italy")
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.chat.completions.create(model=model_id, messages=ask, tools=[WEATHER], tool_choice="required",
                                            max_tokens=40, temperature=0)  # fmt: skip
    call = called.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]
    # A pydantic tool whose nested type comes as $defs and a reference, forced by name.
    located = openai.pydantic_function_tool(Located, name="locate")
    found = client.chat.completions.create(model=model_id, messages=ask, tools=[located],
                                           tool_choice={"type": "function", "function": {"name": "locate"}},
                                           max_tokens=40, temperature=0)  # fmt: skip
    where = json.loads(found.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index,union-attr]
    assert Located.model_validate(where).place.country in ("France", "Germany", "Italy")
    chat = client.chat.completions.create(model=model_id, messages=ask, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3)  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


# ---- litellm -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(swarm, model_id, monkeypatch_module: pytest.MonkeyPatch) -> Any:
    """litellm, offline (its bundled model list, not a download), after a call and a stream: the
    logging threads it starts then and keeps for the process are not the test's."""
    monkeypatch_module.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    hi: dict[str, Any] = {"model": f"openai/{model_id}", "api_base": swarm["stages"][0] + "/v1", "api_key": "unused",
                          "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}  # fmt: skip
    litellm.completion(**hi)
    list(litellm.completion(**hi, stream=True))
    return litellm


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_litellm_chat_with_logprobs_and_streams(swarm, model_id, litellm) -> None:
    base = swarm["stages"][0] + "/v1"
    common: dict[str, Any] = {"model": f"openai/{model_id}", "api_base": base, "api_key": "unused",
                              "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                              "temperature": 0}  # fmt: skip
    answer = litellm.completion(**common, logprobs=True, top_logprobs=2)
    text = answer.choices[0].message.content
    assert text and "Paris" in text
    tokens = answer.choices[0].logprobs["content"]  # type: ignore[union-attr]
    assert "".join(t["token"] for t in tokens) == text and all(len(t["top_logprobs"]) == 2 for t in tokens)
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(**common, stream=True))
    assert streamed == text


# ---- langchain-openai ----------------------------------------------------------------------------------


def test_langchain_streams_batches_structures_and_binds_tools(swarm, model_id) -> None:
    from langchain_openai import ChatOpenAI, OpenAI

    base = swarm["stages"][2] + "/v1"
    chat = ChatOpenAI(model=model_id, base_url=base, api_key="unused", temperature=0, max_tokens=12,  # type: ignore[arg-type]
                      max_retries=0, stream_usage=True)  # fmt: skip
    whole = chat.invoke(QUESTION)
    merged = None
    for piece in chat.stream(QUESTION):
        merged = piece if merged is None else merged + piece
    assert merged is not None and merged.content == whole.content
    # Usage comes once in the stream: merged, it is the whole answer's, not twice it.
    assert merged.usage_metadata == whole.usage_metadata  # type: ignore[attr-defined]
    completions = OpenAI(model=model_id, base_url=base, api_key="unused", temperature=0, max_tokens=5,  # type: ignore[arg-type]
                         max_retries=0, batch_size=4)  # fmt: skip
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    assert completions.batch(prompts) == [completions.invoke(p) for p in prompts]
    longer = ChatOpenAI(model=model_id, base_url=base, api_key="unused", temperature=0, max_tokens=60,  # type: ignore[arg-type]
                        max_retries=0)  # fmt: skip
    structured = longer.with_structured_output(City, method="json_schema")
    city = structured.invoke("Describe the capital of France as JSON.")
    assert isinstance(city, City)
    tooled = longer.bind_tools([WEATHER], tool_choice="get_weather")
    message = tooled.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]


# ---- lm-eval -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_results(swarm, model_id, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path_factory.mktemp("lm_eval_tasks")
    for name in ("capitals.jsonl", "counting.jsonl"):
        shutil.copy(DATA / name, tasks / name)
    for name in ("swarm_capitals.yaml", "swarm_counting.yaml"):
        (tasks / name).write_text((DATA / name).read_text().replace("DATA_DIR", str(tasks)))
    meta = swarm["files"].meta_dir
    model_args = (f"base_url={swarm['stages'][0]}/v1/completions,model={model_id},tokenizer={meta},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")  # fmt: skip
    return simple_evaluate(model="local-completions", model_args=model_args, tasks=["swarm_capitals",
                           "swarm_counting"], task_manager=TaskManager(include_path=str(tasks)), batch_size=2,
                           log_samples=True)  # type: ignore[no-any-return]  # fmt: skip


def test_lm_eval_loglikelihood_equals_hugging_face(swarm, lm_eval_results) -> None:
    """Every choice's log-likelihood, as lm-eval read it from echo + logprobs, is Hugging Face's."""
    from transformers import AutoModelForCausalLM

    from peer.tokenizer import Tokenizer

    files = swarm["files"]
    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    hf = AutoModelForCausalLM.from_pretrained(str(files.gguf_path.parent), gguf_file=files.gguf_path.name,
                                              dtype=torch.float32).eval()  # fmt: skip
    samples = lm_eval_results["samples"]["swarm_capitals"]
    assert len(samples) == 4
    for sample in samples:
        for (question, choice), response in zip(sample["arguments"], sample["resps"], strict=True):
            # As lm-eval splits the pair: the context's tokens, then the rest of the whole text's.
            context, whole = tokenizer.encode(question), tokenizer.encode(question + choice)
            with torch.no_grad():
                scores = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), dim=-1)
            expected = sum(float(scores[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            logprob, _ = response[0]
            assert math.isclose(logprob, expected, abs_tol=1e-4 * (len(whole) - len(context))), (question, choice)
    accuracy = lm_eval_results["results"]["swarm_capitals"]["acc,none"]
    assert accuracy == sum(s["acc"] for s in samples) / 4


def test_lm_eval_generate_until(swarm, lm_eval_results) -> None:
    samples = lm_eval_results["samples"]["swarm_counting"]
    assert len(samples) == 3
    for sample in samples:
        (generated,) = sample["resps"][0]
        assert "," not in generated and generated  # cut at the stop string
    assert lm_eval_results["results"]["swarm_counting"]["exact_match,none"] >= 1 / 3  # " 5" follows "1, 2, 3, 4,"
