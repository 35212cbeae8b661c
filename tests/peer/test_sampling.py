"""Sampling: greedy is argmax; temperature, top-k and top-p restrict and reshape the distribution;
the token drawn at step n depends only on (seed, n, logits), so replayed steps draw the same token."""

from __future__ import annotations

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import InvalidInput
from peer.sampling import (
    SamplingParams,
    adjusted,
    argmax,
    filter_logits,
    joined,
    prompt_logprobs,
    sample,
    sample_many,
    top_logprobs,
)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_greedy_is_argmax_and_reports_logprob() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    tokens, logprobs = sample(logits, SamplingParams(), step=0)
    assert tokens.tolist() == [1]
    assert logprobs[0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([-2.0, 0.0, 1.5, float("inf"), float("-inf"), float("nan")]), min_size=1, max_size=9),
        min_size=1,
        max_size=4,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_argmax_is_torch_argmax_on_ties_infinities_and_nans(rows: list[list[float]]) -> None:
    """Few distinct values, so ties, rows of -inf and NaNs (torch counts a NaN as the largest) abound."""
    logits = torch.tensor(rows)
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))


def test_argmax_of_wide_rows_and_of_a_row_slice() -> None:
    logits = torch.randn(16, 49_152, generator=torch.Generator().manual_seed(1))
    logits[3, 100] = logits[3, 7] = logits[3].max() + 1  # a tie: the first one wins
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))
    assert torch.equal(argmax(logits[5:9]), torch.argmax(logits[5:9], dim=-1))
    assert argmax(logits).dtype == torch.int64
    with torch.inference_mode():  # as the executor calls it
        assert torch.equal(argmax(logits.clone()), torch.argmax(logits, dim=-1))
    logits[9, 40_000] = logits[9, 45_000] = float("nan")  # far into a row, past any unrolled head
    logits[10, 49_151] = float("inf")
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 0), torch.zeros(2, 4, dtype=torch.bfloat16)])
def test_argmax_refuses_what_is_not_float32_logits(bad: torch.Tensor) -> None:
    with pytest.raises(InvalidInput, match="float32 CPU logits"):
        argmax(bad)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), step=st.integers(0, 10_000), temperature=st.floats(0.1, 3.0))
def test_draw_depends_only_on_seed_step_and_logits(seed: int, step: int, temperature: float) -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(7))
    params = SamplingParams(temperature=temperature, seed=seed)
    first = sample(logits, params, step)[0]
    sample(logits, params, step + 1)  # other draws in between change nothing
    torch.manual_seed(seed ^ 1)  # nor does the global generator
    assert torch.equal(sample(logits.clone(), params, step)[0], first)


def test_draws_follow_the_distribution_across_steps() -> None:
    probs = [0.5, 0.3, 0.2]
    params = SamplingParams(temperature=1.0, seed=3)
    counts = torch.zeros(3)
    n = 4000
    for step in range(n):
        counts[sample(logits_of(probs), params, step)[0]] += 1
    assert torch.allclose(counts / n, torch.tensor(probs), atol=0.03)


def test_different_seeds_give_different_sequences() -> None:
    logits = torch.zeros(1, 1000)
    draws = [[int(sample(logits, SamplingParams(temperature=1.0, seed=s), i)[0]) for i in range(20)] for s in (1, 2)]
    assert draws[0] != draws[1]


def test_top_k_keeps_only_the_k_most_likely() -> None:
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]
    params = SamplingParams(temperature=1.0, top_k=2, seed=0)
    seen = {int(sample(logits_of(probs), params, step)[0]) for step in range(300)}
    assert seen == {1, 3}
    assert int(sample(logits_of(probs), SamplingParams(temperature=1.0, top_k=1), 5)[0]) == 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.65)))[0]
    assert kept.tolist() == [False, True, False, True, False]
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.75)))[0]
    assert kept.tolist() == [False, True, False, True, True]
    # The most likely token always survives, however small top_p is.
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.01)))[0]
    assert kept.tolist() == [False, True, False, False, False]


def test_low_temperature_sharpens() -> None:
    probs = [0.45, 0.55]
    params = SamplingParams(temperature=0.01, seed=9)  # odds e^20 : 1
    assert all(int(sample(logits_of(probs), params, s)[0]) == 1 for s in range(200))


def test_tiny_temperature_is_effectively_greedy() -> None:
    logits = torch.tensor([[1.0, 2.0, 1.5]])
    for temperature in (1e-38, 1e-6):
        assert int(sample(logits, SamplingParams(temperature=temperature, seed=4), 0)[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"temperature": "1"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": 2**64},
        {"seed": 1.5},
        {"seed": True},
        {"top_logprobs": 21},
        {"top_logprobs": -1},
        {"prompt_logprobs": 1},
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("nan")},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": ((1, 1.0), (1, 2.0))},
        {"logit_bias": ((-1, 1.0),)},
        {"logit_bias": [(1, 1.0)]},
        {"logit_bias": ((1, True),)},
        {"logit_bias": ((i, 1.0) for i in range(2))},
        {"logit_bias": tuple((i, 1.0) for i in range(301))},
    ],
)
def test_invalid_parameters(kwargs) -> None:
    with pytest.raises(InvalidInput):
        SamplingParams(**kwargs)


