"""Three `swarm-peer` processes serving a tiny random checkpoint of each architecture beyond Llama
(save_pretrained, with a word-level tokenizer): the layer map splits it over all three, and greedy
output equals Hugging Face's single-process model token for token, also for a batch of sessions
at once. A peer given a checkpoint it cannot read refuses at start."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.errors import UnsupportedModel
from peer.model_store import ModelFiles, ModelStore
from swarm.auth import Keyring
from swarm.daemon import build_node
from tests.peer.test_architectures import randomised, tiny_config
from tests.swarm.inproc import make_config
from tests.swarm.procs import PeerProcess, start_seeded_swarm, write_config
from tests.swarm.test_fuzz import write_word_tokenizer

pytestmark = pytest.mark.timeout(600)

CAPS_MB = {"a": 300, "b": 600, "c": 900}
PROMPTS = [[5, 17, 42, 99], [3, 250, 7], [11, 12, 13, 14, 15, 16], [200]]
MAX_TOKENS = 8
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}  # the word tokenizer's; every other id i is the word "w<i>"


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def swarm(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three peers serving a tiny checkpoint of the architecture, ready; its directory and the entry."""
    tmp = tmp_path_factory.mktemp(f"arch-{request.param}")
    model_dir = tmp / "model"
    torch.manual_seed(0)
    model = randomised(AutoModelForCausalLM.from_config(tiny_config(request.param, num_hidden_layers=6)))
    model.save_pretrained(model_dir)
    write_word_tokenizer(model_dir, 256)
    config = write_config(tmp / "config.yaml", tmp / "cache", model={"spec": str(model_dir)})
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers)
        yield {"model_dir": model_dir, "status": status, "entry": status["layer_map"]["stages"][1]["url"]}
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


def test_a_peer_refuses_a_gguf_it_cannot_read_at_start(tmp_path: Path, monkeypatch) -> None:
    """Before it joins a swarm and takes layers, not when it loads them (it would retry for ever)."""
    meta = tmp_path / "meta"
    tiny_config("qwen3").save_pretrained(meta)
    files = ModelFiles(spec="qwen3.gguf", format="gguf", weights=(tmp_path / "qwen3.gguf",), meta_dir=meta)
    monkeypatch.setattr(ModelStore, "resolve", lambda self, spec: files)
    monkeypatch.setattr(ModelStore, "fingerprint", lambda self, f: "0" * 64)
    config = make_config(tmp_path, tmp_path / "qwen3.gguf", "a", [])
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen3 models are not read yet"):
        build_node(config, Keyring.of(b"k" * 32), show_progress=False)
