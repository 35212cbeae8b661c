"""One pipeline stage of a decoder-only model: the decoder layers [start, end), plus the token
embeddings on the first stage and the final norm and LM head on the last. Plain torch.nn around
transformers' own modules and weights for the model's architecture (`peer.architectures`: Llama,
Mistral, Qwen2, Qwen3, Qwen3-MoE, Phi-3, Gemma 3), so a chain of stages computes what the whole
Hugging Face model computes. A forward pass takes the steps of several sessions at once as one
ragged batch: every token of every session is a row of the token-wise work (norms, projections,
MLP), and only attention runs per session, against that session's own KV cache. It knows nothing
of sessions' lifetimes, budgets, files or networks."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peer import quantize
from peer.architectures import architecture_of
from peer.errors import LayerRangeError
from peer.kv_cache import SessionKVCache

# Weights with at least this many elements go through oneDNN's inner product on CPU at float32:
# on the CPUs measured it reads a large weight matrix up to 3x faster than the default BLAS path,
# for one row and for sixteen, while for small matrices its fixed cost per call loses.
ONEDNN_MIN_WEIGHT_ELEMENTS = 3 << 18


@dataclass(frozen=True)
class Step:
    """One session's part of a forward pass; the caller has called cache.begin_step(positions[0, 0], T)."""

    inputs: torch.Tensor  # token ids [B, T] (first stage) or hidden states [B, T, D]
    positions: torch.Tensor  # [B, T]
    cache: SessionKVCache
    # On the last stage: the final hidden states of every position [B, T, D] instead of the last
    # position's logits, for the caller to turn into logits a few positions at a time (`logits`).
    every_position: bool = False


