"""Every architecture in `peer.architectures` runs as stages that compute what its whole Hugging
Face model computes: tiny random checkpoints written with save_pretrained, split into 1, 2, 3 and L
single-layer stages, give logits within 1e-4 (float32) and the same greedy tokens; sessions in one
pass get what they get alone; the memory profile counts exactly the parameters transformers builds;
an unsupported architecture, or an unsupported part of one, is refused by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peer.architectures import ARCHITECTURES, architecture_of
from peer.checkpoint import check_readable, open_checkpoint
from peer.config import StoreConfig
from peer.errors import UnsupportedModel
from peer.executor import StageExecutor, StepRequest, StepResult
from peer.model_store import ModelStore
from peer.pipeline import LocalPipeline, even_split, load_stages
from peer.profile import ModelProfile
from tests.peer.test_exactness import STEPS, assert_same_run, hf_reference, pipeline_run

LAYERS = 4


def tiny_config(model_type: str, **extra):
    """A small random config of `model_type`, wide enough that greedy tokens are far from ties."""
    shape = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "initializer_range": 0.15,
    }
    return AutoConfig.for_model(model_type, **{**shape, **extra})


def randomised(model):
    """`model` with every norm weight and bias drawn too (they start at one and zero), so that a norm
    applied in the wrong place, or a bias left out, shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint of each supported architecture, saved with save_pretrained."""
    config = tiny_config(request.param, **({"sliding_window": None} if request.param == "mistral" else {}))
    torch.manual_seed(0)
    model = randomised(AutoModelForCausalLM.from_config(config))
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    return path


def stages_of(path: Path, tmp_path: Path, ranges):
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(path))
    return load_stages(files, files.load_config(), ranges)


@pytest.mark.parametrize("split", ["1", "2", "3", "every layer"])
def test_stages_match_hugging_face(checkpoint: Path, tmp_path: Path, split: str) -> None:
    reference_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])
    reference = hf_reference(reference_model, prompt, STEPS)
    ranges = even_split(LAYERS, LAYERS if split == "every layer" else int(split))
    ours = pipeline_run(LocalPipeline(stages_of(checkpoint, tmp_path, ranges)), prompt, STEPS)
    assert_same_run(ours, reference)


def test_sessions_in_one_pass_get_what_each_gets_alone(checkpoint: Path, tmp_path: Path) -> None:
    (stage,) = stages_of(checkpoint, tmp_path, [(0, LAYERS)])
    prompts = {"a": [5, 6, 7], "b": [9, 1, 2, 3, 4, 8], "c": [11]}

    def run(together: bool) -> dict[str, StepResult]:
        ex = StageExecutor(stage)
        results: dict[str, StepResult] = {}
        for sid, ids in prompts.items():
            ex.open_session(sid, 16)
            results[sid] = ex.step(sid, torch.tensor([ids]), torch.arange(len(ids)))
        requests = [
            StepRequest(sid, result.tokens[:, None], torch.tensor([len(prompts[sid])]))  # type: ignore[index]
            for sid, result in results.items()
        ]
        outcomes = ex.step_many(requests, all_logits=True) if together else [
            ex.step(r.session_id, r.inputs, r.positions, all_logits=True) for r in requests
        ]  # fmt: skip
        return {r.session_id: o for r, o in zip(requests, outcomes, strict=True)}  # type: ignore[misc]

    alone, together = run(False), run(True)
    for sid in prompts:
        assert torch.equal(alone[sid].tokens, together[sid].tokens), sid
        assert torch.allclose(alone[sid].logits, together[sid].logits, atol=1e-5, rtol=0), sid


@pytest.mark.parametrize(
    "extra",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True}, {"mlp_bias": True}, {"head_dim": 32}],
    ids=lambda e: ",".join(e) or "plain",
)
def test_the_profile_counts_what_transformers_builds(checkpoint: Path, extra: dict) -> None:
    """Also for keys some architectures ignore (mistral's attention_bias, the Qwens' mlp_bias)."""
    config = AutoConfig.from_pretrained(checkpoint)
    for key, value in extra.items():
        setattr(config, key, value)
    profile = ModelProfile.from_config(config, torch.bfloat16)
    model = AutoModelForCausalLM.from_config(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert profile.layer_bytes == layer * 2
    assert profile.total_weight_bytes == sum(p.numel() for p in model.parameters()) * 2


def test_an_unsupported_architecture_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModel, match=r"'gpt2' is not supported; supported: llama .*mistral .*qwen2 .*qwen3"):
        architecture_of(AutoConfig.for_model("gpt2"))
    mistral = tiny_config("mistral", sliding_window=16)
    with pytest.raises(UnsupportedModel, match="mistral: sliding-window attention"):
        ModelProfile.from_config(mistral)
    sliding = tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        architecture_of(sliding)
    # Windows that no layer uses, or that no sequence reaches, are no windows.
    for config in (
        tiny_config("qwen2", sliding_window=16),  # use_sliding_window false, as Qwen2.5 ships
        tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=LAYERS),
        tiny_config("mistral", sliding_window=128),  # max_position_embeddings
    ):
        assert architecture_of(config).model_type == config.model_type
    gguf, safetensors = SimpleNamespace(format="gguf"), SimpleNamespace(format="safetensors")
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen3 models are not read yet"):
        open_checkpoint(gguf, tiny_config("qwen3"))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen2 models"):
        check_readable(gguf, tiny_config("qwen2"))  # type: ignore[arg-type]  # what a peer checks at start
    check_readable(gguf, tiny_config("llama"))  # type: ignore[arg-type]
    check_readable(safetensors, tiny_config("qwen3"))  # type: ignore[arg-type]
