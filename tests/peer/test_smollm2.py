"""Real weights: the embedded SmolLM2-135M-Instruct, run as 1, 2, 3 and 30 single-layer stages,
matches transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) in logits and greedy
tokens, and answers the capital-of-France question with Paris."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.checkpoint import open_checkpoint
from peer.pipeline import LocalPipeline, even_split
from peer.shard import load_stage
from peer.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

MAX_NEW = 12
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(smollm2):
    """HF's model from the same GGUF, its greedy logits per step and tokens for the chat prompt."""
    _, files = smollm2
    config = files.load_config()
    tokenizer = Tokenizer.from_dir(files.meta_dir, config)
    prompt = tokenizer.apply_chat([{"role": "user", "content": "What is the capital of France?"}])
    model = AutoModelForCausalLM.from_pretrained(
        str(files.gguf_path.parent), gguf_file=files.gguf_path.name, dtype=torch.float32
    ).eval()
    logits, tokens = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits.append(out.logits[0])
        for _ in range(MAX_NEW):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in tokenizer.eos_token_ids:
                break
            out = model(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[0])
    return config, tokenizer, prompt, logits, tokens


def test_smollm2_stages_match_transformers(smollm2, reference) -> None:
    _, files = smollm2
    config, tokenizer, prompt, ref_logits, ref_tokens = reference
    assert "Paris" in tokenizer.decode(ref_tokens)
    source = open_checkpoint(files, config)
    try:
        for count in (1, 2, 3, config.num_hidden_layers):
            stages = [load_stage(source, config, a, b) for a, b in even_split(config.num_hidden_layers, count)]
            pipe = LocalPipeline(stages)
            pipe.open("chat", len(prompt) + MAX_NEW)
            result = pipe.step("chat", torch.tensor([prompt]), 0, all_logits=True)
            start, tokens = len(prompt), []
            for step, expected in enumerate(ref_logits):
                diff = (result.logits[0] - expected).abs().max()
                assert diff <= ATOL, f"{count} stages, step {step}: logits differ by {diff:.2e}"
                token = int(result.tokens[0])
                tokens.append(token)
                if step + 1 < len(ref_logits):
                    result = pipe.step("chat", torch.tensor([[token]]), start, all_logits=True)
                    start += 1
            assert tokens == ref_tokens, f"{count} stages"
            assert "Paris" in tokenizer.decode(tokens)
    finally:
        source.close()
