"""Every architecture in `peer.architectures` runs as stages that compute what its whole Hugging
Face model computes: tiny random checkpoints written with save_pretrained, split into 1, 2, 3 and L
single-layer stages, give logits within 1e-4 (float32) and the same greedy tokens, also with a
prefill in chunks and a replayed step; sessions in one pass get what they get alone; the memory
profile counts exactly the parameters transformers builds; an unsupported architecture, or an
unsupported part of one, is refused by name. Sliding windows are a few positions wide, so prompts
and decodes run past them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peer.architectures import ARCHITECTURES, architecture_of
from peer.checkpoint import GGUFSource, check_readable, open_checkpoint
from peer.config import StoreConfig
from peer.errors import UnsupportedModel
from peer.executor import StageExecutor, StepRequest, StepResult
from peer.model_store import ModelStore, complete_gguf_config
from peer.pipeline import LocalPipeline, even_split, load_stages
from peer.profile import ModelProfile
from peer.shard import load_stage
from peer.stage import attention_mask
from tests.peer.test_exactness import STEPS, assert_same_run, hf_reference, pipeline_run

LAYERS = 4
# Per architecture, what its tiny checkpoint sets beyond `tiny_config`'s shape: the parts that set
# it apart in use, windows short enough that a 7-token prompt and 8 steps run past them.
VARIANTS = {
    "llama": {},
    "mistral": {"sliding_window": 3},
    "qwen2": {},  # Qwen2.5 ships without sliding windows
    "qwen3": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},  # layers 2, 3 slide
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True},
    "phi3": {"sliding_window": 5, "partial_rotary_factor": 0.5, "pad_token_id": 0},  # rotates half of each head
    "gemma3_text": {
        "sliding_window_pattern": 3,  # layers 0, 1 slide, 2 is global, 3 slides (and 4 slides, 5 is global)
        "sliding_window": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,  # attention scaled by 24 ** -0.5, not head_dim ** -0.5
        "rope_parameters": {  # global layers: another base, and a scaled RoPE
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "final_logit_softcapping": 5.0,
        "tie_word_embeddings": True,
    },
}


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
    config = tiny_config(request.param, **VARIANTS[request.param])
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


def test_chunked_prefill_and_replay_match_hugging_face(checkpoint: Path, tmp_path: Path) -> None:
    """A prefill in two chunks (the second one past the windows) and a decode step replayed after a
    rewind give Hugging Face's logits."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 64, 31]])
    ref_logits, ref_tokens = hf_reference(model, prompt, 3)
    pipe = LocalPipeline(stages_of(checkpoint, tmp_path, even_split(LAYERS, 2)))
    pipe.open("s", 16)
    pipe.step("s", prompt[:, :2], 0)
    result = pipe.step("s", prompt[:, 2:], 2, all_logits=True)
    assert torch.allclose(result.logits[0], ref_logits[0][2:], atol=1e-4, rtol=0)
    first = torch.tensor([[ref_tokens[0]]])
    pipe.step("s", first, 9)
    again = pipe.step("s", first, 9, all_logits=True)  # replayed, as after a lost reply: overwrites
    assert torch.allclose(again.logits[0], ref_logits[1], atol=1e-4, rtol=0)
    assert int(again.tokens[0]) == ref_tokens[1]
    pipe.close("s")


