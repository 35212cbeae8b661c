"""`failover`: starts one `swarm-peer` process per memory cap (three by default) on 127.0.0.1 with
the default model (SmolLM2-135M, fetched once into the user's cache) and, unless `--config` names
another file, the shipped configs/default.yaml, so its gossip timings are the ones users get. It
SIGKILLs the first, middle or last stage while a greedy stream is under way, times the kill to the
next token the client receives, checks the text equals an undisturbed run's, and restarts the
victim before the next kill."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import log, median_interval, timed_stream

if TYPE_CHECKING:
    from swarm.local import PeerProcess

FAILOVER_PROMPT = "The history of the printing press"
FAILOVER_POSITIONS = ("first", "middle", "last")
REJOIN_TIMEOUT_S = 180.0  # a restarted victim loads its stage and the swarm uses every peer again


def failover_times(arrivals: list[float], killed_at: float) -> tuple[float, float] | None:
    """(kill to the next chunk, kill to the chunk that ends the longest wait after the kill); None if
    no chunk came after it. They differ when a token had passed the victim before it died."""
    after = [t for t in arrivals if t > killed_at]
    if not after:
        return None
    gaps = [b - a for a, b in zip([killed_at, *after], after, strict=False)]
    return after[0] - killed_at, after[gaps.index(max(gaps))] - killed_at


def pick_victim(status: dict[str, Any], peers: list[PeerProcess], position: str) -> tuple[PeerProcess, PeerProcess]:
    """The peer at `position` in the layer map and a surviving stage to stream from (the last, or
    the first when the last is the victim)."""
    by_url = {p.url: p for p in peers}
    stages = [by_url[s["url"]] for s in status["layer_map"]["stages"]]
    victim = {"first": stages[0], "middle": stages[len(stages) // 2], "last": stages[-1]}[position]
    return victim, stages[0] if victim is stages[-1] else stages[-1]


def whole_swarm(entry: PeerProcess, peers: list[PeerProcess]) -> dict[str, Any] | None:
    """The entry's status once every peer is alive and holds a ready stage of the layer map."""
    status = entry.status()
    if not status or not status["ready"] or not status["layer_map"]:
        return None
    stages = status["layer_map"]["stages"]
    alive = sum(p["state"] == "alive" for p in status["peers"])
    urls = {p.url for p in peers}
    whole = len(stages) == alive == len(peers) and all(s["url"] in urls for s in stages)
    return status if whole else None


def with_join(args: list[str], url: str) -> list[str]:
    """`args` with its --join replaced by `url`: the seed, restarted, would otherwise join no one
    (no mDNS here), and a restarted peer's port changes, so an old --join may point at nothing."""
    kept = [a for i, a in enumerate(args) if a != "--join" and (i == 0 or args[i - 1] != "--join")]
    return [*kept, "--join", url.removeprefix("http://")]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def kill_mid_stream(
    entry: PeerProcess, victim: PeerProcess, body: dict[str, Any], kill_after: int, expected: str
) -> dict[str, Any]:
    """One measured kill: stream via `entry`, SIGKILL `victim` after `kill_after` chunks, time the
    wait and compare the text with `expected`; a failed stream is recorded, not raised."""
    from peer.errors import SwarmError

    row: dict[str, Any] = {"victim": victim.name, "entry": entry.name}
    replays = entry.log().count("replaying")  # the entry logs one per session it replays
    try:
        streamed = timed_stream(str(entry.url), body, kill_after, victim)
    except (SwarmError, OSError, ValueError) as e:  # an error event, or the stream timed out or broke
        return {**row, "error": f"{type(e).__name__}: {e}"}
    times = failover_times(streamed["arrivals"], streamed["killed_at"] or float("inf"))
    if times is None:
        return {**row, "error": "no chunk came after the kill"}
    row["next_chunk_s"], row["failover_s"] = times
    row["token_interval_s"] = median_interval(streamed["arrivals"][:kill_after])
    row["correct"] = streamed["text"] == expected
    row["replayed"] = entry.log().count("replaying") > replays
    return row


def restart(victim: PeerProcess, entry: PeerProcess, peers: list[PeerProcess]) -> tuple[dict[str, Any], float]:
    """Start `victim` again (same state dir: the same peer, a higher incarnation), joining `entry`;
    the entry's status once the swarm uses every peer again, and how long that took."""
    from swarm.local import wait_for

    victim.kill()  # in case the stream failed before the kill
    victim.args = with_join(victim.args, str(entry.url))
    started = time.perf_counter()
    victim.start().wait_url()
    status = wait_for(
        lambda: whole_swarm(entry, peers),
        REJOIN_TIMEOUT_S,
        f"{victim.name} to rejoin",
        lambda: "\n".join(f"{p.name}: {p.log()[-800:]}" for p in peers),
    )
    return status, time.perf_counter() - started


