"""Chaos run: start a swarm of `swarm-peer` processes on 127.0.0.1, stream concurrent greedy
requests through random peers, and for a bounded time inject random faults into any peer, the
leader included: SIGKILL (restarted a little later), SIGSTOP held past the dead timeout then
SIGCONT, and restart (SIGTERM, then start again). Afterwards it heals everything and checks the
fault-tolerance invariants, printing each with its evidence:

- every request ended exactly once: with its full output, equal to an undisturbed greedy run of
  the same prompt, or with an explicit error (an HTTP error status or an SSE error event); a
  stream cut short counts only when its entry peer was itself killed or restarted meanwhile;
- at most one leader per term (from every peer's log and from polling their status);
- terms never decreased on any peer (same sources, across restarts);
- all peers converged on one ready layer map, with one leader, within a bound after the last fault;
  then every peer answers a request correctly.

    python scripts/chaos.py --duration 180 --seed 1

Exit status 0 when every invariant holds, 1 when one does not, 2 when the swarm never formed.
Peers, logs and state live in a temporary directory, kept (and named) when an invariant fails."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peer.config import default_config_path, read_config_file
from swarm.auth import write_new_swarm_key
from swarm.local import PeerProcess, wait_for

PROMPTS = [
    "The history of the printing press",
    "Explain why the sky is blue.",
    "A short poem about the sea:",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
    "Paris is the capital of",
]
# Control-plane timings of the run: a fault is noticed and healed in seconds.
DEAD_AFTER_S = 4.0
TIMINGS: dict[str, dict[str, float]] = {
    "gossip": {"interval_s": 0.5, "suspect_after_s": 2.0, "dead_after_s": DEAD_AFTER_S, "request_timeout_s": 2.0},
    "election": {"startup_grace_s": 1.5, "timeout_min_s": 0.4, "timeout_max_s": 0.8, "coordinator_timeout_s": 2.0},
    "serving": {"recovery_timeout_s": 45.0, "hop_check_after_s": 1.0},
    "partition": {"kv_reserve_tokens": 256},
}
TERM_LINES = [
    re.compile(r"incarnation \d+, term (\d+),"),
    re.compile(r"elected leader for term (\d+)"),
    re.compile(r"leader is \S+ \(\S+\) for term (\d+)|leader is \S+ for term (\d+)"),
]
ELECTED = re.compile(r"elected leader for term (\d+)")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=3, help="swarm size (default 3)")
    p.add_argument(
        "--caps-mb", default="400,450,500", help="memory cap of each peer, MiB (default: any two hold SmolLM2)"
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    p.add_argument("--fault-gap", default="4,10", help="seconds between faults, MIN,MAX (default 4,10)")
    p.add_argument(
        "--max-down", type=int, default=1, help="peers down (killed or stopped) at once, at most (default 1)"
    )
    p.add_argument("--clients", type=int, default=3, help="concurrent streaming clients (default 3)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per request (default 24)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"distinct prompts, 1 to {len(PROMPTS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the faults and the requests (default 0)")
    p.add_argument("--converge-timeout", type=float, default=90.0, help="bound on convergence after healing, s")
    p.add_argument("--request-timeout", type=float, default=180.0, help="a request not ended by then has hung, s")
    p.add_argument("--config", default=str(default_config_path()), help="base YAML config of the peers")
    p.add_argument("--model", help="model spec (default: the config's)")
    p.add_argument("--cache-dir", help="model cache directory (default: the config's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    p.add_argument("--out", help="write the summary as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the peers' logs and state even when all holds")
    return p.parse_args(argv)


# ---- the swarm -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Swarm:
    """The peers on fixed ports, each a seed of the others, so a restarted peer finds its way back."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        caps = [int(c) for c in args.caps_mb.split(",")]
        if len(caps) != args.peers:
            raise SystemExit(f"--caps-mb names {len(caps)} caps for {args.peers} peers")
        raw = read_config_file(Path(args.config))
        for section, values in TIMINGS.items():
            raw.setdefault(section, {}).update(values)
        if args.cache_dir:
            raw.setdefault("store", {})["cache_dir"] = args.cache_dir
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        write_new_swarm_key(workdir / "swarm.key")
        ports = [free_port() for _ in caps]
        self.peers: list[PeerProcess] = []
        for i, (cap, port) in enumerate(zip(caps, ports, strict=True)):
            name = f"p{i}"
            peer_args = ["--config", str(config), "--port", str(port), "--max-memory-mb", str(cap), "--no-mdns"]
            peer_args += ["--state-dir", str(workdir / name), "--swarm-key-file", str(workdir / "swarm.key")]
            peer_args += [a for j, p in enumerate(ports) if j != i for a in ("--join", f"127.0.0.1:{p}")]
            if args.model:
                peer_args += ["--model", args.model]
            self.peers.append(PeerProcess(name, peer_args, workdir, args.threads))
        self.down: dict[str, str] = {}  # peer name -> "killed" or "stopped"
        self.lock = threading.Lock()
        self._streak = 0  # for settled()
        self._last: dict[str, Any] | None = None

    def start(self) -> None:
        for p in self.peers:
            p.start()
        for p in self.peers:
            p.wait_url()

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {p.name: s for p in self.peers if (s := p.status(timeout_s=2.0)) is not None}

    def settled(self, polls: int = 5) -> dict[str, Any] | None:
        """`converged`, with the same map and leader on `polls` polls in a row: not a passing agreement."""
        view = self.converged()
        self._streak = self._streak + 1 if view is not None and view == self._last else int(view is not None)
        self._last = view
        return view if self._streak >= polls else None

    def converged(self) -> dict[str, Any] | None:
        """One ready map, one leader and every peer alive, as every peer sees it; None until then."""
        found = self.statuses()
        if len(found) != len(self.peers):
            return None
        maps = {json.dumps(s["layer_map"], sort_keys=True) for s in found.values()}
        views = {(s["term"], s["leader"]) for s in found.values()}
        everyone = all(
            len(s["peers"]) == len(self.peers) and all(m["state"] == "alive" for m in s["peers"])
            for s in found.values()
        )
        ready = all(s["ready"] and s["layer_map"] for s in found.values())
        if len(maps) == 1 and len(views) == 1 and everyone and ready:
            one = next(iter(found.values()))
            return {"epoch": one["layer_map"]["epoch"], "term": one["term"], "leader": one["leader"]}
        return None

    def stop(self) -> None:
        for p in self.peers:
            p.stop()