def past_the_windows(checkpoint: Path, tmp_path: Path, steps: int):
    """An 11-token prompt (longer than every tiny window), Hugging Face's logits and greedy tokens for
    it and `steps` decode steps, and a 2-stage pipeline with session "s" open for 32 positions."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 64, 31, 12, 200]])
    pipe = LocalPipeline(stages_of(checkpoint, tmp_path, even_split(LAYERS, 2)))
    pipe.open("s", 32)
    return prompt, hf_reference(model, prompt, steps), pipe


def test_a_prefill_in_chunks_past_a_wrapped_window_matches_hugging_face(checkpoint: Path, tmp_path: Path) -> None:
    """Chunks of two positions: each chunk after the first window starts inside a ring that has
    wrapped, so its earlier keys come back out of order in the buffer and must be put in order."""
    prompt, (ref_logits, ref_tokens), pipe = past_the_windows(checkpoint, tmp_path, 4)
    n = prompt.shape[1]
    for start in range(0, n, 2):
        result = pipe.step("s", prompt[:, start : start + 2], start, all_logits=True)
        assert torch.allclose(result.logits[0], ref_logits[0][start : start + 2], atol=1e-4, rtol=0), start
    tokens = [int(result.tokens[0])]
    for i in range(3):  # decode steps past the windows
        result = pipe.step("s", torch.tensor([[tokens[-1]]]), n + i, all_logits=True)
        assert torch.allclose(result.logits[0, 0], ref_logits[i + 1][0], atol=1e-4, rtol=0), i
        tokens.append(int(result.tokens[0]))
    assert tokens == ref_tokens
    pipe.close("s")


def test_sliding_layers_hold_only_their_window(checkpoint: Path, tmp_path: Path) -> None:
    """A session four times as long as the windows: a sliding layer's KV cache stops growing at its
    window, what it holds is what the profile (and so the executor's reservation) counts, and a
    step can no longer rewind past the window: refused by name, leaving the session as it was."""
    from peer.errors import PositionError

    (stage,) = stages_of(checkpoint, tmp_path, [(0, LAYERS)])
    config = AutoConfig.from_pretrained(checkpoint)
    profile = ModelProfile.from_config(config)
    windows = [w for w in stage.windows if w is not None]
    assert list(profile.layer_windows or (None,) * LAYERS) == stage.windows
    ex = StageExecutor(stage)
    length = 4 * max(windows, default=4)
    ex.open_session("s", length)
    ex.step("s", torch.arange(1, 7)[None], torch.arange(6))
    for p in range(6, length):
        ex.step("s", torch.tensor([[p % 200 + 1]]), torch.tensor([p]))
    cache = ex._sessions["s"].cache
    per_token = profile.kv_bytes_per_token_per_layer
    assert cache.nbytes == profile.kv_bytes(0, LAYERS, length) == ex.reserved_bytes
    assert cache.nbytes == per_token * sum(min(length, w or length) for w in stage.windows)
    if not windows:
        return
    assert cache.nbytes < profile.kv_bytes_per_token_per_layer * LAYERS * length
    with pytest.raises(PositionError, match=f"no earlier than {length - 1}"):
        ex.step("s", torch.tensor([[1]]), torch.tensor([length - 2]))
    assert ex.session_length("s") == length
    ex.step("s", torch.tensor([[1]]), torch.tensor([length - 1]))  # the last step again is fine


def test_a_restart_past_the_windows_is_refused_by_every_stage(checkpoint: Path, tmp_path: Path) -> None:
    """Split so that a stage may have no sliding layer of its own (Qwen3's first two layers): the
    restart is refused before any stage moves, and the session goes on as if it had not been tried."""
    from peer.errors import PositionError

    prompt, (ref_logits, ref_tokens), pipe = past_the_windows(checkpoint, tmp_path, 2)
    n = prompt.shape[1]
    pipe.step("s", prompt, 0)
    windowed = any(w is not None for ex in pipe.executors for w in ex.stage.windows)
    if windowed:
        with pytest.raises(PositionError, match=f"no earlier than {n - 1}"):
            pipe.step("s", prompt[:, n - 3 :], n - 3)
    else:  # no window: any restart is served
        pipe.step("s", prompt[:, n - 3 :], n - 3)
    assert [ex.session_length("s") for ex in pipe.executors] == [n] * len(pipe.executors)
    result = pipe.step("s", torch.tensor([[ref_tokens[0]]]), n, all_logits=True)
    assert torch.allclose(result.logits[0, 0], ref_logits[1][0], atol=1e-4, rtol=0)
    pipe.close("s")


def test_a_pass_that_fails_midway_leaves_a_cache_that_serves_what_it_claims(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that raises after some layers wrote a step past the windows (out of memory, say): the
    session keeps the positions before the step where no ring slot of theirs was overwritten, and
    none where one may have been, and what it keeps gives Hugging Face's logits again."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 64]])
    with torch.no_grad():
        want = model(prompt).logits[0]  # [T, V]
    (stage,) = stages_of(checkpoint, tmp_path, [(0, LAYERS)])
    ex = StageExecutor(stage)
    ex.open_session("s", 16)
    ex.step("s", prompt[:, :6], torch.arange(6))

    def out_of_memory(*_: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(stage.layers[LAYERS - 1].input_layernorm, "forward", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        ex.step("s", prompt[:, 6:], torch.arange(6, 8))
    monkeypatch.undo()
    kept = ex.session_length("s")
    assert kept == (0 if any(stage.windows) else 6)
    result = ex.step("s", prompt[:, kept:], torch.arange(kept, 8), all_logits=True)
    assert torch.allclose(result.logits[0], want[kept:], atol=1e-4, rtol=0)


def test_sessions_in_one_pass_get_what_each_gets_alone(checkpoint: Path, tmp_path: Path) -> None:
    (stage,) = stages_of(checkpoint, tmp_path, [(0, LAYERS)])
    prompts = {"a": [5, 6, 7], "b": [9, 1, 2, 3, 4, 8], "c": [11]}  # b runs past the windows

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


# llama.cpp's architecture names (its convert_hf_to_gguf.py writes Mistral as llama).
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
                  "phi3": "phi3", "gemma3_text": "gemma3"}  # fmt: skip


def write_gguf_as_llama_cpp(model, path: Path) -> None:
    """`model` as llama.cpp's converter writes it, float32: its metadata keys and tensor names, Q/K
    rows permuted where it permutes them, norm weights offset where it offsets them."""
    c, layout = model.config, ARCHITECTURES[model.config.model_type].gguf
    w = gguf.GGUFWriter(str(path), LLAMA_CPP_ARCH[c.model_type])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    for add, value in [
        (w.add_block_count, c.num_hidden_layers), (w.add_context_length, c.max_position_embeddings),
        (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
        (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
        (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_vocab_size, c.vocab_size),
        (w.add_key_length, head_dim), (w.add_value_length, head_dim), (w.add_rope_freq_base, rope["rope_theta"]),
    ]:  # fmt: skip
        add(value)
    if c.pad_token_id is not None:
        w.add_pad_token_id(c.pad_token_id)
    # What llama.cpp writes that transformers' GGUF config mapping leaves out (peer.model_store reads it).
    if c.model_type == "phi3":
        w.add_rope_dimension_count(int(head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0)))
    if c.model_type in ("phi3", "gemma3_text") and c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if c.model_type == "gemma3_text" and rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if c.model_type == "qwen3_moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    kinds = {module: kind for kind, module in layout.layer_names.items()}
    ends = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}  # fmt: skip
    for key, tensor in model.state_dict().items():
        t = tensor.float().numpy().copy()
        if key.startswith("model.layers.") and key.split(".", 3)[3] in layout.experts:
            _, _, layer, param = key.split(".", 3)  # [E, rows, K]: split into the kinds it joins
            parts = layout.experts[param]
            for kind, part in zip(parts, np.split(t, len(parts), axis=1), strict=True):
                w.add_tensor(f"blk.{layer}.{kind}.weight", np.ascontiguousarray(part))
            continue
        if key.startswith("model.layers."):
            _, _, layer, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{kinds[module]}.{suffix}"
            if layout.permuted_qk and kinds[module] in ("attn_q", "attn_k") and suffix == "weight":
                heads = c.num_attention_heads if kinds[module] == "attn_q" else c.num_key_value_heads
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        elif key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        else:
            name = ends[key]
        w.add_tensor(name, t + layout.norm_offset if "norm" in name else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_reads_as_transformers_reads_it(checkpoint: Path, tmp_path: Path) -> None:
    """Every tensor of a GGUF written as llama.cpp writes the architecture: bit for bit what
    transformers' own GGUF loader makes of it, and within rounding the original weights. A row
    without a GGUF layout refuses GGUF files."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if architecture_of(model.config).gguf is None:
        with pytest.raises(UnsupportedModel, match=f"GGUF files of {model.config.model_type} models are not read"):
            check_readable(SimpleNamespace(format="gguf"), model.config)  # type: ignore[arg-type]
        return
    write_gguf_as_llama_cpp(model, tmp_path / "m.gguf")
    converted = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    complete_gguf_config(converted, tmp_path / "m.gguf")  # as a peer's conversion does (the experts' width)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=converted,
                                                  dtype=torch.float32).state_dict()  # fmt: skip
    config = model.config
    source = GGUFSource(tmp_path / "m.gguf", architecture_of(config).gguf, config.num_attention_heads,
                        config.num_key_value_heads)  # fmt: skip
    original = model.state_dict()
    assert source.names() == {k for k in original if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    for name in sorted(source.names()):
        ours = source.read(name)
        assert torch.equal(ours, theirs[name]), name
        assert torch.allclose(ours, original[name], atol=1e-6, rtol=0), name
    source.close()


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 5, "pad_token_id": 0}),
        ("gemma3_text", {"num_hidden_layers": 6, "sliding_window": 4, "head_dim": 32, "query_pre_attn_scalar": 32,
                         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        ("qwen3_moe", VARIANTS["qwen3_moe"]),  # the experts' width, normalised routing
    ],
    ids=["phi3", "gemma3_text", "qwen3_moe"],
)  # fmt: skip
def test_a_gguf_config_has_what_llama_cpp_writes_and_transformers_leaves_out(
    model_type: str, extra: dict, tmp_path: Path
) -> None:
    """A GGUF written as llama.cpp writes these models (with what it hard-codes: Gemma 3's sliding
    pattern and local base, its attention scale) runs as the original model once its converted
    config has what transformers' GGUF mapping leaves out: a Phi-3's rotary part and window, a
    Gemma 3's linearly scaled global RoPE, a Qwen3-MoE's expert width and routing."""
    torch.manual_seed(0)
    model = randomised(AutoModelForCausalLM.from_config(tiny_config(model_type, **extra))).eval()
    write_gguf_as_llama_cpp(model, tmp_path / "m.gguf")
    config = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
    complete_gguf_config(config, tmp_path / "m.gguf")
    files = SimpleNamespace(format="gguf", gguf_path=tmp_path / "m.gguf")
    stage = load_stage(open_checkpoint(files, config), config, 0, config.num_hidden_layers)  # type: ignore[arg-type]
    prompt = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 64, 31]])
    assert_same_run(pipeline_run(LocalPipeline([stage]), prompt, 3), hf_reference(model, prompt, 3))


