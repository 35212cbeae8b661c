"""The `swarm-peer` console script. Before torch is imported it sets how OpenMP's worker threads
wait between parallel regions (unless the environment already chose, see `openmp_wait`): they spin
about a millisecond before they sleep, which suits a peer alone on its machine (`swarm.local`
starts peers that share one machine's cores with OMP_WAIT_POLICY=PASSIVE). Then it runs the
daemon, and when the daemon has stopped (its state saved, its sockets closed, its log flushed) it
leaves without the interpreter's teardown: freeing the native state of torch and the model at exit
took 2-3 s, and a stopped peer should be gone at once. Nothing else lives here, because anything
imported before this point would load torch too early."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

# A peer that has its machine's cores to itself: after a parallel region its workers spin about a
# millisecond, then sleep. A forward pass's operations follow one another closely, and a worker
# that sleeps between two of them costs the next a wake-up: on the 2-core VM measured, the tiny
# model's token took 2.6-3.5 ms in one process whose workers sleep at once and 1.7-2.4 ms with
# this spin. The runtimes' own defaults spin far longer (GNU: 300,000 spins, 8 ms here; LLVM and
# Intel: 200 ms). GNU libgomp counts spins (30,000 burnt 1.3-1.6 ms here), LLVM's and Intel's
# OpenMP count milliseconds. Sources: the libgomp manual (GOMP_SPINCOUNT), LLVM's OpenMP runtime
# (KMP_BLOCKTIME).
OPENMP_WAIT_ALONE = {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "1"}
# Peers that share one machine's cores take turns: a stage that finished must not spin on the
# cores the next stage needs (3 bfloat16 peers on 2 cores: 0.90 of one process with the spin
# above, 1.02 with workers that sleep at once).
OPENMP_WAIT_SHARED = {"OMP_WAIT_POLICY": "PASSIVE"}
OPENMP_WAIT_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any set: the environment chose


def openmp_wait(env: Mapping[str, str], *, shared_cores: bool = False) -> dict[str, str]:
    """The variables to add to `env` for a torch process of the swarm (read once, when torch
    loads OpenMP): OPENMP_WAIT_SHARED where it shares the machine's cores with other peers,
    OPENMP_WAIT_ALONE where it does not, and nothing where `env` already sets a wait of its own."""
    if any(name in env for name in OPENMP_WAIT_CHOICES):
        return {}
    return dict(OPENMP_WAIT_SHARED if shared_cores else OPENMP_WAIT_ALONE)


def main() -> int:
    os.environ.update(openmp_wait(os.environ))
    from swarm.daemon import main as daemon_main

    return daemon_main()


def run() -> None:
    """The console script: `main`, then out at once (see the module's docstring)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
