"""Next-token sampling: greedy, temperature, top-k and top-p, with a seed. The token drawn at step n
depends only on (seed, n, logits): each draw uses its own generator seeded from (seed, n, row), so a
step replayed after a failure draws exactly the same token. Works on float32 CPU copies of the
logits, so the same seed draws the same token on any device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peer.errors import InvalidInput

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How a session picks its next token."""

    # 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep only the k most likely tokens; 0 keeps all.
    top_k: int = 0
    # Keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all.
    top_p: float = 1.0
    # Seed of the session's draws; with the step index it fixes every draw.
    seed: int = 0

    def __post_init__(self) -> None:
        kinds: dict[str, tuple[type, ...]] = {
            "temperature": (int, float),
            "top_k": (int,),
            "top_p": (int, float),
            "seed": (int,),
        }
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise InvalidInput(f"{name} must be a number, not {type(value).__name__}")
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise InvalidInput(f"temperature must be in [0, 100], not {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, not {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInput(f"top_p must be in (0, 1], not {self.top_p}")
        if not (-(1 << 63) <= self.seed < (1 << 64)):
            raise InvalidInput(f"seed must fit in 64 bits, not {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when sampling is deterministic argmax."""
        return self.temperature == 0.0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, step: int, row: int = 0) -> int:
    """A well-mixed 63-bit generator seed for one draw."""
    return _splitmix64(_splitmix64(_splitmix64(seed & MASK64) ^ step) ^ row) >> 1


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf. logits: [B, V]."""
    # Shift so the best logit is 0 first: a tiny temperature then gives -inf, never inf - inf.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of logits [B, V] for step `step`; return (tokens [B], logprobs [B]).

    logprobs are the model's log-probabilities of the chosen tokens (before temperature and filtering).
    """
    return sample_many([logits], [params], [step])[0]


def sample_many(
    logits: Sequence[torch.Tensor], params: Sequence[SamplingParams], steps: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`sample` for several sessions' logits ([B_i, V] each) at once: the greedy ones share one
    argmax and one log_softmax over all their rows, which gives each row what it alone would get
    (row-wise reductions). Returns (tokens [B_i], logprobs [B_i]) per session, in order."""
    for x in logits:
        if x.dim() != 2:
            raise InvalidInput(f"logits must be [B, V], got shape {tuple(x.shape)}")
    picked: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(logits)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = joined([logits[i] for i in greedy]).detach().to("cpu", torch.float32)
        tokens = argmax(rows)
        logprobs = _logprobs(rows, tokens)
        at = 0
        for i in greedy:
            n = logits[i].shape[0]
            picked[i] = tokens[at : at + n], logprobs[at : at + n]
            at += n
    for i, (x, p, step) in enumerate(zip(logits, params, steps, strict=True)):
        if p.greedy:
            continue
        x = x.detach().to("cpu", torch.float32)
        probs = torch.softmax(filter_logits(x, p), dim=-1)
        draws = []
        for row in range(probs.shape[0]):
            g = torch.Generator().manual_seed(draw_seed(p.seed, step, row))
            draws.append(torch.multinomial(probs[row], 1, generator=g))
        tokens = torch.cat(draws)
        picked[i] = tokens, _logprobs(x, tokens)
    done = [p for p in picked if p is not None]
    assert len(done) == len(logits), "every session is greedy or drawn"
    return done


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) of 2-D tensors [B_i, V] -> [sum B_i, V], read in place (no copy) where the
    parts are consecutive contiguous rows of one buffer, as the splits of one pass's logits are."""
    first = parts[0]
    if len(parts) == 1:
        return first
    storage, end = first.untyped_storage(), first.storage_offset()
    for part in parts:
        if not (
            part.is_contiguous()
            and part.storage_offset() == end
            and part.shape[1] == first.shape[1]
            and part.dtype == first.dtype
            and not (part.is_neg() or part.is_conj())  # lazy negation or conjugation: cat applies it
            and part.untyped_storage().data_ptr() == storage.data_ptr()
        ):
            return torch.cat(list(parts))
        end += part.numel()
    if end * first.element_size() > storage.nbytes():  # another storage at the same address
        return torch.cat(list(parts))
    return first.as_strided((sum(p.shape[0] for p in parts), first.shape[1]), (first.shape[1], 1))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for float32 CPU logits [B, V] -> int64 [B], by NumPy's: the
    same index (the first of equal maxima, a NaN counting as the largest) at a tenth of the cost,
    because NumPy's is vectorised for float32 and torch's CPU kernel is not (16 rows of 49,152:
    0.05 ms against 0.35-0.65; one row: 0.005 ms against 0.04, torch 2.13, NumPy 2.4, AVX-512).
    InvalidInput for anything else than float32 CPU logits [B, V > 0]."""
    if logits.dim() != 2 or logits.shape[1] == 0 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise InvalidInput(f"argmax takes float32 CPU logits [B, V > 0], not {logits.dtype} {tuple(logits.shape)}")
    return torch.from_numpy(logits.numpy().argmax(axis=-1).astype("int64", copy=False))


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[row, token] for each row [B]. (One fused log_softmax over [B, V] costs
    less on CPU than torch.logsumexp, which builds its intermediates one by one.)"""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