class StageModel(nn.Module):
    """Layers [start, end) of a model; embeddings if start == 0, norm and head if end == L.
    UnsupportedModel for an architecture `peer.architectures` has no row for."""

    def __init__(self, config: Any, start: int, end: int) -> None:
        super().__init__()
        self.architecture = arch = architecture_of(config)
        decoder_layer, rms_norm, rotary = arch.classes()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise LayerRangeError(f"stage range [{start}, {end}) is not inside [0, {config.num_hidden_layers})")
        config = copy.copy(config)
        config._attn_implementation = "sdpa"  # what from_pretrained picks, so the math matches
        self.config = config
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        # layer_idx stays global: the KV cache maps it to the stage's own buffers.
        self.layers = nn.ModuleList(decoder_layer(config, layer_idx=i) for i in range(start, end))
        self.norm = rms_norm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
        with torch.device("cpu"):  # rotary tables and scales are computed, never loaded, even on a meta build
            self.rotary_emb = rotary(config=config)
            # As Gemma3TextScaledWordEmbedding: a float32 scalar, rounded to the weights' dtype when used.
            self._embed_scale = torch.tensor(config.hidden_size**0.5) if arch.scaled_embeddings else None
        # transformers' dynamic_rope_update: these types rescale by the largest position of a call.
        rope_types = self.rotary_emb.rope_type  # one type, or one per layer type
        types = rope_types.values() if isinstance(rope_types, dict) else [rope_types]
        self._rope_per_call = any("dynamic" in str(t) or t == "longrope" for t in types)
        self._rope_keys = [arch.rope_key(config, i) for i in range(start, end)]
        self._rotate = arch.rotation()
        self._windows = [arch.layer_window(config, cast(Any, layer).self_attn) for layer in self.layers]
        self._logit_cap: float | None = getattr(config, "final_logit_softcapping", None)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (a query sees the keys at a distance under it), None for a
        layer that sees the whole past; what `SessionKVCache` bounds its buffers by."""
        return list(self._windows)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the stage's activations: its norms' weights' (quantized weights keep theirs)."""
        return cast(torch.dtype, cast(Any, self.layers[0]).input_layernorm.weight.dtype)

    def checkpoint_names(self) -> dict[str, str]:
        """This module's parameter names -> the Hugging Face checkpoint names they load from."""
        names = {}
        for name, _ in self.named_parameters(remove_duplicate=False):
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                names[name] = f"model.layers.{self.start + int(local)}.{rest}"
            elif name == "lm_head.weight":
                names[name] = "lm_head.weight"
            else:
                names[name] = f"model.{name}"
        return names

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        cache: SessionKVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the stage on one step of one session; see `forward_batch`."""
        return self.forward_batch([Step(inputs, positions, cache)], all_logits)[0]

    def forward_batch(self, steps: Sequence[Step], all_logits: bool = False) -> list[torch.Tensor]:
        """Run the stage on one step of each of several sessions, in one pass.

        Returns per step hidden states [B, T, D], or on the last stage logits [B, V] for the final
        position ([B, T, V] with all_logits), or for a step marked `every_position` its final hidden
        states [B, T, D] (before the norm; `logits` takes them).
        """
        d = self.config.hidden_size
        if self.embed_tokens is not None:
            ids = torch.cat([s.inputs.reshape(-1) for s in steps])
            table = self.embed_tokens.weight
            if quantize.is_quantized(table):
                hidden = quantize.embedding(ids, table, self.compute_dtype)  # [N, D]
            else:
                hidden = self.embed_tokens(ids)  # [N, D]
            if self._embed_scale is not None:
                hidden = hidden * self._embed_scale.to(hidden.dtype)
        else:
            hidden = torch.cat([s.inputs.reshape(-1, d) for s in steps])  # [N, D]
        # [N, head_dim] per rotary table: one row per token, broadcast over heads
        ropes = {key: self._rope(hidden, steps, key) for key in dict.fromkeys(self._rope_keys)}
        spans, at = [], 0
        for s in steps:
            n = s.positions.numel()
            spans.append((at, at + n, *s.positions.shape))
            at += n
        masks = {
            window: [attention_mask(s.cache.length, s.positions.shape[1], window, hidden.device) for s in steps]
            for window in dict.fromkeys(self._windows)
        }
        for layer, key, window in zip(self.layers, self._rope_keys, self._windows, strict=True):
            hidden = self._layer(layer, hidden, ropes[key], steps, spans, masks[window])
        if self.norm is None or self.lm_head is None:
            return [hidden[a:b].view(rows, t, d) for a, b, rows, t in spans]
        if all_logits:
            logits = self.logits(hidden)  # [N, V]
            return [logits[a:b].view(rows, t, -1) for a, b, rows, t in spans]
        out: list[torch.Tensor | None] = [
            hidden[a:b].view(rows, t, d) if s.every_position else None
            for s, (a, b, rows, t) in zip(steps, spans, strict=True)
        ]
        # Only the next token's logits are needed: the last position of every row of the other steps.
        last = [(i, span) for i, span in enumerate(spans) if out[i] is None]
        if last:
            if any(t > 1 for _, (*_, t) in last):
                rows_at = torch.cat([torch.arange(a + t - 1, b, t, device=hidden.device) for _, (a, b, _, t) in last])
                hidden = hidden[rows_at]
            elif len(last) < len(spans):
                hidden = hidden[torch.cat([torch.arange(a, b, device=hidden.device) for _, (a, b, _, _) in last])]
            logits = self.logits(hidden)  # [rows of those steps, V]
            for (i, _), part in zip(last, logits.split([rows for _, (_, _, rows, _) in last]), strict=True):
                out[i] = part
        return [x for x in out if x is not None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] of final hidden states [N, D]: norm, LM head, and the config's soft cap if any."""
        assert self.norm is not None and self.lm_head is not None
        logits = linear(self.norm(hidden), self.lm_head)
        if self._logit_cap is not None:  # as Gemma3ForCausalLM (and Gemma 2) cap them
            logits = torch.tanh(logits / self._logit_cap) * self._logit_cap
        return logits

    def _rope(self, hidden: torch.Tensor, steps: Sequence[Step], key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) tables [N, head_dim] of every row of the pass, in row order, for the
        layers whose rotary key (`Architecture.rope_key`) is `key`.

        A fixed RoPE is a function of the position alone, element by element, so one call covers
        every step and gives each row bitwise what a call for its step alone gives. A RoPE that
        rescales with the largest position it is given (dynamic, longrope) gets one call per step.
        """
        extra = () if key is None else (key,)
        if self._rope_per_call and len(steps) > 1:
            tables = [self.rotary_emb(hidden[None, :1], s.positions.reshape(1, -1), *extra) for s in steps]
            cos, sin = (torch.cat([t[i][0] for t in tables]) for i in (0, 1))  # from [1, n, hd] each
            return cos, sin
        positions = torch.cat([s.positions.reshape(-1) for s in steps]) if len(steps) > 1 else steps[0].positions
        cos, sin = self.rotary_emb(hidden[None, :1], positions.reshape(1, -1), *extra)  # [1, N, hd]
        return cos[0], sin[0]

    def _layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        steps: Sequence[Step],
        spans: list[tuple[int, int, int, int]],
        masks: list[tuple[int, torch.Tensor | None]],
    ) -> torch.Tensor:
        """One decoder layer over the ragged batch hidden [N, D]: the arithmetic of transformers'
        decoder layer of this architecture (LlamaDecoderLayer, and the table's differences) with
        SDPA attention, with attention split by session; masks per step as `attention_mask` gives."""
        attn, mlp = cast(Any, layer.self_attn), cast(Any, layer.mlp)
        n, head_dim, arch = hidden.shape[0], attn.head_dim, self.architecture
        x = cast(Any, layer).input_layernorm(hidden)
        if arch.fused_projections:  # [N, (H + 2 H_kv) hd], split as Phi3Attention splits it
            kv = self.config.num_key_value_heads * head_dim
            q, k, v = linear(x, attn.qkv_proj).split([self.config.num_attention_heads * head_dim, kv, kv], dim=-1)
            q, k, v = (y.view(n, -1, head_dim) for y in (q, k, v))
        else:
            q = linear(x, attn.q_proj).view(n, -1, head_dim)  # [N, H, hd]
            k = linear(x, attn.k_proj).view(n, -1, head_dim)  # [N, H_kv, hd]
            v = linear(x, attn.v_proj).view(n, -1, head_dim)
        if arch.qk_norm:  # per head, before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self._rotate(q, k, *rope, unsqueeze_dim=1)
        outputs = []
        decode = [y.view(n, 1, -1, head_dim).transpose(1, 2) for y in (q, k, v)]  # [N, H, 1, hd]: rows of one position
        for step, (a, b, rows, t), (first, mask) in zip(steps, spans, masks, strict=True):
            if t == 1:
                qs, ks, vs = (y[a:b] for y in decode)
            else:  # [B, H, T, hd]
                qs, ks, vs = (y[a:b].view(rows, t, -1, head_dim).transpose(1, 2) for y in (q, k, v))
            # [B, H_kv, past + T - first, hd]: keys [first, past + T) (see SessionKVCache.update); while
            # the pass runs, cache.length is the step's start. A cache built without the windows returns
            # keys from 0: the ones before `first` are out of every query's reach.
            keys, values = step.cache.update(ks, vs, attn.layer_idx)
            if keys.shape[2] > step.cache.length + t - first:
                keys, values = (y.narrow(2, first, y.shape[2] - first) for y in (keys, values))
            outputs.append(attend(qs, keys, values, mask, attn.scaling).transpose(1, 2).reshape(b - a, -1))
        out = linear(torch.cat(outputs) if len(outputs) > 1 else outputs[0], attn.o_proj)
        norms = cast(Any, layer)
        if not arch.sandwich_norms:
            hidden = hidden + out
            return hidden + self._mlp(mlp, norms.post_attention_layernorm(hidden))
        hidden = hidden + norms.post_attention_layernorm(out)
        return hidden + norms.post_feedforward_layernorm(self._mlp(mlp, norms.pre_feedforward_layernorm(hidden)))

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP of normed hidden states x [N, D]: down(act(gate(x)) * up(x)), or a mixture of
        experts' sparse block as transformers runs it (routing is per token)."""
        if self.architecture.experts:
            return cast(torch.Tensor, mlp(x[None])[0])
        if self.architecture.fused_projections:  # gate rows first, as Phi3MLP chunks them
            gate, up = linear(x, mlp.gate_up_proj).chunk(2, dim=-1)
            return linear(up * mlp.activation_fn(gate), mlp.down_proj)
        return linear(mlp.act_fn(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)


def attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA of one step, as transformers' sdpa_attention_forward computes it: queries [B, H, T, hd]
    against the keys and values they may see [B, H_kv, S, hd], which are grouped-query heads when
    H_kv < H; mask [1, 1, T, S] as `attention_mask` gives it, or None (all S keys for one query,
    in any order; causal for several). Returns [B, H, T, hd]."""
    if mask is not None:  # SDPA's fused kernels take grouped heads only without a mask
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    t = queries.shape[2]
    return F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=mask is None and t > 1, scale=scale, enable_gqa=mask is None
    )


def linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """module(x), through oneDNN for large float32 weights on CPU where that is available, and through
    `peer.quantize` for quantized weights."""
    w = module.weight
    if quantize.is_quantized(w):
        return quantize.linear(x, w, module.bias)
    if w.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS and w.dtype == torch.float32 and w.device.type == "cpu" and onednn():
        return torch.ops.mkldnn._linear_pointwise(x, w, module.bias, "none", [], "")
    return F.linear(x, w, module.bias)


@functools.cache
def onednn() -> bool:
    """Whether this torch has oneDNN's CPU inner product and it agrees with F.linear here."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(32, 64, generator=gen)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except RuntimeError:
        return False
    return bool(torch.allclose(got, F.linear(x, w), atol=1e-4))


def attention_mask(past: int, new: int, window: int | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """(first, mask): queries at positions [past, past + new) attend to keys [first, past + new), with
    a boolean mask [1, 1, new, past + new - first] over them in order, or None where SDPA's own
    causal rule (or none, for one query, whose keys may then come in any order) is exact. `window`
    as transformers' sliding_window_overlay counts it: a key at a distance under `window` from its
    query (None: the whole past)."""
    end = past + new
    if window is None or end <= window:
        return 0, causal_mask(past, new, device)
    first = max(0, past - window + 1)  # the earliest key of the first query
    if new == 1:
        return first, None
    query = torch.arange(past, end, device=device)[:, None]
    key = torch.arange(first, end, device=device)[None, :]
    return first, ((key <= query) & (key > query - window))[None, None]


def causal_mask(past: int, new: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [1, 1, new, past + new], or None where SDPA's own causal rule is exact.

    With no past the kernel's is_causal applies; a single new token attends to everything.
    """
    if past == 0 or new == 1:
        return None
    query = torch.arange(new, device=device)[:, None] + past
    key = torch.arange(past + new, device=device)[None, :]
    return (key <= query)[None, None]