def test_gguf_files_with_what_is_not_read_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("phi3", pad_token_id=0))
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_tensor("rope_factors_long.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="longrope factors"):
        complete_gguf_config(model.config, path)


def test_an_unsupported_architecture_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    supported = r"supported: llama .*mistral .*qwen2 .*qwen3 .*phi3 .*qwen3_moe .*gemma3_text"
    with pytest.raises(UnsupportedModel, match=rf"'gpt2' is not supported; {supported}"):
        architecture_of(AutoConfig.for_model("gpt2"))
    with pytest.raises(UnsupportedModel, match=r"'gemma3' is not supported \(for Gemma 3, give its text model"):
        architecture_of(AutoConfig.for_model("gemma3"))  # the multimodal model
    for part, config in {
        "attention logit soft-capping": tiny_config("gemma3_text", attn_logit_softcapping=50.0),
        "bidirectional attention": tiny_config("gemma3_text", use_bidirectional_attention=True),
        "pretraining_tp": tiny_config("llama", pretraining_tp=2),
        "dense layers among the expert layers": tiny_config("qwen3_moe", **VARIANTS["qwen3_moe"], mlp_only_layers=[1]),
    }.items():
        with pytest.raises(UnsupportedModel, match=part):
            ModelProfile.from_config(config)
    # A row without a GGUF layout refuses GGUF files at start, and at opening.
    monkeypatch.setitem(ARCHITECTURES, "qwen3", dataclasses.replace(ARCHITECTURES["qwen3"], gguf=None))
    gguf, safetensors = SimpleNamespace(format="gguf"), SimpleNamespace(format="safetensors")
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen3 models are not read yet"):
        open_checkpoint(gguf, tiny_config("qwen3"))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModel, match="GGUF files of qwen3 models"):
        check_readable(gguf, tiny_config("qwen3"))  # type: ignore[arg-type]  # what a peer checks at start
    check_readable(gguf, tiny_config("qwen2"))  # type: ignore[arg-type]
    check_readable(safetensors, tiny_config("qwen3"))  # type: ignore[arg-type]


def test_attention_windows_count_as_transformers_does() -> None:
    """Keys at a distance under the window from their query; none cut off before the window fills."""
    cpu = torch.device("cpu")
    assert attention_mask(0, 4, 4, cpu) == (0, None)  # SDPA's causal rule: the window is not reached
    assert attention_mask(9, 1, 4, cpu) == (6, None)  # decode: positions 6..9
    first, mask = attention_mask(5, 3, 4, cpu)  # queries 5, 6, 7
    assert first == 2 and mask is not None
    assert mask[0, 0].tolist() == [
        [True, True, True, True, False, False],  # query 5: keys 2..5
        [False, True, True, True, True, False],
        [False, False, True, True, True, True],
    ]