# ---- requests ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one request ended."""

    client: int
    entry: str
    prompt: int
    started: float
    ended: float = 0.0
    kind: str = ""  # running, ok, error, lost, wrong, hang, twice; lost/error_with_entry are excused
    detail: str = ""
    tokens: int = 0


def stream(url: str, body: dict[str, Any], timeout_s: float) -> tuple[str, list[str], int]:
    """POST a streaming completion; (text, endings, chunks): every finish_reason, error and [DONE] seen."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    text, endings, chunks = "", [], 0
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                endings.append("[DONE]")
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                endings.append(f"error: {event['error'].get('message')}")
                continue
            for choice in event.get("choices", []):
                chunks += 1
                text += choice.get("text", "")
                if choice.get("finish_reason"):
                    endings.append(f"finish: {choice['finish_reason']}")
    return text, endings, chunks


def run_request(url: str, body: dict[str, Any], expected: str | None, timeout_s: float, outcome: Outcome) -> None:
    """Run one request and classify how it ended (entry-peer faults are judged later)."""
    try:
        text, endings, outcome.tokens = stream(url, body, timeout_s)
    except urllib.error.HTTPError as e:
        outcome.kind, outcome.detail = "error", f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
    except TimeoutError as e:
        outcome.kind, outcome.detail = "hang", f"no end within {timeout_s} s: {e}"
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, reset, cut short
        outcome.kind, outcome.detail = "lost", f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    else:
        finals = [e for e in endings if e != "[DONE]"]
        if len(finals) > 1 or endings.count("[DONE]") > 1:
            outcome.kind, outcome.detail = "twice", f"endings {endings}"
        elif len(finals) != 1 or endings[-1:] != ["[DONE]"]:
            outcome.kind, outcome.detail = "lost", f"endings {endings}"
        elif finals[0].startswith("error"):
            outcome.kind, outcome.detail = "error", finals[0]
        elif expected is not None and text != expected:
            outcome.kind, outcome.detail = "wrong", f"{text!r} != {expected!r}"
        else:
            outcome.kind = "ok"
    outcome.ended = time.monotonic()


class Clients:
    """Streaming clients, each sending one request after another to a random peer."""

    def __init__(self, swarm: Swarm, args: argparse.Namespace, expected: list[str], rng: random.Random) -> None:
        self.swarm, self.args, self.expected = swarm, args, expected
        self.seeds = [rng.randrange(1 << 30) for _ in range(args.clients)]
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(args.clients)]

    def _loop(self, client: int) -> None:
        rng = random.Random(self.seeds[client])
        while not self.stopping.is_set():
            peer = rng.choice(self.swarm.peers)
            prompt = rng.randrange(len(self.expected))
            if peer.url is None:
                continue
            outcome = Outcome(client, peer.name, prompt, time.monotonic(), kind="running")
            with self.swarm.lock:
                self.outcomes.append(outcome)  # recorded before it runs, so a hang is seen too
            body = {"prompt": PROMPTS[prompt], "max_tokens": self.args.max_tokens, "temperature": 0}
            run_request(peer.url, body, self.expected[prompt], self.args.request_timeout, outcome)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout_s: float) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=timeout_s)


# ---- observation ---------------------------------------------------------------------------------


class Monitor:
    """Polls every peer's status: terms per peer id over time, and who claims to lead each term."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.terms: dict[str, list[int]] = defaultdict(list)  # peer id -> terms seen, in order
        self.leaders: dict[int, set[str]] = defaultdict(set)  # term -> peers whose status said "leader"
        self.names: dict[str, str] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.wait(0.25):  # the polling period
            for s in self.swarm.statuses().values():
                self.names[s["peer_id"]] = s["node_id"]
                self.terms[s["peer_id"]].append(s["term"])
                if s["role"] == "leader":
                    self.leaders[s["term"]].add(s["peer_id"])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def log_terms(peer: PeerProcess) -> tuple[list[int], list[int]]:
    """From a peer's log over all its launches: every term it reported, in order, and the terms it won."""
    seen, won = [], []
    for line in peer.full_log().splitlines():
        for pattern in TERM_LINES:
            match = pattern.search(line)
            if match:
                seen.append(int(next(g for g in match.groups() if g is not None)))
                break
        elected = ELECTED.search(line)
        if elected:
            won.append(int(elected.group(1)))
    return seen, won


