"""Next-token sampling: greedy, temperature, top-k and top-p, with a seed; OpenAI's presence and
frequency penalties and logit bias; and the log-probabilities a client may ask for (the chosen
token's, the most likely alternatives', the prompt's). The token drawn at step n depends only on
(seed, n, logits, the tokens generated before it): each draw uses its own generator seeded from
(seed, n, row), so a step replayed after a failure draws exactly the same token. Works on float32
CPU copies of the logits, so the same seed draws the same token on any device. Log-probabilities
are always the model's own (log_softmax of the logits), before temperature, filters, penalties or
bias change the draw, as vLLM reports them by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peer.errors import InvalidInput

MASK64 = (1 << 64) - 1
MAX_TOP_LOGPROBS = 20  # alternatives per token at most: OpenAI's limit for chat's top_logprobs
MAX_LOGIT_BIAS = 300  # biased tokens at most: OpenAI's limit
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100], as OpenAI's
MAX_GRAMMAR_CHARS = 64 * 1024  # a grammar's text at most (a JSON schema, a list of tools)
# The most likely tokens at one position and their log-probabilities, best first: ((id, logprob), ...)
TopLogprobs = tuple[tuple[int, float], ...]


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
    # How many of the most likely tokens to report, with their log-probabilities, beside each
    # chosen token (0 to MAX_TOP_LOGPROBS).
    top_logprobs: int = 0
    # Report the log-probability of each token of the session's first step after the first (the
    # prompt's, for OpenAI's `echo`), with as many alternatives as top_logprobs.
    prompt_logprobs: bool = False
    # OpenAI's penalties: a token's logit loses presence_penalty once it has been generated, and
    # frequency_penalty for each time it has been (in [-2, 2]; the prompt's tokens do not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Added to the logits of these tokens before the draw: ((token id, bias in [-100, 100]), ...).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Constrained decoding: an llguidance grammar the output must follow (`peer.grammar`); "" for none.
    grammar: str = ""

    def __post_init__(self) -> None:
        kinds: dict[str, tuple[type, ...]] = {
            "temperature": (int, float),
            "top_k": (int,),
            "top_p": (int, float),
            "seed": (int,),
            "top_logprobs": (int,),
            "prompt_logprobs": (bool,),
            "presence_penalty": (int, float),
            "frequency_penalty": (int, float),
            "grammar": (str,),
        }
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if isinstance(value, bool) != (allowed == (bool,)) or not isinstance(value, allowed):
                what = "true or false" if allowed == (bool,) else "a number"
                raise InvalidInput(f"{name} must be {what}, not {type(value).__name__}")
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise InvalidInput(f"temperature must be in [0, 100], not {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, not {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInput(f"top_p must be in (0, 1], not {self.top_p}")
        if not (-(1 << 63) <= self.seed < (1 << 64)):
            raise InvalidInput(f"seed must fit in 64 bits, not {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidInput(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.top_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:  # also refuses NaN
                raise InvalidInput(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], not {getattr(self, name)}")
        bias = self.logit_bias
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
            raise InvalidInput(f"logit_bias must be a tuple of at most {MAX_LOGIT_BIAS} (token, bias) pairs")
        for pair in bias:
            if not (isinstance(pair, tuple) and len(pair) == 2 and type(pair[0]) is int and 0 <= pair[0] < 1 << 31
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)
                    and -MAX_BIAS <= pair[1] <= MAX_BIAS):  # fmt: skip
                raise InvalidInput(f"logit_bias maps token ids to biases in [-{MAX_BIAS:g}, {MAX_BIAS:g}]: {pair!r}")
        if len({token for token, _ in bias}) != len(bias):
            raise InvalidInput("logit_bias names a token twice")
        if len(self.grammar) > MAX_GRAMMAR_CHARS:
            raise InvalidInput(f"a grammar has at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def greedy(self) -> bool:
        """True when sampling is deterministic argmax."""
        return self.temperature == 0.0

    @property
    def adjusts(self) -> bool:
        """True when penalties or a bias change the logits before the draw."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def needs_ids(self) -> bool:
        """True when the last stage needs the session's token ids: to score its prompt, for the
        penalties, or to replay a grammar after a failover."""
        return self.prompt_logprobs or self.adjusts or bool(self.grammar)


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


def adjusted(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int] = ()) -> torch.Tensor:
    """Logits [B, V] with OpenAI's penalties and bias applied (its formula: mu[j] - c[j] * frequency -
    (c[j] > 0) * presence + bias[j], c[j] counting token j among the tokens generated so far; see
    platform.openai.com/docs/advanced-usage, "Frequency and presence penalties"). Ids beyond the
    vocabulary are ignored."""
    if not params.adjusts:
        return logits
    vocab = logits.shape[-1]
    out = logits.clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(generated), dtype=torch.int64), minlength=vocab)[:vocab]
        penalty = counts.to(out.dtype) * params.frequency_penalty + (counts > 0).to(out.dtype) * params.presence_penalty
        out -= penalty.to(out.device)
    kept = [(token, bias) for token, bias in params.logit_bias if token < vocab]
    if kept:
        ids = torch.tensor([t for t, _ in kept], dtype=torch.int64, device=out.device)
        out[:, ids] += torch.tensor([b for _, b in kept], dtype=out.dtype, device=out.device)
    return out


