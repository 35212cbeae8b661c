"""The `swarm-peer` console script. Before torch is imported it sets OpenMP's wait policy to passive
(unless the environment already chose one): a torch process whose worker threads spin while they
wait steals cores from every other process on the machine, and a swarm's peers are often several
processes on one machine, taking turns. Then it runs the daemon. Nothing else lives here, because
anything imported before this point would load torch too early."""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP runtime
    from swarm.daemon import main as daemon_main

    return daemon_main()


if __name__ == "__main__":
    raise SystemExit(main())
