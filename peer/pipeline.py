"""An in-process chain of stage executors: the whole model as N stages in one process. It is what
the swarm does across machines, minus the network, so it serves the run command until the swarm
exists, the exactness tests, and the single-process side of benchmarks. It owns no sessions'
token history beyond one generation loop."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from peer.checkpoint import open_checkpoint
from peer.config import ExecutorConfig
from peer.errors import InvalidInput
from peer.executor import StageExecutor, StepResult
from peer.model_store import ModelFiles
from peer.sampling import SamplingParams
from peer.shard import load_stage
from peer.stage import StageModel


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size covering every layer once."""
    if not 1 <= stages <= num_layers:
        raise InvalidInput(f"cannot split {num_layers} layers into {stages} stages")
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for i in range(stages):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def load_stages(
    files: ModelFiles,
    config: Any,
    ranges: Sequence[tuple[int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    show_progress: bool = False,
) -> list[StageModel]:
    """Load one StageModel per range, each reading only its own tensors from one open checkpoint."""
    source = open_checkpoint(files, config, dtype)
    stages = []
    try:
        for start, end in ranges:
            bar = tqdm(desc=f"Loading layers [{start}, {end})", unit="tensor", disable=not show_progress)
            with bar:

                def tick(done: int, total: int, bar: Any = bar) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                stages.append(load_stage(source, config, start, end, dtype=dtype, device=device, progress=tick))
    finally:
        source.close()
    return stages


@dataclass
class StepTimings:
    """Compute seconds of each stage, summed over the steps of one generation."""

    per_stage_s: list[float] = field(default_factory=list)
    steps: int = 0


class LocalPipeline:
    """Stage executors chained in one process: hidden states pass by reference."""

    def __init__(self, stages: Sequence[StageModel], config: ExecutorConfig | None = None) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise InvalidInput("a pipeline needs stages from the first layer to the last")
        for a, b in itertools.pairwise(stages):
            if a.end != b.start:
                raise InvalidInput(f"stages [{a.start}, {a.end}) and [{b.start}, {b.end}) are not contiguous")
        self.executors = [StageExecutor(s, config) for s in stages]
        self.timings = StepTimings([0.0] * len(stages))

    def open(self, session_id: str, max_length: int, sampling: SamplingParams | None = None) -> None:
        """Open the session on every stage (the last one samples), or on none if any stage refuses."""
        opened: list[StageExecutor] = []
        try:
            for ex in self.executors:
                ex.open_session(session_id, max_length, sampling)
                opened.append(ex)
        except BaseException:
            for ex in opened:
                ex.close_session(session_id)
            raise

    def close(self, session_id: str) -> None:
        """Close the session on every stage."""
        for ex in self.executors:
            ex.close_session(session_id)

    def step(self, session_id: str, token_ids: torch.Tensor, start: int, all_logits: bool = False) -> StepResult:
        """Run token ids [B, T] at positions [start, start + T) through every stage."""
        positions = torch.arange(start, start + token_ids.shape[1], dtype=torch.int64)
        x: torch.Tensor = token_ids
        result = StepResult()
        for i, ex in enumerate(self.executors):
            result = ex.step(session_id, x, positions, all_logits=all_logits)
            self.timings.per_stage_s[i] += result.compute_s
            if result.hidden is not None:
                x = result.hidden
        self.timings.steps += 1
        return result

    def generate(
        self,
        session_id: str,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_ids: frozenset[int] = frozenset(),
        on_step: Callable[[int], None] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids: prefill the prompt, then decode one token per step."""
        if not prompt_ids:
            raise InvalidInput("the prompt must have at least one token")
        if max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        self.open(session_id, len(prompt_ids) + max_new_tokens, sampling)
        try:
            ids = torch.tensor([list(prompt_ids)], dtype=torch.int64)
            start = 0
            for _ in range(max_new_tokens):
                result = self.step(session_id, ids, start)
                assert result.tokens is not None
                token = int(result.tokens[0])
                yield token
                if on_step:
                    on_step(token)
                if token in stop_ids:
                    return
                start += ids.shape[1]
                ids = result.tokens[:, None]
        finally:
            self.close(session_id)