def sample(
    logits: torch.Tensor, params: SamplingParams, step: int, generated: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of logits [B, V] for step `step`; return (tokens [B], logprobs [B]).
    `generated`: the tokens generated so far, for the penalties.

    logprobs are the model's log-probabilities of the chosen tokens (before temperature, filtering,
    penalties and bias).
    """
    return sample_many([logits], [params], [step], [generated])[0]


def sample_many(
    logits: Sequence[torch.Tensor],
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    generated: Sequence[Sequence[int]] | None = None,
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`sample` for several sessions' logits ([B_i, V] each) at once: the plain greedy ones (no
    penalty, bias or grammar) share one argmax and one log_softmax over all their rows, which gives
    each row what it alone would get (row-wise reductions). `allowed`: per session, None or the
    tokens its grammar allows (bool [V], at least one), the only ones it may draw. Returns (tokens
    [B_i], logprobs [B_i]) per session, in order."""
    for x in logits:
        if x.dim() != 2:
            raise InvalidInput(f"logits must be [B, V], got shape {tuple(x.shape)}")
    histories: Sequence[Sequence[int]] = generated if generated is not None else [()] * len(logits)
    masks: Sequence[torch.Tensor | None] = allowed if allowed is not None else [None] * len(logits)
    picked: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(logits)
    greedy = [i for i, p in enumerate(params) if p.greedy and not p.adjusts and masks[i] is None]
    if greedy:
        rows = joined([logits[i] for i in greedy]).detach().to("cpu", torch.float32)
        tokens = argmax(rows)
        logprobs = _logprobs(rows, tokens)
        at = 0
        for i in greedy:
            n = logits[i].shape[0]
            picked[i] = tokens[at : at + n], logprobs[at : at + n]
            at += n
    for i, (x, p, step, history, mask) in enumerate(zip(logits, params, steps, histories, masks, strict=True)):
        if picked[i] is not None:
            continue
        x = x.detach().to("cpu", torch.float32)
        shaped = adjusted(x, p, history)
        if mask is not None:  # the grammar's: everything else can never be drawn
            shaped = shaped.masked_fill(~mask[: shaped.shape[-1]], float("-inf"))
        if p.greedy:
            tokens = argmax(shaped)
        else:
            probs = torch.softmax(filter_logits(shaped, p), dim=-1)
            draws = []
            for row in range(probs.shape[0]):
                g = torch.Generator().manual_seed(draw_seed(p.seed, step, row))
                draws.append(torch.multinomial(probs[row], 1, generator=g))
            tokens = torch.cat(draws)
        picked[i] = tokens, _logprobs(x, tokens)
    done = [p for p in picked if p is not None]
    assert len(done) == len(logits), "every session is greedy or drawn"
    return done


def top_logprobs(logits: torch.Tensor, n: int) -> tuple[TopLogprobs, ...]:
    """The `n` most likely tokens of each row of logits [B, V] and their log-probabilities, best
    first (equal ones in id order): one TopLogprobs per row; empty ones when n is 0."""
    if n <= 0:
        return ((),) * logits.shape[0]
    return _top(torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1), n)


def _top(logprobs: torch.Tensor, n: int) -> tuple[TopLogprobs, ...]:
    """The `n` largest of each row of log-probabilities [B, V], with their ids, best first."""
    if n <= 0:
        return ((),) * logprobs.shape[0]
    values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]), dim=-1, sorted=True)
    return tuple(tuple(zip(row_ids, row_values, strict=True)) for row_ids, row_values in
                 zip(ids.tolist(), values.tolist(), strict=True))  # fmt: skip


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], n: int) -> tuple[tuple[float, TopLogprobs], ...]:
    """Log-probabilities of a step's own input tokens: logits [T, V] at positions p..p+T-1 score the
    tokens `ids` [T] at positions p+1..p+T, the last of which is not yet known; so for ids[1:] ([T-1])
    each token's log-probability given the ones before it, and the `n` most likely tokens there."""
    if logits.dim() != 2 or len(ids) != logits.shape[0]:
        raise InvalidInput(f"prompt logprobs take logits [T, V] and T ids, not {tuple(logits.shape)} and {len(ids)}")
    return score_next(logits[:-1], ids[1:], n) if len(ids) >= 2 else ()


def score_next(logits: torch.Tensor, targets: Sequence[int], n: int) -> tuple[tuple[float, TopLogprobs], ...]:
    """For each row of logits [K, V], the log-probability of the token that came next there
    (`targets` [K]) and the `n` most likely tokens: a chunk of `prompt_logprobs`."""
    scores = torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1)  # [K, V]
    chosen = scores.gather(-1, torch.tensor(list(targets), dtype=torch.int64)[:, None])[:, 0].tolist()
    return tuple(zip(chosen, _top(scores, n), strict=True))


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
