"""Real weights: the embedded SmolLM2-135M-Instruct, run as 1, 2, 3 and 30 single-layer stages,
matches transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) in logits and greedy
tokens, and answers the capital-of-France question with Paris."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.checkpoint import open_checkpoint
from peer.pipeline import LocalPipeline, even_split
from peer.profile import ModelProfile
from peer.shard import load_stage
from peer.tokenizer import Tokenizer
from tests.helpers import RecordingSource, expected_reads

pytestmark = pytest.mark.real_model

MAX_NEW = 12
# Logits reach about 30 here; the stages' large projections run through oneDNN and transformers'
# through the default BLAS, whose sums differ in order, and the differences add up over 30 layers
# (5e-4 is about 1.7e-5 of the largest logit).
ATOL = 5e-4


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


def test_gguf_stage_reads_only_its_tensors(smollm2) -> None:
    _, files = smollm2
    config = files.load_config()
    source = RecordingSource(open_checkpoint(files, config))
    try:
        for start, end in ((0, 2), (10, 12), (28, 30)):
            source.reads.clear()
            stage = load_stage(source, config, start, end)
            assert set(source.reads) == expected_reads(start, end, layers=30, tied=True)
            held = sum(p.numel() * p.element_size() for p in stage.parameters())
            assert held == ModelProfile.from_config(config).stage_weight_bytes(start, end)
    finally:
        source.close()


def test_tokenizer_and_chat_template(smollm2) -> None:
    _, files = smollm2
    tokenizer = Tokenizer.from_dir(files.meta_dir, files.load_config())
    assert tokenizer.has_chat_template
    ids = tokenizer.apply_chat([{"role": "user", "content": "Hi"}])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.hf.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids
    sample = "Café ☕ in 東京, naïve résumé — ok"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    # Streaming token by token reproduces the text exactly, multi-byte characters included.
    stream = tokenizer.stream()
    pieces = [stream.push(t) for t in tokenizer.encode(sample)]
    assert "".join(pieces) + stream.flush() == sample
    assert all("\ufffd" not in p for p in pieces)


def test_generate_command(smollm2, tmp_path) -> None:
    """The README's run command, in a subprocess, against the session's model cache."""
    import subprocess
    import sys

    store, _ = smollm2
    cmd = [
        sys.executable,
        "-m",
        "peer.generate",
        "--stages",
        "3",
        "--prompt",
        "The future of AI is",
        "--max-tokens",
        "12",
        "--cache-dir",
        str(store.cache_dir),
        "--threads",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("The future of AI is") and len(lines[0]) > len("The future of AI is") + 20
    assert sum(1 for line in lines if line.strip().startswith(("0 ", "1 ", "2 "))) == 3
    assert "time to first token" in done.stdout

    bad = subprocess.run([*cmd[:-4], "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "does not exist" in bad.stderr
