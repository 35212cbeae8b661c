"""Short chaos runs (`scripts/chaos.py`) of three SmolLM2 peers under concurrent greedy streams: on
127.0.0.1 with random SIGKILLs, SIGSTOP/SIGCONTs and restarts of any peer, the leader included;
and on the network test bed with those and cut cables, splits and delay spikes as well. The script
checks the invariants itself and exits 0 only when all hold; these tests run it and read its
report. Each run is bounded by its number of faults; the time caps are only there for a stuck run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.testbed import unavailable

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1500)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"
COMMON = ["--fault-gap", "3,6", "--clients", "2", "--prompts", "3", "--max-tokens", "16"]


def chaos(tmp_path: Path, store_cache: Path, *args: str) -> tuple[str, dict]:
    summary = tmp_path / "chaos.json"
    argv = [*COMMON, *args, "--max-duration", "900", "--cache-dir", str(store_cache), "--out", str(summary)]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=1400)
    report = done.stdout + done.stderr[-6000:]
    assert done.returncode == 0, report
    assert "invariants: all hold" in done.stdout, report
    ok = re.search(r"^requests: \d+ \(.*\bok (\d+)", done.stdout, re.MULTILINE)
    assert ok is not None and int(ok.group(1)) >= 1, report  # requests went through the disturbed swarm
    return report, json.loads(summary.read_text())


def test_process_faults_keep_every_invariant(smollm2, tmp_path) -> None:
    store, _ = smollm2
    report, summary = chaos(tmp_path, store.cache_dir, "--faults", "3", "--seed", "5")
    assert len(summary["faults"]) == 3, report  # the run is bounded by its faults, and made them all


def test_network_faults_on_the_test_bed_keep_every_invariant(smollm2, tmp_path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    store, _ = smollm2
    report, summary = chaos(tmp_path, store.cache_dir, "--testbed", "--faults", "5", "--seed", "3")
    kinds = {f["kind"] for f in summary["faults"]}
    assert len(summary["faults"]) == 5 and kinds & {"cut", "split", "delay"}, report