# ---- faults --------------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    kind: str  # kill, stop, restart
    peer: str
    leader: bool
    healed: float = 0.0


@dataclass
class Faults:
    done: list[Fault] = field(default_factory=list)
    pending: list[threading.Thread] = field(default_factory=list)


def inject(swarm: Swarm, args: argparse.Namespace, rng: random.Random, dead_after_s: float) -> Faults:
    """Random faults for `args.duration` seconds; each heals itself in the background."""
    faults = Faults()
    low, high = (float(x) for x in args.fault_gap.split(","))
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        time.sleep(rng.uniform(low, high))  # the pace of the faults: the workload, not a synchronisation
        with swarm.lock:
            up = [p for p in swarm.peers if p.name not in swarm.down]
            if len(swarm.down) >= args.max_down or not up:
                continue
            found = swarm.statuses()
            leader_id = next((s["leader"] for s in found.values() if s.get("leader")), None)
            leader = next((p for p in up if found.get(p.name, {}).get("peer_id") == leader_id), None)
            target = leader if leader is not None and rng.random() < 0.35 else rng.choice(up)
            kind = rng.choice(["kill", "stop", "restart"])
            fault = Fault(time.monotonic(), kind, target.name, target is leader)
            faults.done.append(fault)
            swarm.down[target.name] = kind
        log(f"fault: {kind} {target.name}{' (the leader)' if fault.leader else ''}")
        if kind == "kill":
            target.kill()
            heal = threading.Thread(target=_restart_later, args=(swarm, target, fault, rng.uniform(1.0, 6.0)))
        elif kind == "stop":
            target.signal(signal.SIGSTOP)
            wait = dead_after_s + rng.uniform(1.0, 4.0)
            heal = threading.Thread(target=_continue_later, args=(swarm, target, fault, wait))
        else:
            target.stop()
            heal = threading.Thread(target=_restart_later, args=(swarm, target, fault, 0.0))
        heal.start()
        faults.pending.append(heal)
    return faults


