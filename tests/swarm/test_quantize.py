"""Three `swarm-peer --quantize int8` (and int4) processes on a tiny random Gemma 3 checkpoint
(sliding and global layers): each holds its layers quantized and computes in bfloat16 (the CPU
default with quantized weights), and the swarm's greedy tokens are those of the same quantized
stages in one process. A peer started without --quantize is refused: the swarm would size its
share in quantized bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.checkpoint import open_checkpoint
from peer.config import StoreConfig
from peer.model_store import ModelStore
from peer.pipeline import LocalPipeline
from peer.shard import load_stage
from tests.peer.test_architectures import VARIANTS, randomised, tiny_config
from tests.swarm.procs import PeerProcess, start_seeded_swarm, wait_for, write_config
from tests.swarm.test_architectures import MAX_TOKENS, PROMPTS, greedy_ids
from tests.swarm.test_fuzz import write_word_tokenizer

pytestmark = pytest.mark.timeout(600)

CAPS_MB = {"a": 300, "b": 600, "c": 900}


@pytest.fixture(scope="module", params=["int8", "int4"])
def swarm(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"quantize-swarm-{mode}")
    model_dir = tmp / "model"
    torch.manual_seed(0)
    shape = {**VARIANTS["gemma3_text"], "num_hidden_layers": 6}
    randomised(AutoModelForCausalLM.from_config(tiny_config("gemma3_text", **shape))).save_pretrained(model_dir)
    write_word_tokenizer(model_dir, 256)
    config = write_config(tmp / "config.yaml", tmp / "cache", model={"spec": str(model_dir)})
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers, extra_args=("--quantize", mode))
        yield {"model_dir": model_dir, "status": status, "peers": peers, "tmp": tmp, "mode": mode}
    finally:
        for p in peers:
            p.stop()


def test_every_peer_holds_quantized_weights_and_computes_in_bfloat16(swarm) -> None:
    stages = swarm["status"]["layer_map"]["stages"]
    assert len(stages) == 3
    for peer in swarm["peers"]:
        status = peer.status(timeout_s=10)
        assert status is not None
        assert (status["model"]["quantize"], status["model"]["dtype"]) == (swarm["mode"], "bfloat16")


def test_greedy_tokens_are_those_of_the_quantized_stages_in_one_process(swarm) -> None:
    files = ModelStore(StoreConfig(cache_dir=str(swarm["tmp"] / "ref-cache"))).resolve(str(swarm["model_dir"]))
    config = files.load_config()
    source = open_checkpoint(files, config, torch.bfloat16)
    stage = load_stage(source, config, 0, 6, dtype=torch.bfloat16, quantize=swarm["mode"])
    source.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each peer runs
    try:
        expected = [list(LocalPipeline([stage]).generate(f"p{i}", p, MAX_TOKENS)) for i, p in enumerate(PROMPTS)]
    finally:
        torch.set_num_threads(threads)
    entry = swarm["status"]["layer_map"]["stages"][1]["url"]
    assert [greedy_ids(entry, p) for p in PROMPTS] == expected


def test_a_peer_without_the_same_quantize_setting_is_refused(swarm) -> None:
    first = swarm["peers"][0]
    tmp = swarm["tmp"]
    args = ["--config", str(tmp / "config.yaml"), "--port", "0", "--max-memory-mb", "900", "--state-dir",
            str(tmp / "plain"), "--swarm-key-file", str(tmp / "swarm.key"), "--no-mdns", "--join",
            str(first.url).removeprefix("http://")]  # fmt: skip
    plain = PeerProcess("plain", args, tmp).start()
    try:
        plain.wait_url()
        wait_for(lambda: "--quantize must be the same on every peer" in first.log(), 60,
                 "the quantizing peers to refuse the plain one", lambda: first.log()[-2000:])  # fmt: skip
        status = first.status(timeout_s=10)
        assert status is not None and len(status["layer_map"]["stages"]) == 3
        assert all(s["url"] != plain.url for s in status["layer_map"]["stages"])
    finally:
        plain.stop()
