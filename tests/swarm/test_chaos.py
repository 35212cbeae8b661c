"""A short chaos run (`scripts/chaos.py`): three SmolLM2 peers, concurrent greedy streams, and
random SIGKILLs, SIGSTOP/SIGCONTs and restarts of any peer, the leader included. The script
checks the invariants itself and exits 0 only when all hold; this test runs it and reads its
report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


def test_a_short_chaos_run_keeps_every_invariant(smollm2, tmp_path) -> None:
    store, _ = smollm2
    summary = tmp_path / "chaos.json"
    args = ["--duration", "30", "--fault-gap", "3,6", "--seed", "5", "--clients", "2", "--prompts", "3"]
    args += ["--max-tokens", "16", "--cache-dir", str(store.cache_dir), "--out", str(summary)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=840)
    report = done.stdout + done.stderr[-6000:]
    assert done.returncode == 0, report
    assert "invariants: all hold" in done.stdout, report
    faults = int(re.search(r"^faults: (\d+)", done.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    ok = re.search(r"^requests: \d+ \(.*\bok (\d+)", done.stdout, re.MULTILINE)
    assert faults >= 2, report  # the run did disturb the swarm
    assert ok is not None and int(ok.group(1)) >= 1, report  # and requests went through it
