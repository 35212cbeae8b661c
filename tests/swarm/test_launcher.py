"""How a swarm's torch processes wait between OpenMP parallel regions: `swarm-peer` spins briefly
(set before its daemon starts), the local process manager has peers that share a machine's cores
sleep at once, and an environment that chose its own wait keeps it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import swarm.daemon
from swarm import launcher
from swarm.launcher import OPENMP_WAIT_ALONE, OPENMP_WAIT_CHOICES, OPENMP_WAIT_SHARED, openmp_wait
from swarm.local import PeerProcess

SHOW_WAIT = [sys.executable, "-c", f"import os; print([os.environ.get(n) for n in {OPENMP_WAIT_CHOICES!r}])"]


@pytest.fixture
def unchosen(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No wait chosen in the environment, and whatever the test sets (`launcher.main` too) undone after."""
    for name in OPENMP_WAIT_CHOICES:
        monkeypatch.setenv(name, "recorded")  # so that teardown restores the variable's first state
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_process_alone_spins_briefly_one_sharing_cores_sleeps_at_once() -> None:
    assert openmp_wait({"PATH": "/bin"}) == {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "1"}
    assert openmp_wait({"PATH": "/bin"}, shared_cores=True) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name, value in [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "0"), ("KMP_BLOCKTIME", "200")]:
        assert openmp_wait({name: value}) == {}
        assert openmp_wait({name: value}, shared_cores=True) == {}


@pytest.mark.parametrize("chosen", [None, ("OMP_WAIT_POLICY", "ACTIVE")])
def test_swarm_peer_sets_the_wait_before_the_daemon_starts(
    unchosen: pytest.MonkeyPatch, chosen: tuple[str, str] | None
) -> None:
    if chosen is not None:
        unchosen.setenv(*chosen)
    seen: dict[str, str | None] = {}

    def daemon() -> int:
        seen.update({name: os.environ.get(name) for name in OPENMP_WAIT_CHOICES})
        return 7

    unchosen.setattr(swarm.daemon, "main", daemon)
    assert launcher.main() == 7
    want = {name: None for name in OPENMP_WAIT_CHOICES}
    want.update(OPENMP_WAIT_ALONE if chosen is None else dict([chosen]))
    assert seen == want


@pytest.mark.parametrize(
    ("shared", "chosen", "want"),
    [
        (True, None, OPENMP_WAIT_SHARED),
        (False, None, OPENMP_WAIT_ALONE),
        (True, ("GOMP_SPINCOUNT", "5"), {"GOMP_SPINCOUNT": "5"}),
    ],
)
def test_a_local_peer_is_started_with_the_wait_for_its_cores(
    tmp_path: Path, unchosen: pytest.MonkeyPatch, shared: bool, chosen: tuple[str, str] | None, want: dict[str, str]
) -> None:
    if chosen is not None:
        unchosen.setenv(*chosen)
    peer = PeerProcess("p", [], tmp_path, named=False, command=SHOW_WAIT, shared_cores=shared).start()
    assert peer.proc is not None
    assert peer.proc.wait(timeout=60) == 0
    assert peer.log().strip() == str([want.get(name) for name in OPENMP_WAIT_CHOICES])


def test_the_launcher_runs_as_a_module_where_the_script_is_not_installed() -> None:
    """`swarm.local.peer_command`'s fallback: `python -m swarm.launcher` is `swarm-peer`."""
    done = subprocess.run([sys.executable, "-m", "swarm.launcher", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--threads" in done.stdout