def test_logits_must_be_two_dimensional() -> None:
    with pytest.raises(InvalidInput, match=r"\[B, V\]"):
        sample(torch.zeros(5), SamplingParams(), 0)


def test_many_sessions_at_once_pick_what_each_picks_alone() -> None:
    """sample_many shares one argmax and one log_softmax among the greedy sessions of a pass; each
    session, greedy or drawn, one row or several, gets exactly what `sample` gives it alone."""
    gen = torch.Generator().manual_seed(11)
    logits = [torch.randn(rows, 300, generator=gen) for rows in (1, 2, 1, 3, 1)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=5), SamplingParams(),
              SamplingParams(temperature=1.2, top_k=20, seed=9), SamplingParams()]  # fmt: skip
    steps = [4, 17, 9, 2, 30]
    together = sample_many(logits, params, steps)
    assert len(together) == len(logits)
    for (tokens, logprobs), x, p, step in zip(together, logits, params, steps, strict=True):
        alone_tokens, alone_logprobs = sample(x, p, step)
        assert tokens.shape == (x.shape[0],)
        assert torch.equal(tokens, alone_tokens)
        if p.greedy:
            assert torch.equal(tokens, x.argmax(-1))
        assert torch.equal(logprobs, alone_logprobs)
        assert torch.equal(logprobs, torch.log_softmax(x, -1).gather(-1, tokens[:, None])[:, 0])


def test_many_sessions_refuse_logits_that_are_not_a_matrix() -> None:
    with pytest.raises(InvalidInput, match=r"\[B, V\]"):
        sample_many([torch.zeros(1, 5), torch.zeros(5)], [SamplingParams()] * 2, [0, 0])


def test_joined_reads_one_pass_splits_in_place_and_copies_anything_else() -> None:
    """The splits of one pass's logits are read where they lie; parts from elsewhere (other
    buffers, gaps, strides, dtypes) are concatenated. Either way the result is torch.cat's."""
    logits = torch.randn(7, 11)
    parts = list(logits.split([2, 1, 4]))
    together = joined(parts)
    assert together.data_ptr() == logits.data_ptr() and torch.equal(together, torch.cat(parts))
    assert torch.equal(joined(parts[1:]), logits[2:]) and joined(parts[1:]).data_ptr() == parts[1].data_ptr()
    assert joined(parts[:1]) is parts[0]
    others = [
        [logits[:2], logits[3:5]],  # a gap
        [logits[2:4], logits[:2]],  # out of order
        [logits[:2], torch.randn(3, 11)],  # another buffer
        [logits[:2, :5], logits[2:4, :5]],  # strided rows
        [logits.view(torch.int32)[:2], logits[2:3]],  # the same bytes read as another dtype
        [logits[:2], torch._neg_view(logits[2:4])],  # a lazily negated view
    ]
    for case in others:
        got = joined(case)
        assert torch.equal(got, torch.cat(case)) and got.data_ptr() != case[0].data_ptr()
    rows = numpy.arange(12, dtype=numpy.float32).reshape(4, 3)  # two storages at one address
    case = [torch.from_numpy(rows[:2]), torch.from_numpy(rows)[2:4]]
    assert torch.equal(joined(case), torch.cat(case))


def test_penalties_and_bias_follow_openais_formula() -> None:
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j], c counting generated tokens."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 10.0), (7, 3.0)))
    out = adjusted(logits, params, [4, 4, 4, 2])
    assert out.tolist() == [[11.0, 2.0, 3.0 - 0.25 - 0.5, 4.0, 5.0 - 0.75 - 0.5]]  # id 7: beyond the vocabulary
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]))  # the input is left alone
    assert adjusted(logits, SamplingParams(), [4]) is logits


def test_adjusted_greedy_picks_from_the_adjusted_logits_and_reports_the_models_logprob() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    params = SamplingParams(presence_penalty=1.0)
    tokens, logprobs = sample(logits, params, 0, generated=[1])
    assert tokens.tolist() == [2]
    assert logprobs[0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())
    assert sample(logits, params, 0)[0].tolist() == [1]  # nothing generated yet: no penalty
    together = sample_many([logits, logits], [params, SamplingParams()], [0, 0], [[1], [1]])
    assert [t.tolist() for t, _ in together] == [[2], [1]]


def test_top_logprobs_are_the_most_likely_best_first() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0], [5.0, 0.0, 1.0, -1.0]])
    expected = torch.log_softmax(logits, -1)
    top = top_logprobs(logits, 2)
    assert [[t for t, _ in row] for row in top] == [[3, 1], [0, 2]]
    assert top[0][0][1] == pytest.approx(expected[0, 3].item())
    assert top_logprobs(logits, 0) == ((), ())
    assert len(top_logprobs(logits, 9)[0]) == 4


def test_prompt_logprobs_score_each_token_from_the_position_before() -> None:
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    ids = [2, 5, 0, 6]
    scored = prompt_logprobs(logits, ids, 1)
    expected = torch.log_softmax(logits, -1)
    assert [lp for lp, _ in scored] == pytest.approx([expected[i, ids[i + 1]].item() for i in range(3)])
    assert [top[0][0] for _, top in scored] == expected[:3].argmax(-1).tolist()
    assert prompt_logprobs(logits[:1], ids[:1], 1) == ()
    with pytest.raises(InvalidInput):
        prompt_logprobs(logits, ids[:3], 1)
