"""Three `swarm-peer` processes on 127.0.0.1 serving the embedded SmolLM2-135M-Instruct: greedy
output equals Hugging Face's single-process model token for token, the official `openai` client
works (chat and completions, streaming and not), every peer gives the same answer, eight
concurrent requests each match their lone run, and bad input of every kind, on the public API and
on the stage links, gets a clear refusal while other sessions carry on undisturbed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from swarm.auth import Keyring
from swarm.errors import MessageRejected
from swarm.frames import Row, pass_frame
from swarm.layer_map import LayerMap
from swarm.tensors import pack
from tests.swarm.prober import Prober
from tests.swarm.procs import wait_for

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

PROMPTS = ["The future of AI is", "def fibonacci(n):", "Paris is the capital of", "Once upon a time"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def swarm(smollm2_swarm: dict[str, Any]) -> dict[str, Any]:
    return smollm2_swarm


@pytest.fixture(scope="module")
def reference(swarm) -> dict[str, list[int]]:
    """Hugging Face's own greedy continuation of each prompt, from the same GGUF file."""
    from peer.tokenizer import Tokenizer
    from tests.helpers import hf_greedy

    files = swarm["files"]
    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    out = hf_greedy(files, PROMPTS, MAX_TOKENS)
    out["_pieces"] = {p: [tokenizer.decode([t], skip_special_tokens=False) for t in ids] for p, ids in out.items()}  # type: ignore[assignment]
    return out


def post(url: str, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(url: str, prompt: str | list[int], **extra: Any) -> dict[str, Any]:
    status, body = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                  "logprobs": 1, **extra})  # fmt: skip
    assert status == 200, body
    return body


def test_greedy_output_is_hugging_faces_token_for_token(swarm, reference) -> None:
    entry = swarm["stages"][1]
    for prompt in PROMPTS:
        choice = complete(entry, prompt)["choices"][0]
        assert choice["logprobs"]["tokens"] == reference["_pieces"][prompt], prompt  # type: ignore[index]
        assert len(choice["logprobs"]["token_logprobs"]) == len(reference[prompt])


def test_the_openai_client_works(swarm) -> None:
    import openai

    client = openai.OpenAI(base_url=swarm["stages"][0] + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=30,
        temperature=0,
    )  # fmt: skip
    answer = chat.choices[0].message.content
    assert answer is not None and "Paris" in answer
    streamed = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=30,
        temperature=0, stream=True,
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer
    text = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    pieces = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in pieces if c.choices) == text.choices[0].text
    assert text.usage is not None and text.usage.completion_tokens == MAX_TOKENS
    timings = (text.model_extra or {}).get("timings")
    assert timings and timings["time_to_first_token_s"] > 0 and len(timings["compute_s_per_stage"]) == 3
    assert 0 < timings["entry_s"] < timings["total_s"]  # each token's turn at the entry, between steps


def test_token_id_prompts_and_ignore_eos(swarm) -> None:
    """A prompt given as token ids is the same prompt; ignore_eos generates max_tokens past the end."""
    from peer.tokenizer import Tokenizer

    files, entry = swarm["files"], swarm["stages"][0]
    ids = Tokenizer.from_dir(files.meta_dir, files.load_config()).encode(PROMPTS[2])
    assert complete(entry, ids)["choices"][0]["text"] == complete(entry, PROMPTS[2])["choices"][0]["text"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = {"messages": question, "max_tokens": 30, "temperature": 0}
    status, short = post(entry, "/v1/chat/completions", chat)
    assert status == 200 and short["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] < 30
    status, long = post(entry, "/v1/chat/completions", {**chat, "ignore_eos": True})
    assert status == 200 and long["choices"][0]["finish_reason"] == "length"
    assert long["usage"]["completion_tokens"] == 30


def test_every_stage_s_peer_gives_the_same_answer(swarm) -> None:
    answers = [complete(url, PROMPTS[2])["choices"][0]["text"] for url in swarm["stages"]]
    assert answers[0] and answers.count(answers[0]) == len(answers), answers


def test_eight_concurrent_requests_each_match_their_lone_run(swarm) -> None:
    urls = swarm["stages"]
    jobs = [(urls[i % len(urls)], PROMPTS[i % len(PROMPTS)], {"temperature": 0.8, "seed": i}) for i in range(8)]
    alone = [complete(url, prompt, **extra)["choices"][0]["text"] for url, prompt, extra in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: complete(job[0], job[1], **job[2])["choices"][0]["text"], jobs))
    assert together == alone


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line and not line.startswith("#"))}  # fmt: skip