def print_failover(rows: list[dict[str, Any]], positions: list[str], title: str) -> dict[str, Any]:
    """The table of runs and each position's median, min and max; returns that summary."""
    print(title)
    print("failover: the kill to the chunk after the longest wait; next: the kill to the next chunk; seconds")
    print(f"{'position':>8} {'run':>3} {'victim':>7} {'failover':>8} {'next':>6} {'token':>6} {'rejoin':>6}  correct")
    for r in rows:
        cells = [r.get(k) for k in ("failover_s", "next_chunk_s", "token_interval_s", "rejoin_s")]
        f, n, t, j = ("-" if c is None else f"{c:.{d}f}" for c, d in zip(cells, (2, 2, 3, 1), strict=True))
        verdict = "ERROR" if "error" in r else "yes" if r["correct"] else "NO"
        print(f"{r['position']:>8} {r['run']:>3} {r['victim']:>7} {f:>8} {n:>6} {t:>6} {j:>6}  {verdict}")
    summary = {}
    for position in positions:
        values = [r["failover_s"] for r in rows if r["position"] == position and "failover_s" in r]
        if values:
            summary[position] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
            print(f"{position}: median {statistics.median(values):.2f} s, min {min(values):.2f}, max {max(values):.2f}")
    return summary


def failover(args: argparse.Namespace) -> int:
    """Kill stages of a local swarm mid-stream; time the wait for the next token and check the text."""
    from dataclasses import asdict

    from peer.config import default_config_path, read_config_file
    from peer.errors import SwarmError
    from swarm.config import swarm_config_from_dict
    from swarm.local import start_seeded_swarm

    positions = [p.strip() for p in args.positions.split(",") if p.strip()]
    caps = [int(c) for c in args.caps_mb.split(",")]
    if not positions or any(p not in FAILOVER_POSITIONS for p in positions):
        raise SystemExit(f"--positions takes a comma list of {', '.join(FAILOVER_POSITIONS)}")
    if len(caps) < 3 or args.runs < 1 or not 1 <= args.kill_after < args.max_tokens:
        raise SystemExit("failover needs 3 or more caps, --runs >= 1 and 1 <= --kill-after < --max-tokens")
    config_path = Path(args.config) if args.config else default_config_path()
    config = swarm_config_from_dict(read_config_file(config_path))
    caps_mb = {f"peer-{i + 1}": cap for i, cap in enumerate(caps)}
    body = {"prompt": FAILOVER_PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` of this script stops the peers too

    tmp = Path(tempfile.mkdtemp(prefix="swarm-failover-"))
    peers: list[PeerProcess] = []
    rows: list[dict[str, Any]] = []
    failed, error = True, None
    try:
        log(f"starting {len(caps)} peers (caps {args.caps_mb} MiB, config {config_path}); logs in {tmp}")
        status = start_seeded_swarm(tmp, config_path, caps_mb, peers, args.threads)
        model = status["model"]
        entry = pick_victim(status, peers, "middle")[1]
        undisturbed = timed_stream(str(entry.url), body)
        normal = median_interval(undisturbed["arrivals"])
        log(f"undisturbed run via {entry.name}: {len(undisturbed['arrivals'])} chunks, {normal or 0:.3f} s apart")
        for position in positions:
            for run in range(1, args.runs + 1):
                victim, entry = pick_victim(status, peers, position)
                log(f"{position} run {run}: via {entry.name}, killing {victim.name} after {args.kill_after} chunks")
                row = kill_mid_stream(entry, victim, body, args.kill_after, undisturbed["text"])
                rows.append({"position": position, "run": run, **row})
                if "error" in row:
                    log(f"  error: {row['error']}")
                else:
                    log(f"  failover {row['failover_s']:.2f} s; text {'matches' if row['correct'] else 'DIFFERS'}")
                status, rows[-1]["rejoin_s"] = restart(victim, entry, peers)
                log(f"  {victim.name} restarted; every peer holds a stage again after {rows[-1]['rejoin_s']:.1f} s")
        failed = any("error" in r or not r["correct"] for r in rows)
    except KeyboardInterrupt:
        log("interrupted; stopping the peers")
        return 130
    except (SwarmError, AssertionError) as e:  # AssertionError: a wait_for deadline passed
        error = str(e)
        log(f"error: {e}")
    finally:
        for p in peers:
            p.stop()
        if failed:
            log(f"kept the peers' logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not rows:
        return 1

    title = f"failover, {model['spec']} {model['dtype']}, caps {args.caps_mb} MiB, config {config_path}"
    summary = print_failover(rows, positions, title)
    report = {
        "mode": "failover",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": str(config_path),
        "gossip": asdict(config.gossip),
        "election": asdict(config.election),
        "model": model,
        "caps_mb": caps_mb,
        "threads": args.threads,
        "prompt": FAILOVER_PROMPT,
        "max_tokens": args.max_tokens,
        "kill_after": args.kill_after,
        "undisturbed_token_interval_s": normal,
        "rows": rows,
        "summary": summary,
        "error": error,  # what stopped the runs early, if anything did
    }
    (out / "failover.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'failover.json'}")
    return 1 if failed else 0


# -- the network test bed: delay per hop, and failover from a host cut off -------------------------
