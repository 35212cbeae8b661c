"""Three `swarm-peer` processes serving a tiny random checkpoint of each architecture beyond Llama
(save_pretrained, with a word-level tokenizer; sliding windows of a few positions where the
architecture has them): the layer map splits it over all three, greedy output equals Hugging Face's
single-process model token for token, also for a batch of sessions at once, and a stream whose
middle stage is killed mid-way is replayed on the survivors to exactly the undisturbed text (Llama's
failover is tests/swarm/test_failover.py's). A peer given a checkpoint it cannot read refuses at
start."""

from __future__ import annotations

import dataclasses
import json
import signal
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.architectures import ARCHITECTURES
from peer.errors import UnsupportedModel
from peer.model_store import ModelFiles, ModelStore
from swarm.auth import Keyring
from swarm.cli import stream_events
from swarm.daemon import build_node
from tests.peer.test_architectures import VARIANTS, randomised, tiny_config
from tests.swarm.inproc import make_config
from tests.swarm.procs import PeerProcess, start_seeded_swarm, write_config
from tests.swarm.test_failover import GOSSIP, SERVING
from tests.swarm.test_fuzz import write_word_tokenizer

pytestmark = pytest.mark.timeout(600)

CAPS_MB = {"a": 300, "b": 600, "c": 900}
PROMPTS = [[5, 17, 42, 99], [3, 250, 7], [11, 12, 13, 14, 15, 16], [200]]
MAX_TOKENS = 8
FAILOVER_TOKENS = 600  # seconds of decoding after the fault's chunk, however fast the machine
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}  # the word tokenizer's; every other id i is the word "w<i>"


@pytest.fixture(scope="module", params=["mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text"])
def swarm(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three peers serving a tiny checkpoint of the architecture, ready; its directory, the status,
    the entry's URL and the peers."""
    tmp = tmp_path_factory.mktemp(f"arch-{request.param}")
    model_dir = tmp / "model"
    torch.manual_seed(0)
    shape = {**VARIANTS[request.param], "num_hidden_layers": 6, "max_position_embeddings": 1024}
    model = randomised(AutoModelForCausalLM.from_config(tiny_config(request.param, **shape)))
    model.save_pretrained(model_dir)
    write_word_tokenizer(model_dir, 256)
    config = write_config(tmp / "config.yaml", tmp / "cache", model={"spec": str(model_dir)}, gossip=GOSSIP,
                          serving=SERVING)  # fmt: skip
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers)
        entry = status["layer_map"]["stages"][1]["url"]
        yield {"model_dir": model_dir, "status": status, "entry": entry, "peers": peers}
    finally:
        for p in peers:
            p.stop()


def greedy_ids(url: str, prompt: list[int]) -> list[int]:
    """The swarm's greedy continuation of token ids, as ids (the word tokenizer's "w<id>" words)."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as resp:
        tokens = json.loads(resp.read())["choices"][0]["logprobs"]["tokens"]
    return [SPECIAL[t.strip()] if t.strip() in SPECIAL else int(t.strip().removeprefix("w")) for t in tokens]


def test_the_layer_map_spans_three_peers(swarm) -> None:
    stages = swarm["status"]["layer_map"]["stages"]
    assert len(stages) == 3 and stages[0]["start"] == 0 and stages[-1]["end"] == 6


def test_greedy_output_is_hugging_faces_token_for_token(swarm) -> None:
    reference = AutoModelForCausalLM.from_pretrained(swarm["model_dir"], dtype=torch.float32).eval()
    expected = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)  # fmt: skip
            expected[tuple(prompt)] = out[0, len(prompt) :].tolist()
    for prompt in PROMPTS:
        assert greedy_ids(swarm["entry"], prompt) == expected[tuple(prompt)], prompt
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: the stages' passes carry several sessions
        together = list(pool.map(lambda p: greedy_ids(swarm["entry"], p), PROMPTS))
    assert together == [expected[tuple(p)] for p in PROMPTS]


def test_a_stream_whose_middle_stage_is_killed_is_replayed_exactly(swarm) -> None:
    """Last in the module: it leaves two peers. The stage is stopped as the fifth chunk arrives, so
    at most the tokens already in flight are made before the fault, and killed once stopped."""
    peers = {p.url: p for p in swarm["peers"]}
    stages = [peers[s["url"]] for s in swarm["status"]["layer_map"]["stages"]]
    entry, middle = stages[0], stages[1]
    body = {"prompt": PROMPTS[0], "max_tokens": FAILOVER_TOKENS, "temperature": 0, "ignore_eos": True}
    expected = complete_text(str(entry.url), body)

    def stop_then_kill() -> None:
        middle.signal(signal.SIGSTOP)
        middle.kill()

    pieces, finish = [], None
    for i, event in enumerate(stream_events(str(entry.url), "/v1/completions", body, timeout_s=300)):
        for choice in event.get("choices", []):
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
        if i == 5:
            stop_then_kill()
    assert finish == "length"
    assert "".join(pieces) == expected
    assert "replaying" in entry.log(), "the fault came after the generation had finished"


def complete_text(url: str, body: dict[str, Any]) -> str:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def test_a_peer_refuses_a_gguf_it_cannot_read_at_start(tmp_path: Path, monkeypatch) -> None:
    """Before it joins a swarm and takes layers, not when it loads them (it would retry for ever):
    here a row without a GGUF layout, as an architecture's row is until its GGUF names are known."""
    monkeypatch.setitem(ARCHITECTURES, "qwen3", dataclasses.replace(ARCHITECTURES["qwen3"], gguf=None))
    meta = tmp_path / "meta"
    tiny_config("qwen3").save_pretrained(meta)
    files = ModelFiles(spec="qwen3.gguf", format="gguf", weights=(tmp_path / "qwen3.gguf",), meta_dir=meta)
    monkeypatch.setattr(ModelStore, "resolve", lambda self, spec: files)
    monkeypatch.setattr(ModelStore, "fingerprint", lambda self, f: "0" * 64)
    config = make_config(tmp_path, tmp_path / "qwen3.gguf", "a", [])
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen3 models are not read yet"):
        build_node(config, Keyring.of(b"k" * 32), show_progress=False)
