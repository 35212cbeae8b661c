"""The stage executor: sessions open within the KV-cache budget and close, idle ones are evicted,
and every kind of bad input raises a specific error without changing any session's state."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from peer.config import ExecutorConfig, StoreConfig
from peer.errors import CacheFull, InvalidInput, PositionError, SessionBusy, SessionExists, UnknownSession
from peer.executor import StageExecutor, StepRequest, StepResult
from peer.model_store import ModelStore
from peer.pipeline import load_stages
from peer.profile import ModelProfile
from peer.sampling import SamplingParams


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stages(tiny_llama, tmp_path: Path):
    """A 4-layer tiny model as a first stage [0, 2) and a last stage [2, 4)."""
    files = ModelStore(StoreConfig(cache_dir=str(tmp_path))).resolve(str(tiny_llama(layers=4)))
    return load_stages(files, files.load_config(), [(0, 2), (2, 4)])


def ids(*values: int) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.int64)


def pos(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.int64)


def test_unknown_session(stages) -> None:
    ex = StageExecutor(stages[0])
    with pytest.raises(UnknownSession, match="not open"):
        ex.step("nope", ids(1, 2), pos(0, 2))
    assert ex.close_session("nope") is False


def test_open_twice_and_bad_open_arguments(stages) -> None:
    ex = StageExecutor(stages[0])
    ex.open_session("a", 16)
    with pytest.raises(SessionExists):
        ex.open_session("a", 16)
    with pytest.raises(PositionError, match="context"):
        ex.open_session("b", stages[0].config.max_position_embeddings + 1)
    with pytest.raises(PositionError):
        ex.open_session("b", 0)
    with pytest.raises(InvalidInput, match="session id"):
        ex.open_session("", 4)
    assert ex.session_ids() == ["a"]


def test_first_stage_rejects_bad_token_ids(stages) -> None:
    ex = StageExecutor(stages[0])
    ex.open_session("s", 16)
    vocab = stages[0].config.vocab_size
    bad_inputs = [
        (torch.tensor([[1.0, 2.0]]), "int64"),  # float ids
        (torch.tensor([1, 2]), "int64"),  # missing batch dimension
        (torch.tensor([[1, 2], [3, 4]]), "int64"),  # batch 2 in a batch-1 session
        (torch.zeros((1, 0), dtype=torch.int64), "T>0"),  # no tokens
        (ids(1, vocab), "token ids must be in"),  # out of vocabulary
        (ids(-1, 2), "token ids must be in"),
    ]
    for inputs, message in bad_inputs:
        with pytest.raises(InvalidInput, match=message):
            ex.step("s", inputs, pos(0, inputs.shape[-1] if inputs.dim() else 1))
    assert ex.session_length("s") == 0


def test_later_stage_rejects_bad_hidden_states(stages) -> None:
    ex = StageExecutor(stages[1])
    ex.open_session("s", 16)
    d = stages[1].config.hidden_size
    good = torch.randn(1, 3, d)
    with pytest.raises(InvalidInput, match="dtype"):
        ex.step("s", good.to(torch.float16), pos(0, 3))
    with pytest.raises(InvalidInput, match="hidden states"):
        ex.step("s", torch.randn(1, 3, d + 1), pos(0, 3))
    with pytest.raises(InvalidInput, match="hidden states"):
        ex.step("s", torch.randn(3, d), pos(0, 3))
    with pytest.raises(InvalidInput, match="NaN"):
        ex.step("s", torch.full((1, 3, d), float("nan")), pos(0, 3))
    with pytest.raises(InvalidInput, match="hidden states"):
        ex.step("s", ids(1, 2, 3), pos(0, 3))
    assert ex.session_length("s") == 0
    assert sum(ex.stats.refused.values()) == 5


def test_positions_are_validated(stages) -> None:
    ex = StageExecutor(stages[0])
    ex.open_session("s", 6)
    ex.step("s", ids(1, 2, 3), pos(0, 3))
    with pytest.raises(PositionError, match="holds positions"):
        ex.step("s", ids(4), pos(5, 1))  # a gap after position 2
    with pytest.raises(PositionError, match="contiguous"):
        ex.step("s", ids(4, 5), torch.tensor([3, 5]))
    with pytest.raises(PositionError, match="maximum length"):
        ex.step("s", ids(4, 5, 6, 7), pos(3, 4))  # beyond the session's 6 positions
    with pytest.raises(InvalidInput, match="int64"):
        ex.step("s", ids(4), torch.tensor([3.0]))
    with pytest.raises(InvalidInput, match="shape"):
        ex.step("s", ids(4), pos(3, 2))
    assert ex.session_length("s") == 3


def test_bad_input_leaves_the_session_and_others_unchanged(stages) -> None:
    """A session hit by bad requests continues exactly as one that never saw them."""
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    for ex in (first, last):
        ex.open_session("clean", 8)
        ex.open_session("hit", 8)
    prompt = ids(5, 6, 7)
    tokens = {}
    for sid in ("clean", "hit"):
        hidden = first.step(sid, prompt, pos(0, 3)).hidden
        if sid == "hit":
            for bad in (hidden.double(), hidden[..., :-1], hidden * float("inf")):
                with pytest.raises(InvalidInput):
                    last.step(sid, bad, pos(0, bad.shape[1]))
            with pytest.raises(UnknownSession):
                last.step("other", hidden, pos(0, 3))
        tokens[sid] = int(last.step(sid, hidden, pos(0, 3)).tokens[0])
    assert tokens["clean"] == tokens["hit"]
    assert last.session_length("hit") == last.session_length("clean") == 3


def test_budget_admission_and_release(stages) -> None:
    profile = ModelProfile.from_config(stages[0].config)
    per_session = profile.kv_bytes(0, 2, 100)
    budget_mb = 1
    ex = StageExecutor(stages[0], ExecutorConfig(kv_cache_budget_mb=budget_mb))
    fits = (budget_mb * 1024 * 1024) // per_session
    for i in range(fits):
        ex.open_session(f"s{i}", 100)
    assert ex.reserved_bytes == fits * per_session
    with pytest.raises(CacheFull, match="MiB of KV cache") as e:
        ex.open_session("one-too-many", 100)
    assert e.value.needed_bytes == per_session and e.value.free_bytes < per_session
    ex.close_session("s0")
    ex.open_session("one-too-many", 100)
    assert len(ex.session_ids()) == fits


def test_session_count_limit(stages) -> None:
    ex = StageExecutor(stages[0], ExecutorConfig(max_sessions=2))
    ex.open_session("a", 4)
    ex.open_session("b", 4)
    with pytest.raises(CacheFull, match="maximum of 2"):
        ex.open_session("c", 4)


def test_idle_sessions_are_evicted(stages) -> None:
    clock = FakeClock()
    ex = StageExecutor(stages[0], ExecutorConfig(session_idle_timeout_s=30), clock=clock)
    ex.open_session("idle", 8)
    ex.open_session("active", 8)
    clock.now += 20
    ex.step("active", ids(1), pos(0, 1))
    clock.now += 15  # "idle" is 35 s old, "active" 15 s
    assert ex.evict_idle() == ["idle"]
    with pytest.raises(UnknownSession):
        ex.step("idle", ids(1), pos(0, 1))
    assert ex.session_ids() == ["active"]
    assert ex.stats.evicted == 1


def test_abandoned_sessions_make_room_for_new_ones(stages) -> None:
    """Opening a session past the budget first evicts sessions that timed out."""
    clock = FakeClock()
    profile = ModelProfile.from_config(stages[0].config)
    budget = 1024 * 1024
    ex = StageExecutor(stages[0], ExecutorConfig(kv_cache_budget_mb=1, session_idle_timeout_s=30), clock=clock)
    assert budget < 2 * profile.kv_bytes(0, 2, 128, batch=10) <= 2 * budget
    ex.open_session("abandoned", 128, batch_size=10)
    with pytest.raises(CacheFull):
        ex.open_session("new", 128, batch_size=10)
    clock.now += 31
    ex.open_session("new", 128, batch_size=10)
    assert ex.session_ids() == ["new"]


def test_kv_cache_grows_to_its_reservation_only(stages) -> None:
    ex = StageExecutor(stages[0], ExecutorConfig(kv_cache_chunk_tokens=4))
    ex.open_session("s", 10)
    ex.step("s", ids(*range(1, 4)), pos(0, 3))
    cache = ex._sessions["s"].cache
    assert cache.capacity == 4
    ex.step("s", ids(*range(4, 11)), pos(3, 7))
    assert cache.capacity == 10
    profile = ModelProfile.from_config(stages[0].config)
    assert cache.nbytes == profile.kv_bytes(0, 2, 10) == ex.reserved_bytes


def test_sampling_must_be_sampling_params(stages) -> None:
    with pytest.raises(InvalidInput, match="SamplingParams"):
        StageExecutor(stages[1]).open_session("s", 4, {"temperature": 1.0})  # type: ignore[arg-type]


def test_replayed_sampled_step_draws_the_same_token(stages) -> None:
    """With temperature > 0, re-running the step at the same position (as after a lost reply) redraws the same."""
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    params = SamplingParams(temperature=1.5, seed=11)
    for ex in (first, last):
        ex.open_session("s", 16, params)
    hidden = first.step("s", ids(3, 1, 4, 1, 5), pos(0, 5)).hidden
    drawn = [int(last.step("s", hidden, pos(0, 5)).tokens[0]) for _ in range(3)]
    assert len(set(drawn)) == 1
    # ... and a different position draws with a different key, so a run is not one token repeated.
    tokens = []
    start, x = 5, ids(drawn[0])
    for _ in range(8):
        h = first.step("s", x, pos(start, 1)).hidden
        tokens.append(int(last.step("s", h, pos(start, 1)).tokens[0]))
        x, start = ids(tokens[-1]), start + 1
    assert len(set(tokens)) > 1


def test_busy_session_and_close_during_a_step(stages, monkeypatch) -> None:
    """A second step on a busy session is refused; closing it mid-step releases its budget after the step."""
    ex = StageExecutor(stages[0])
    ex.open_session("s", 8)
    reserved = ex.reserved_bytes
    entered, release = threading.Event(), threading.Event()
    forward = stages[0].forward_batch

    def slow_forward(*args, **kwargs):
        entered.set()
        assert release.wait(timeout=30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(stages[0], "forward_batch", slow_forward)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ex.step("s", ids(1, 2), pos(0, 2))
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert entered.wait(timeout=30)
        with pytest.raises(SessionBusy):
            ex.step("s", ids(1, 2), pos(0, 2))
        assert ex.close_session("s") is True
        assert ex.close_session("s") is False
        assert ex.session_ids() == []
        assert ex.reserved_bytes == reserved  # its buffers are still in use
    finally:
        release.set()
        worker.join(timeout=30)
    assert not errors
    assert ex.reserved_bytes == 0
    with pytest.raises(UnknownSession):
        ex.step("s", ids(3), pos(2, 1))


def test_steps_of_different_sessions_run_in_parallel_threads(stages) -> None:
    """Concurrent steps of many sessions give each the result it gets alone."""
    ex = StageExecutor(stages[0])
    prompts = {f"s{i}": ids(*range(i + 1, i + 6)) for i in range(6)}
    alone = {}
    for sid, prompt in prompts.items():
        ex.open_session(sid, 8)
        alone[sid] = ex.step(sid, prompt, pos(0, 5)).hidden
    results: dict[str, torch.Tensor] = {}

    def run(sid: str) -> None:
        results[sid] = ex.step(sid, prompts[sid], pos(0, 5)).hidden  # a replay of the same step

    threads = [threading.Thread(target=run, args=(sid,)) for sid in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == set(prompts)
    for sid in prompts:
        assert torch.equal(results[sid], alone[sid])
    assert ex.stats.steps == 12


# ---- several sessions in one forward pass ----------------------------------------------------------

# Each session: its priming steps (run alone, before), then the step measured alone or together.
BATCH_CASES: dict[str, tuple[int, list[tuple[list[list[int]], int]], tuple[list[list[int]], int]]] = {
    # name: (batch size, [(ids, start) primed], (ids, start) measured)
    "prefill": (1, [], ([[5, 6, 7, 8]], 0)),
    "decode-short": (1, [([[1, 2, 3]], 0)], ([[9]], 3)),
    "decode-long": (1, [([[4, 5, 6, 7, 8, 9]], 0)], ([[10]], 6)),
    "replay-mid-cache": (1, [([[1, 2, 3, 4, 5]], 0)], ([[7, 8, 9]], 2)),
    "two-rows": (2, [([[1, 2], [3, 4]], 0)], ([[5], [6]], 2)),
    "two-rows-replay": (2, [([[1, 2, 3], [4, 5, 6]], 0)], ([[7, 8], [9, 10]], 1)),
}


def run_cases(stages, together: bool) -> dict[str, StepResult]:
    """Every case through a first and a last stage; the measured steps in one pass each, or one by one."""
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    for name, (rows, primes, _) in BATCH_CASES.items():
        for ex in (first, last):
            ex.open_session(name, 16, batch_size=rows)
        for tokens, start in primes:
            t = torch.tensor(tokens)
            hidden = first.step(name, t, pos(start, t.shape[1])).hidden
            last.step(name, hidden, pos(start, t.shape[1]))
    requests = [
        StepRequest(name, torch.tensor(tokens), pos(start, len(tokens[0])))
        for name, (_, _, (tokens, start)) in BATCH_CASES.items()
    ]
    if together:
        hidden = first.step_many(requests)
        assert first.stats.batches == 1 + sum(len(p) for _, p, _ in BATCH_CASES.values())
    else:
        hidden = [first.step(r.session_id, r.inputs, r.positions) for r in requests]
    inner = [StepRequest(r.session_id, h.hidden, r.positions) for r, h in zip(requests, hidden, strict=True)]  # type: ignore[union-attr]
    if together:
        out = last.step_many(inner, all_logits=True)
    else:
        out = [last.step(r.session_id, r.inputs, r.positions, all_logits=True) for r in inner]
    results = {}
    for r, h, o in zip(requests, hidden, out, strict=True):
        assert isinstance(h, StepResult) and isinstance(o, StepResult)
        results[r.session_id] = StepResult(hidden=h.hidden, tokens=o.tokens, logits=o.logits)
        assert first.session_length(r.session_id) == int(r.positions[-1]) + 1
    return results


def test_sessions_stepped_together_get_what_each_gets_alone(stages) -> None:
    """A prefill, decode steps over caches of different lengths, a replay from inside the cache and a
    two-row session, run as one forward pass per stage: the same hidden states, logits and tokens."""
    alone, together = run_cases(stages, together=False), run_cases(stages, together=True)
    for name in BATCH_CASES:
        a, t = alone[name], together[name]
        assert a.hidden is not None and t.hidden is not None and a.logits is not None and t.logits is not None
        assert a.hidden.shape == t.hidden.shape and a.logits.shape == t.logits.shape, name
        assert torch.allclose(a.hidden, t.hidden, atol=1e-5, rtol=0), name
        assert torch.allclose(a.logits, t.logits, atol=1e-5, rtol=0), name
        assert torch.equal(a.tokens, t.tokens), name


def test_a_refused_step_in_a_pass_changes_nothing_and_holds_no_one_back(stages) -> None:
    ex = StageExecutor(stages[0])
    ex.open_session("a", 8)
    ex.open_session("b", 8)
    out = ex.step_many(
        [
            StepRequest("a", ids(1, 2), pos(0, 2)),
            StepRequest("nope", ids(1), pos(0, 1)),
            StepRequest("b", ids(1), pos(3, 1)),  # past the cached length
            StepRequest("a", ids(3), pos(2, 1)),  # "a" already steps in this pass
            StepRequest("b", torch.ones((1, 2, 3)), pos(0, 2)),  # hidden states to a first stage
        ]
    )
    assert isinstance(out[0], StepResult) and out[0].hidden is not None
    assert tuple(out[0].hidden.shape) == (1, 2, stages[0].config.hidden_size)
    assert [type(e) for e in out[1:]] == [UnknownSession, PositionError, SessionBusy, InvalidInput]
    assert ex.session_length("a") == 2 and ex.session_length("b") == 0
    assert ex.stats.batches == 1 and ex.stats.steps == 1
    assert ex.step_many([StepRequest("nope", ids(1), pos(0, 1))])[0].__class__ is UnknownSession
    assert ex.stats.batches == 1  # a pass with nothing accepted runs nothing


def test_projections_through_onednn_compute_what_f_linear_computes(stages, monkeypatch) -> None:
    """The oneDNN path (taken by large float32 weights) agrees with F.linear, bias included, and a
    whole stage gives the same hidden states through either path."""
    import torch.nn.functional as F

    import peer.stage as stage_module

    if not stage_module.onednn():
        pytest.skip("this torch build has no oneDNN inner product")
    layer = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 64)
    monkeypatch.setattr(stage_module, "ONEDNN_MIN_WEIGHT_ELEMENTS", 0)
    assert torch.allclose(stage_module.linear(x, layer), F.linear(x, layer.weight, layer.bias), atol=1e-5)

    def hidden() -> torch.Tensor:
        ex = StageExecutor(stages[0])
        ex.open_session("s", 8)
        out = ex.step("s", ids(1, 2, 3), pos(0, 3)).hidden
        assert out is not None
        return out

    through_onednn = hidden()
    monkeypatch.setattr(stage_module, "ONEDNN_MIN_WEIGHT_ELEMENTS", 1 << 62)
    assert torch.allclose(through_onednn, hidden(), atol=1e-5)


def test_a_step_of_non_finite_hidden_states_is_refused_alone(stages) -> None:
    """The pass's one finiteness check finds the step with a NaN (or an inf): only it is refused,
    its session stays as it was and can step again, and the others get what they get alone."""
    ex, d = StageExecutor(stages[1]), stages[1].config.hidden_size
    for sid in "abc":
        ex.open_session(sid, 8)
    good = {sid: torch.randn(1, 2, d, generator=torch.Generator().manual_seed(ord(sid))) for sid in "ac"}
    bad = torch.randn(1, 2, d)
    bad[0, 1, 3] = float("nan")
    out = ex.step_many([StepRequest("a", good["a"], pos(0, 2)), StepRequest("b", bad, pos(0, 2)),
                        StepRequest("c", good["c"], pos(0, 2))])  # fmt: skip
    assert isinstance(out[1], InvalidInput) and "NaN" in str(out[1])
    assert ex.stats.refused["InvalidInput"] == 1 and ex.stats.steps == 2
    assert ex.session_length("b") == 0 and [ex.session_length(s) for s in "ac"] == [2, 2]
    assert ex.step("b", bad.nan_to_num(), pos(0, 2)).tokens is not None  # not left busy
    bad[0, 1, 3] = float("-inf")
    assert isinstance(ex.step_many([StepRequest("a", bad[:, 1:], pos(2, 1))])[0], InvalidInput)
    for sid in "ac":
        alone = StageExecutor(stages[1])
        alone.open_session(sid, 8)
        result = out["abc".index(sid)]
        assert isinstance(result, StepResult) and result.tokens is not None
        assert torch.equal(result.tokens, alone.step(sid, good[sid], pos(0, 2)).tokens)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default"},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=lambda r: r["rope_type"],
)  # fmt: skip
def test_rotary_tables_of_a_pass_are_each_steps_own(stages, rope: dict) -> None:
    """A pass's rotary tables give every row bitwise what its step's own call gives: one call for
    the whole pass where the RoPE is fixed, and one per step where it rescales by the longest (dynamic)."""
    from peer.kv_cache import SessionKVCache
    from peer.stage import StageModel, Step

    config = stages[0].config.__class__.from_dict(stages[0].config.to_dict())
    config.rope_parameters = {**rope, "rope_theta": 10000.0}
    config.max_position_embeddings = 32  # the dynamic RoPE rescales for a call reaching past it
    stage = StageModel(config, 0, 1)
    cache = SessionKVCache(first_layer=0, num_layers=1, batch=1, kv_heads=2, head_dim=16, max_length=64,
                           dtype=torch.float32, device="cpu")  # fmt: skip
    spans = [(0, 5), (40, 1), (7, 3), (60, 1)]
    steps = [Step(ids(*range(n)), pos(start, n)[None], cache) for start, n in spans]
    hidden = torch.zeros(sum(n for _, n in spans), config.hidden_size)
    cos, sin = stage._rope(hidden, steps, None)
    at = 0
    for step, (_, n) in zip(steps, spans, strict=True):
        own_cos, own_sin = stage._rope(hidden, [step], None)
        assert torch.equal(cos[at : at + n], own_cos) and torch.equal(sin[at : at + n], own_sin)
        at += n
    assert stage._rope_per_call == (rope["rope_type"] == "dynamic")


def test_a_pass_whose_checks_fail_leaves_no_session_busy(stages, monkeypatch) -> None:
    """An error in the pass's finiteness check (out of memory, say) reaches the caller, and every
    session of the pass can step again."""
    ex, d = StageExecutor(stages[1]), stages[1].config.hidden_size
    for sid in "ab":
        ex.open_session(sid, 8)

    def out_of_memory(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "isfinite", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            ex.step_many([StepRequest(sid, torch.randn(1, 2, d), pos(0, 2)) for sid in "ab"])
    outcomes = ex.step_many([StepRequest(sid, torch.randn(1, 2, d), pos(0, 2)) for sid in "ab"])
    assert all(isinstance(o, StepResult) for o in outcomes) and ex.stats.steps == 2


# ---- what the last stage returns beyond the token ---------------------------------------------------


def run_prompt(stages, sid: str, prompt: list[int], sampling: SamplingParams, **opening) -> StepResult:
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    for ex in (first, last):
        ex.open_session(sid, 16, sampling, **opening)
    hidden = first.step(sid, ids(*prompt), pos(0, len(prompt))).hidden
    return last.step(sid, hidden, pos(0, len(prompt)), all_logits=True)


def test_the_prompt_is_scored_from_the_logits_of_every_position(stages) -> None:
    prompt = [5, 9, 2, 7, 11]
    sampling = SamplingParams(top_logprobs=3, prompt_logprobs=True)
    result = run_prompt(stages, "s", prompt, sampling, history=prompt)
    assert result.logits is not None
    expected = torch.log_softmax(result.logits[0].float(), dim=-1)  # [T, V]
    (scored,) = result.prompt
    assert len(scored) == len(prompt) - 1
    for i, (logprob, top) in enumerate(scored):
        assert logprob == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-6)
        best = torch.topk(expected[i], 3)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-6)
    (top,) = result.top  # the chosen token's alternatives: the last position's most likely
    assert [t for t, _ in top] == torch.topk(expected[-1], 3).indices.tolist()
    assert result.tokens is not None and int(result.tokens[0]) == top[0][0]  # greedy


def test_a_prompt_is_scored_once_and_only_when_asked(stages) -> None:
    prompt = [5, 9, 2]
    assert run_prompt(stages, "s", prompt, SamplingParams(top_logprobs=2), history=prompt).prompt == ()
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    sampling = SamplingParams(prompt_logprobs=True)
    for ex in (first, last):
        ex.open_session("s", 16, sampling, history=prompt)
    result = last.step("s", first.step("s", ids(*prompt), pos(0, 3)).hidden, pos(0, 3))
    assert len(result.prompt[0]) == 2 and result.logits is None  # every position, without all_logits
    token = int(result.tokens[0])
    again = last.step("s", first.step("s", ids(token), pos(3, 1)).hidden, pos(3, 1))
    assert again.prompt == () and again.top == ((),)


def test_penalties_count_the_tokens_generated_and_need_the_sessions_ids(stages) -> None:
    """The last stage keeps the session's ids: the penalty of a decode step counts the tokens it
    sampled before, and an opening with a generated part (a replay) counts that part."""
    sampling = SamplingParams(frequency_penalty=2.0)
    last = StageExecutor(stages[1])
    with pytest.raises(InvalidInput, match="token ids"):
        last.open_session("none", 16, sampling)
    with pytest.raises(InvalidInput, match="prompt_tokens"):
        last.open_session("bad", 16, sampling, history=[1, 2], prompt_tokens=3)
    with pytest.raises(InvalidInput, match="token ids"):
        last.open_session("bad", 16, sampling, history=[1, stages[1].config.vocab_size])
    prompt = [5, 9, 2]
    first = StageExecutor(stages[0])
    # A replay: the prompt and two generated tokens, the last of which repeats the first.
    history = [*prompt, 4, 4]
    for ex in (first, last):
        ex.open_session("replay", 16, sampling, history=history, prompt_tokens=3)
    hidden = first.step("replay", ids(*history), pos(0, 5)).hidden
    result = last.step("replay", hidden, pos(0, 5), all_logits=True)
    logits = result.logits[0, -1:].float()
    expected = logits.clone()
    expected[0, 4] -= 2 * 2.0  # generated twice
    assert int(result.tokens[0]) == int(expected.argmax())
    assert float(result.logprobs[0]) == pytest.approx(float(torch.log_softmax(logits, -1)[0, result.tokens[0]]))
    # The step after counts the token just sampled too; a step the ids do not cover is refused.
    with pytest.raises(PositionError, match="token ids cover"):
        last.step("replay", first.step("replay", ids(1, 1), pos(5, 2)).hidden, pos(5, 2))


def test_a_grammar_holds_and_its_greedy_reply_is_the_same_on_every_split_and_after_a_replay(tiny_llama) -> None:
    """A random model whose greedy output would be noise writes valid JSON under a grammar; the same
    tokens on 1, 2 and 3 stages; and a session reopened with part of the reply (a failover's replay)
    rebuilds the grammar's state and goes on exactly as the first did."""
    import json

    from peer.grammar import json_schema_grammar
    from tests.helpers import byte_grammars

    grammars, hf = byte_grammars()
    schema = {"type": "object", "properties": {"a": {"enum": ["xy", "zw"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    sampling = SamplingParams(grammar=json_schema_grammar(schema), frequency_penalty=0.5)
    files = ModelStore(StoreConfig(cache_dir=str(tiny_llama(layers=4, vocab=257).parent / "cache"))).resolve(
        str(tiny_llama(layers=4, vocab=257)))  # fmt: skip
    prompt = hf.encode("JSON:")

    def generate(ranges: list[tuple[int, int]], history: list[int], limit: int = 40) -> list[int]:
        executors = [StageExecutor(s, grammars=grammars) for s in load_stages(files, files.load_config(), ranges)]
        for ex in executors:
            ex.open_session("s", 64, sampling, history=history, prompt_tokens=len(prompt))
        out, x, start = [], torch.tensor([history]), 0
        while len(out) < limit:
            inputs, n = x, x.shape[1]
            for ex in executors:
                result = ex.step("s", inputs, pos(start, n))
                inputs = result.hidden if result.hidden is not None else inputs
            token = int(result.tokens[0])
            out.append(token)
            if token == 0:
                break
            start, x = start + n, torch.tensor([[token]])
        return out

    whole = generate([(0, 4)], prompt)
    assert whole[-1] == 0, "the grammar ends the reply"
    value = json.loads(hf.decode(whole[:-1]))
    assert value["a"] in ("xy", "zw") and isinstance(value["b"], bool)
    assert generate([(0, 2), (2, 4)], prompt) == whole
    assert generate([(0, 1), (1, 3), (3, 4)], prompt) == whole
    assert generate([(0, 2), (2, 4)], prompt + whole[:4]) == whole[4:]  # reopened mid-reply


def test_a_prompt_is_scored_a_few_positions_at_a_time_as_it_would_be_whole(stages, monkeypatch) -> None:
    """Without all_logits, the scoring step's logits are made in chunks (memory: [chunk, V], not
    [T, V]); the scores equal those from the whole step's logits."""
    import peer.executor

    prompt = [5, 9, 2, 7, 11, 3, 8]
    sampling = SamplingParams(top_logprobs=2, prompt_logprobs=True)
    whole = run_prompt(stages, "s", prompt, sampling, history=prompt)
    monkeypatch.setattr(peer.executor, "SCORE_CHUNK_POSITIONS", 2)
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1])
    for ex in (first, last):
        ex.open_session("c", 16, sampling, history=prompt)
    chunked = last.step("c", first.step("c", ids(*prompt), pos(0, len(prompt))).hidden, pos(0, len(prompt)))
    assert len(chunked.prompt[0]) == len(prompt) - 1
    for (a, top_a), (b, top_b) in zip(chunked.prompt[0], whole.prompt[0], strict=True):
        assert a == pytest.approx(b, abs=1e-5) and [t for t, _ in top_a] == [t for t, _ in top_b]
    assert torch.equal(chunked.tokens, whole.tokens)
