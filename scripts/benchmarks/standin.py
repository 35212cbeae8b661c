"""A bench-only stand-in for a stage's compute: `python scripts/benchmarks/standin.py PASS_S
[swarm-peer flags]` runs `swarm-peer` with every forward pass taking at least PASS_S seconds of
wall time, spent asleep, whatever its batch. On a machine whose cores the peers share, real compute
would serialise the stages and hide what pipelining does; sleeping stages overlap as separate
machines would. The tokens are still the model's own (the real pass runs, then the sleep tops it up)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: stand-ins share the cores
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # run from a checkout


def main() -> None:
    pass_s = float(sys.argv[1])
    from peer.executor import StageExecutor, StepRequest
    from swarm import launcher

    real = StageExecutor.step_many

    def fixed(self: StageExecutor, requests: Sequence[StepRequest], *, all_logits: bool = False) -> list:
        started = time.perf_counter()
        outcomes = real(self, requests, all_logits=all_logits)
        time.sleep(max(0.0, pass_s - (time.perf_counter() - started)))
        return outcomes

    StageExecutor.step_many = fixed  # type: ignore[method-assign]
    sys.argv = ["swarm-peer", *sys.argv[2:]]
    launcher.run()


if __name__ == "__main__":
    main()