def test_a_pass_of_several_sessions_crosses_each_hop_as_one_frame(swarm) -> None:
    """Eight sessions entering at the first stage's peer (a client's limit there): its passes carry
    several sessions each, and each pass goes on to the second stage as exactly one frame (the
    entry's own steps to its own stage never touch the wire); the tokens come home from the last
    stage, one frame a pass."""
    first, _, last = swarm["stages"]
    before = [metrics(url) for url in (first, last)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: complete(first, PROMPTS[i % 4])["choices"][0]["text"], range(8)))
    assert all(texts)
    after = [metrics(url) for url in (first, last)]
    grew = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
    passes, steps = grew[0]["swarm_stage_forward_passes_total"], grew[0]["swarm_stage_steps_total"]
    assert steps == 8 * MAX_TOKENS and steps / passes > 2  # batched: every pass carried several sessions
    assert grew[0]['swarm_frames_sent_total{kind="pass"}'] == passes
    assert grew[1]['swarm_frames_sent_total{kind="tokens"}'] == grew[1]["swarm_stage_forward_passes_total"]
    # Each stage accounts for its passes' results going out, and for where its steps' time went.
    for g in grew:
        assert g["swarm_stage_frames_out_total"] == g["swarm_stage_forward_passes_total"]
        assert g["swarm_stage_send_seconds_total"] > 0 and g["swarm_stage_pass_seconds_total"] > 0


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", {"prompt": 5}, 400),
        ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400),
        ("/v1/completions", {"prompt": "hi", "n": 9}, 400),
        ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400),
        ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400),
        ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400),
        ("/v1/completions", {"prompt": [1, 70000]}, 400),
        ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, 400),
        ("/v1/completions", b"x" * (2 * 1024 * 1024), 413),
        ("/v1/completions", {"prompt": "\ud800 a lone surrogate"}, 400),
        ("/v1/chat/completions", {"messages": "hello"}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ],
)
def test_public_endpoints_answer_bad_input_in_openais_shape(swarm, path: str, body: Any, status: int) -> None:
    url = swarm["stages"][0]
    got, answer = post(url, path, None, raw=body) if isinstance(body, bytes) else post(url, path, body)
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"} and answer["error"]["message"]
    assert complete(url, PROMPTS[0], max_tokens=2)["choices"][0]["text"]  # and it keeps serving


