"""Next-token sampling: greedy, temperature, top-k and top-p, with a seed. The token drawn at step n
depends only on (seed, n, logits): each draw uses its own generator seeded from (seed, n, row), so a
step replayed after a failure draws exactly the same token. Works on float32 CPU copies of the
logits, so the same seed draws the same token on any device."""

from __future__ import annotations

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
    if logits.dim() != 2:
        raise InvalidInput(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    logits = logits.detach().to("cpu", torch.float32)
    if params.greedy:
        tokens = torch.argmax(logits, dim=-1)
    else:
        probs = torch.softmax(filter_logits(logits, params), dim=-1)
        rows = []
        for row in range(probs.shape[0]):
            g = torch.Generator().manual_seed(draw_seed(params.seed, step, row))
            rows.append(torch.multinomial(probs[row], 1, generator=g))
        tokens = torch.cat(rows)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs
