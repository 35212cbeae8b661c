"""A model split into stages computes what the whole Hugging Face model computes: logits within
1e-4 (float32) at prefill and at every decode step, and the same greedy tokens, for 1, 2, 3 and L
single-layer stages, on tiny random Llama checkpoints of several shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.config import StoreConfig
from peer.model_store import ModelStore
from peer.pipeline import LocalPipeline, even_split, load_stages

STEPS = 8
ATOL = 1e-4

SHAPES = {
    "gqa-untied": {"kv_heads": 2, "tied": False},
    "mha-untied": {"kv_heads": 4, "tied": False},
    "gqa-tied": {"kv_heads": 2, "tied": True},
    "mha-tied": {"kv_heads": 4, "tied": True},
}


def hf_reference(model, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill ([T, V]) and of each greedy decode step ([1, V]), and the greedy tokens."""
    logits, tokens = [], []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits.append(out.logits[0])
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[0])
    return logits, tokens


def pipeline_run(pipe: LocalPipeline, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """The same through a chain of stages, with the executor's own greedy sampling."""
    logits, tokens = [], []
    pipe.open("s", prompt.shape[1] + steps + 1)
    result = pipe.step("s", prompt, 0, all_logits=True)
    start = prompt.shape[1]
    logits.append(result.logits[0])
    for _ in range(steps):
        token = int(result.tokens[0])
        tokens.append(token)
        result = pipe.step("s", torch.tensor([[token]]), start, all_logits=True)
        start += 1
        logits.append(result.logits[0])
    pipe.close("s")
    return logits, tokens


def assert_same_run(ours, reference) -> None:
    (our_logits, our_tokens), (ref_logits, ref_tokens) = ours, reference
    assert our_tokens == ref_tokens
    for step, (a, b) in enumerate(zip(our_logits, ref_logits, strict=True)):
        assert a.shape == b.shape, f"step {step}"
        assert torch.allclose(a, b, atol=ATOL, rtol=0), f"step {step}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_stages_match_hugging_face(tiny_llama, tmp_path: Path, shape: str) -> None:
    path = tiny_llama(layers=5, **SHAPES[shape])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    reference = hf_reference(model, prompt, STEPS)
    # The reference loop is HF's own greedy generation.
    generated = model.generate(prompt, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    assert generated[0, prompt.shape[1] :].tolist() == reference[1]

    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(path))
    config = files.load_config()
    layers = config.num_hidden_layers
    for count in (1, 2, 3, layers):
        pipe = LocalPipeline(load_stages(files, config, even_split(layers, count)))
        assert_same_run(pipeline_run(pipe, prompt, STEPS), reference)
        # The serving path (last-position logits only, sampling in the last stage) gives HF's tokens too.
        assert list(pipe.generate("g", prompt[0].tolist(), STEPS)) == reference[1]


def test_chunked_prefill_and_replay_match(tiny_llama, tmp_path: Path) -> None:
    """Prefill in two chunks, and a decode step replayed after a rewind, give the reference logits."""
    path = tiny_llama(layers=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_tokens = hf_reference(model, prompt, 3)

    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(path))
    pipe = LocalPipeline(load_stages(files, files.load_config(), even_split(4, 2)))
    pipe.open("s", 16)
    pipe.step("s", prompt[:, :5], 0)
    result = pipe.step("s", prompt[:, 5:], 5, all_logits=True)
    assert torch.allclose(result.logits[0], ref_logits[0][5:], atol=ATOL, rtol=0)
    first = torch.tensor([[ref_tokens[0]]])
    pipe.step("s", first, 9)
    # Replaying position 9 (as after a lost reply) must overwrite, not append.
    again = pipe.step("s", first, 9, all_logits=True)
    assert torch.allclose(again.logits[0], ref_logits[1], atol=ATOL, rtol=0)
    assert int(again.tokens[0]) == ref_tokens[1]
    assert pipe.executors[0].session_length("s") == 10