def _restart_later(swarm: Swarm, peer: PeerProcess, fault: Fault, delay_s: float) -> None:
    time.sleep(delay_s)  # how long the peer stays down: part of the fault
    peer.start()
    try:
        peer.wait_url(timeout_s=120)
    finally:
        with swarm.lock:
            swarm.down.pop(peer.name, None)
            fault.healed = time.monotonic()
    log(f"healed: {peer.name} restarted")


def _continue_later(swarm: Swarm, peer: PeerProcess, fault: Fault, delay_s: float) -> None:
    time.sleep(delay_s)  # held past the dead timeout: part of the fault
    peer.signal(signal.SIGCONT)
    with swarm.lock:
        swarm.down.pop(peer.name, None)
        fault.healed = time.monotonic()
    log(f"healed: {peer.name} continued")


# ---- the run -------------------------------------------------------------------------------------


def judge(outcomes: list[Outcome], faults: list[Fault]) -> list[str]:
    """Violations among the requests: a wrong text, a hang, two endings, a stream lost (refused or
    cut short) while its entry peer was up, or an error where the swarm owed the client a pause
    (the survivors could hold the model)."""
    violations = []
    now = time.monotonic()
    for o in outcomes:
        ended = o.ended or now
        entry_down = any(
            f.peer == o.entry and f.kind in ("kill", "restart") and f.at <= ended and o.started <= (f.healed or ended)
            for f in faults
        )
        if o.kind == "running":
            o.kind, o.detail = "hang", "still running when the run ended"
        elif o.kind in ("lost", "error") and entry_down:  # nothing but its own entry peer could answer it
            o.kind += "_with_entry"
            continue
        elif o.kind == "error" and "cannot hold the model" in o.detail:
            continue  # the explicit error the design allows: too many peers down at once
        if o.kind != "ok":
            violations.append(f"request to {o.entry} (client {o.client}, prompt {o.prompt}): {o.kind}: {o.detail}")
    return violations


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="swarm-chaos-"))
    swarm = Swarm(args, workdir)
    summary: dict[str, Any] = {"args": vars(args), "workdir": str(workdir)}
    violations: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        log(f"starting {args.peers} peers in {workdir}")
        swarm.start()
        try:
            first = wait_for(swarm.settled, 300, "the swarm to form")
        except AssertionError as e:
            log(str(e))
            return 2
        log(f"swarm ready: epoch {first['epoch']}, term {first['term']}")
        expected = []
        for prompt in PROMPTS[: max(1, args.prompts)]:
            body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
            text, endings, _ = stream(str(swarm.peers[0].url), body, args.request_timeout)
            if len(endings) != 2 or not endings[0].startswith("finish") or endings[1] != "[DONE]":
                log(f"the undisturbed run of {prompt!r} failed: {endings}")
                return 2
            expected.append(text)
        log(f"undisturbed outputs of {len(expected)} prompt(s) recorded; faults for {args.duration:g} s")

        monitor = Monitor(swarm)
        monitor.start()
        clients = Clients(swarm, args, expected, rng)
        clients.start()
        faults = inject(swarm, args, rng, DEAD_AFTER_S)
        for heal in faults.pending:
            heal.join(timeout=180)
        last_fault = max([f.healed or f.at for f in faults.done], default=time.monotonic())
        log("last fault healed; waiting for the swarm to converge")
        try:
            final = wait_for(swarm.settled, args.converge_timeout, "convergence on one map after the last fault")
            converge_s = time.monotonic() - last_fault
            log(f"converged in {converge_s:.1f} s: epoch {final['epoch']}, term {final['term']}")
        except AssertionError as e:
            final, converge_s = None, None
            violations.append(str(e))
        clients.finish(args.request_timeout + 30)
        monitor.stop()

        # Service is whole again: every peer answers every prompt correctly.
        after = []
        for p in swarm.peers:
            body = {"prompt": PROMPTS[0], "max_tokens": args.max_tokens, "temperature": 0}
            outcome = Outcome(-1, p.name, 0, time.monotonic())
            run_request(str(p.url), body, expected[0], args.request_timeout, outcome)
            after.append(outcome)
            if outcome.kind != "ok":
                violations.append(f"after healing, {p.name} answered {outcome.kind}: {outcome.detail}")

        violations += judge(clients.outcomes, faults.done)
        term_report = check_terms(swarm, monitor, violations)
        counts = Counter(o.kind for o in clients.outcomes)
        summary.update(
            faults=[asdict(f) for f in faults.done],
            fault_counts=dict(Counter(f"{f.kind}{' leader' if f.leader else ''}" for f in faults.done)),
            requests=dict(counts),
            requests_total=len(clients.outcomes),
            not_ok=[asdict(o) for o in clients.outcomes if o.kind != "ok"],
            converge_s=converge_s,
            final=final,
            terms=term_report,
            violations=violations,
        )
        report(summary)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
        return 1 if violations else 0
    finally:
        swarm.stop()
        if violations or args.keep:
            log(f"logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def check_terms(swarm: Swarm, monitor: Monitor, violations: list[str]) -> dict[str, Any]:
    """At most one leader per term, and no peer's term ever going back."""
    winners: dict[int, set[str]] = defaultdict(set)
    for p in swarm.peers:
        seen, won = log_terms(p)
        for term in won:
            winners[term].add(p.name)
        back = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
        if back:
            violations.append(f"{p.name}'s term went back in its log: {back[:3]}")
    for peer_id, terms in monitor.terms.items():
        back = [(a, b) for a, b in itertools.pairwise(terms) if b < a]
        if back:
            violations.append(f"{monitor.names.get(peer_id, peer_id)}'s status term went back: {back[:3]}")
    for term, names in sorted(winners.items()):
        if len(names) > 1:
            violations.append(f"term {term} was won by {sorted(names)} (logs)")
    for term, ids in sorted(monitor.leaders.items()):
        if len(ids) > 1:
            violations.append(f"term {term} had leaders {sorted(monitor.names.get(i, i) for i in ids)} (status)")
    return {
        "leaders_by_term": {t: sorted(n) for t, n in sorted(winners.items())},
        "status_samples": sum(len(t) for t in monitor.terms.values()),
    }


def report(summary: dict[str, Any]) -> None:
    print(f"faults: {len(summary['faults'])} ({', '.join(f'{k} {v}' for k, v in summary['fault_counts'].items())})")
    print(f"requests: {summary['requests_total']} ({', '.join(f'{k} {v}' for k, v in summary['requests'].items())})")
    terms = summary["terms"]["leaders_by_term"]
    print("leaders by term: " + ", ".join(f"{t}: {'/'.join(n)}" for t, n in terms.items()))
    converge = summary["converge_s"]
    print(f"converged after the last fault in: {'never' if converge is None else f'{converge:.1f} s'}")
    checks = [
        ("every request ended exactly once, with its full correct output or an explicit error", "request"),
        ("at most one leader per term", "term "),
        ("terms never decreased on any peer", "went back"),
        ("all peers converged on one layer map", "convergence"),
        ("every peer answered correctly after healing", "after healing"),
    ]
    for text, marker in checks:
        broken = [v for v in summary["violations"] if marker in v]
        print(f"{'FAIL' if broken else 'ok  '} {text}")
        for v in broken[:10]:
            print(f"       {v}")
    print("invariants: " + ("all hold" if not summary["violations"] else f"{len(summary['violations'])} violation(s)"))


if __name__ == "__main__":
    sys.exit(main())