def test_stage_links_refuse_bad_frames_without_disturbing_sessions(swarm, reference) -> None:
    """Frames a key holder sends by hand, each wrong in one way, come back refused with their reason
    (a link without the key is refused at its handshake), while a real session runs undisturbed."""
    stages = swarm["stages"]
    status = json.loads(urllib.request.urlopen(stages[0] + "/swarm/status", timeout=10).read())
    layer_map, fingerprint = status["layer_map"], status["model"]["fingerprint"]
    prober = Prober(layer_map, fingerprint, Keyring.of(swarm["key"]))
    keyless = Prober(layer_map, fingerprint, Keyring())
    map_id, epoch = LayerMap.from_dict(layer_map).id, layer_map["epoch"]
    tokens = pack(torch.tensor([[1, 2, 3]], dtype=torch.int64))

    def row(opening: bool = True, trail: tuple = ()) -> Row:
        base = prober.row("probe", 3, 0, opening)
        return Row(base.session, base.entry, base.step, base.start, base.length, base.opening, trail)

    bad = [
        (0, pass_frame(map_id, epoch + 7, [row()], tokens), "stale_epoch"),
        (0, pass_frame("1.1.another-leader", epoch, [row()], tokens), "stale_epoch"),
        (0, pass_frame(map_id, epoch, [row()], pack(torch.ones(1, 3))), "mismatch"),  # floats, not ids
        (0, pass_frame(map_id, epoch, [row()], pack(torch.ones(1, 3, 2, dtype=torch.int64))), "mismatch"),  # 3-D
        (0, pass_frame(map_id, epoch, [row(opening=False)], tokens), "unknown_session"),  # never opened
        (0, pass_frame(map_id, epoch, [row()], {"dtype": "float32", "shape": [1, 3], "data": b"xx"}), "malformed"),
        (1, pass_frame(map_id, epoch, [row()], pack(torch.ones(1, 3, 576))), "mismatch"),  # not through stage 0
    ]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, stages[0], PROMPTS[1])  # a real session in flight meanwhile
        with pytest.raises(MessageRejected) as refused:
            keyless.step("probe", [1, 2, 3], 0, opening=True)
        assert refused.value.reason == "unreachable" and "(unknown_key)" in str(refused.value)
        for stage, frame, reason in bad:
            answer = prober.send(stage, frame)
            assert (answer.kind, answer.value) == ("refused", reason), (stage, frame["rows"], answer)
        # Rows that claim to have been through stage 0, from a peer that is not stage 0: they are only
        # counted (a refusal would go to whatever entry peer the rows name).
        second = stages[1]

        def dropped() -> int:
            found = json.loads(urllib.request.urlopen(second + "/swarm/status", timeout=10).read())
            return int(found["dropped_messages"].get("mismatch", 0))

        before = dropped()
        claimed = row(trail=((0.0, 0, 0.0),))
        prober.send_only(1, [pass_frame(map_id, epoch, [claimed], pack(torch.ones(1, 3, 576)))])
        wait_for(lambda: dropped() > before, 60, "the second stage to count the frame it dropped")
        text = running.result()["choices"][0]
    assert text["logprobs"]["tokens"] == reference["_pieces"][PROMPTS[1]]  # type: ignore[index]
    first = prober.step("fine", [1, 2, 3], 0, opening=True)  # the prober's own session runs too
    assert 0 <= first < 49152
    prober.close("fine")


def test_swarm_generate_and_chat_stream_to_the_terminal(
    swarm, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarm.cli import main

    url = swarm["stages"][2]
    assert main(["generate", "--url", url, "--max-tokens", str(MAX_TOKENS), PROMPTS[0]]) == 0
    expected = complete(url, PROMPTS[0])["choices"][0]["text"]
    assert capsys.readouterr().out == expected + "\n"
    lines = iter(["What is the capital of France?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--url", url, "--max-tokens", "30"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_a_long_prompt_crosses_the_stages(swarm) -> None:
    # ~700 tokens: the first hop carries ~1.6 MB of hidden states, more than a control message may.
    prompt = "The quick brown fox jumps over the lazy dog. " * 70
    status, body = post(swarm["stages"][0], "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] > 600 and body["usage"]["completion_tokens"] == 3
    assert body["timings"]["bytes_sent"] > 1024 * 1024


def test_a_stream_carries_its_usage_once_and_only_when_asked(swarm) -> None:
    from swarm.cli import stream_events

    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream_options": {"include_usage": True}}
    events = list(stream_events(swarm["stages"][1], "/v1/completions", body))
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["timings"]["tokens"] == 4
    # The usage comes once, on a last chunk with no choices, as OpenAI sends it (LangChain adds them up).
    assert [e["usage"]["completion_tokens"] for e in events if e.get("usage")] == [4]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    plain = list(stream_events(swarm["stages"][1], "/v1/completions", {**body, "stream_options": None}))
    assert not any(e.get("usage") for e in plain) and len(plain) == len(events) - 1
