"""The `swarm-peer` console script. Before torch is imported it sets OpenMP's wait policy to passive
(unless the environment already chose one): a torch process whose worker threads spin while they
wait steals cores from every other process on the machine, and a swarm's peers are often several
processes on one machine, taking turns. Then it runs the daemon, and when the daemon has stopped
(its state saved, its sockets closed, its log flushed) it leaves without the interpreter's teardown:
freeing the native state of torch and the model at exit took 2-3 s, and a stopped peer should be
gone at once. Nothing else lives here, because anything imported before this point would load torch
too early."""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP runtime
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
