"""Chaos run: start a swarm of `swarm-peer` processes, on 127.0.0.1 or (`--testbed`) one per host
of the network test bed, stream concurrent greedy requests through random peers, and inject a
number of random faults into any peer, the leader included: SIGKILL (restarted a little later),
SIGSTOP held past the dead timeout then SIGCONT, and restart (SIGTERM, then start again); on the
test bed also a host's cable cut and healed, a split of the hosts into two groups and their
joining, and a delay spike on the link to one peer (each peer sits behind a delaying relay).
Afterwards it heals everything and checks the fault-tolerance invariants, printing each with its
evidence:

- every request ended exactly once: with its full output, equal to an undisturbed greedy run of
  the same prompt, or with an explicit error (an HTTP error status or an SSE error event); a
  stream cut short counts only when its entry peer was itself killed or restarted meanwhile, and
  an error only when it says the swarm cannot hold the model while a fault was under way, or
  within the convergence bound after it healed;
- at most one leader per term on each side of the network (Bully has no quorum: during a split
  each side may elect its own), from polling every peer's status, and from the peers' logs when
  the run split nothing;
- terms never decreased on any peer (same sources, across restarts);
- all peers converged on one ready layer map, with one leader, within a bound after the last fault;
  then every peer answers a request correctly.

    python scripts/chaos.py --faults 10 --seed 1
    python scripts/chaos.py --testbed --faults 10 --seed 1     # as root: network faults too

The run ends after `--faults` faults, or at `--max-duration`, a cap that only a stuck run reaches.
Exit status 0 when every invariant holds, 1 when one does not, 2 when the swarm never formed.
Peers, logs and state live in a temporary directory, kept (and named) when an invariant fails."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peer.config import default_config_path, read_config_file
from swarm.config import convergence_bound_s, swarm_config_from_dict
from swarm.local import PEER_PORT, PeerProcess, Swarm, stream_completion, wait_for, write_config
from swarm.testbed import TestBed, unavailable

PROMPTS = [
    "The history of the printing press",
    "Explain why the sky is blue.",
    "A short poem about the sea:",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
    "Paris is the capital of",
]
# The shared fast timings (swarm.local.FAST_TIMINGS), with room for the replays of a busy swarm.
SERVING = {"recovery_timeout_s": 45.0, "hop_check_after_s": 1.0}
KV_RESERVE_TOKENS = 256
PROCESS_FAULTS = ("kill", "stop", "restart")
NETWORK_FAULTS = ("cut", "split", "delay")
DELAY_SPIKE_S = (0.05, 0.3)  # one-way delay of a spike, seconds
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
    p.add_argument("--faults", type=int, default=6, help="faults to inject (default 6)")
    p.add_argument("--max-duration", type=float, default=900.0,
                   help="a cap on the seconds of faults, should --faults take longer (default 900)")  # fmt: skip
    p.add_argument("--fault-gap", default="4,10", help="seconds between faults, MIN,MAX (default 4,10)")
    p.add_argument("--testbed", action="store_true",
                   help="one peer per host of the network test bed (root only), and network faults too")  # fmt: skip
    p.add_argument(
        "--max-down", type=int, default=1, help="peers down (killed, stopped or cut off) at once, at most (default 1)"
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


class ChaosSwarm:
    """The peers (a `swarm.local.Swarm`: on loopback each a seed of the others on fixed ports, so a
    restarted peer finds its way back; on the test bed found over mDNS, each behind a relay), which
    of them are down, and how the network is divided."""

    def __init__(self, args: argparse.Namespace, workdir: Path, bed: TestBed | None) -> None:
        caps = [int(c) for c in args.caps_mb.split(",")]
        if len(caps) != args.peers:
            raise SystemExit(f"--caps-mb names {len(caps)} caps for {args.peers} peers")
        base = read_config_file(Path(args.config))
        store = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        self.config = write_config(workdir / "config.yaml", base, serving=SERVING, store=store,
                                   partition={"kv_reserve_tokens": KV_RESERVE_TOKENS})  # fmt: skip
        self.bed = bed
        self.stack = contextlib.ExitStack()
        hosts = bed.hosts[: args.peers] if bed else []
        self.relays = {f"p{i}": self.stack.enter_context(bed.relay(h, PEER_PORT)) for i, h in enumerate(hosts) if bed}
        names: dict[str, int | None] = {f"p{i}": cap for i, cap in enumerate(caps)}
        model = ("--model", args.model) if args.model else ()
        self.local = Swarm(workdir, self.config, names, hosts=hosts or None, seeds="mdns" if bed else "all",
                           threads=args.threads, behind_relays=bed is not None, extra_args=model)  # fmt: skip
        self.peers = self.local.peers
        self.down: dict[str, str] = {}  # peer name -> the fault it is under (its process, or its host cut off)
        self.groups: list[set[str]] | None = None  # while split: the peers on each side
        self.cut: set[str] = set()  # peers whose host is cut off
        self.lock = threading.Lock()

    def start(self) -> None:
        self.local.start()

    def statuses(self) -> dict[str, dict[str, Any]]:
        return self.local.statuses()

    def settled(self) -> dict[str, Any] | None:
        return self.local.settled()

    def side(self, name: str) -> str:
        """Which side of the network a peer is on now: one for all, or its group, or itself alone."""
        if name in self.cut:
            return f"cut {name}"
        if self.groups is not None:
            return "group a" if name in self.groups[0] else "group b"
        return "all"

    def ask(self, peer: PeerProcess, body: dict[str, Any], timeout_s: float) -> tuple[str, list[str], int]:
        """A streamed completion through `peer`, asked from its own machine (the harness's, or its
        test-bed host: reachable from there even when the host is cut off)."""
        url = str(peer.url)
        if peer.host is None:
            return stream_completion(url, body, timeout_s)
        return peer.host.call(stream_completion, url, body, timeout_s)

    def stop(self) -> None:
        self.local.stop()
        self.stack.close()


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


def run_request(
    swarm: ChaosSwarm, peer: PeerProcess, body: dict[str, Any], expected: str | None, timeout_s: float, outcome: Outcome
) -> None:
    """Run one request and classify how it ended (entry-peer faults are judged later)."""
    try:
        text, endings, outcome.tokens = swarm.ask(peer, body, timeout_s)
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

    def __init__(self, swarm: ChaosSwarm, args: argparse.Namespace, expected: list[str], rng: random.Random) -> None:
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
            run_request(self.swarm, peer, body, self.expected[prompt], self.args.request_timeout, outcome)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout_s: float) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=timeout_s)


# ---- observation ---------------------------------------------------------------------------------


class Monitor:
    """Polls every peer's status: terms per peer id over time, and who claims to lead each term from
    which side of the network."""

    def __init__(self, swarm: ChaosSwarm) -> None:
        self.swarm = swarm
        self.terms: dict[str, list[int]] = defaultdict(list)  # peer id -> terms seen, in order
        # term -> side of the network -> peers whose status said "leader" there
        self.leaders: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.names: dict[str, str] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.wait(0.25):  # the polling period
            for name, s in self.swarm.statuses().items():
                self.names[s["peer_id"]] = s["node_id"]
                self.terms[s["peer_id"]].append(s["term"])
                if s["role"] == "leader":
                    self.leaders[s["term"]][self.swarm.side(name)].add(s["peer_id"])

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
    kind: str  # kill, stop, restart; cut, split, delay
    peer: str  # the peer it struck (for a split: the peers of the smaller group, joined by +)
    leader: bool
    healed: float = 0.0


@dataclass
class Faults:
    done: list[Fault] = field(default_factory=list)
    pending: list[threading.Thread] = field(default_factory=list)


def inject(swarm: ChaosSwarm, args: argparse.Namespace, rng: random.Random, dead_after_s: float) -> Faults:
    """`args.faults` random faults, or as many as `args.max_duration` allows; each heals itself in
    the background."""
    faults = Faults()
    low, high = (float(x) for x in args.fault_gap.split(","))
    kinds = PROCESS_FAULTS + (NETWORK_FAULTS if swarm.bed else ())
    end = time.monotonic() + args.max_duration
    while len(faults.done) < args.faults and time.monotonic() < end:
        time.sleep(rng.uniform(low, high))  # the pace of the faults: the workload, not a synchronisation
        with swarm.lock:
            up = [p for p in swarm.peers if p.name not in swarm.down]
            if len(swarm.down) >= args.max_down or not up or swarm.groups is not None:
                continue
            found = swarm.statuses()
            leader_id = next((s["leader"] for s in found.values() if s.get("leader")), None)
            leader = next((p for p in up if found.get(p.name, {}).get("peer_id") == leader_id), None)
            target = leader if leader is not None and rng.random() < 0.35 else rng.choice(up)
            kind = rng.choice(kinds)
            name = target.name
            if kind == "split":  # the target and some others apart from the rest
                everyone = [p.name for p in swarm.peers]
                others = [n for n in everyone if n != target.name]
                apart = {target.name, *rng.sample(others, rng.randrange(0, max(1, len(everyone) // 2)))}
                swarm.groups = [set(everyone) - apart, apart]
                name = "+".join(sorted(apart))
            fault = Fault(time.monotonic(), kind, name, target is leader)
            faults.done.append(fault)
            if kind != "delay":
                swarm.down[target.name] = kind
        log(f"fault {len(faults.done)}: {kind} {name}{' (the leader)' if fault.leader else ''}")
        spike = rng.uniform(*DELAY_SPIKE_S)  # drawn here, from the run's seed, like every other choice
        heal = threading.Thread(target=_fault, args=(swarm, target, fault, rng.uniform(1.0, 4.0), dead_after_s, spike))
        heal.start()
        faults.pending.append(heal)
    return faults


def _fault(
    swarm: ChaosSwarm, peer: PeerProcess, fault: Fault, extra_s: float, dead_after_s: float, spike_s: float
) -> None:
    """Make `fault` happen to `peer`, hold it (the sleeps are part of the fault), and heal it."""
    bed = swarm.bed
    if fault.kind == "kill":
        peer.kill()
        time.sleep(extra_s)
        peer.start()
        peer.wait_url(timeout_s=120)
    elif fault.kind == "stop":
        peer.signal(signal.SIGSTOP)
        time.sleep(dead_after_s + extra_s)  # held past the dead timeout
        peer.signal(signal.SIGCONT)
    elif fault.kind == "restart":
        peer.stop()
        peer.start()
        peer.wait_url(timeout_s=120)
    elif fault.kind == "cut" and bed is not None and peer.host is not None:
        with swarm.lock:
            swarm.cut.add(peer.name)
        bed.cut(peer.host)
        time.sleep(dead_after_s + extra_s)
        bed.heal(peer.host)
        with swarm.lock:
            swarm.cut.discard(peer.name)
    elif fault.kind == "split" and bed is not None and swarm.groups is not None:
        hosts = {p.name: p.host for p in swarm.peers}
        bed.split([[hosts[n] for n in sorted(g)] for g in swarm.groups])  # type: ignore[misc]
        time.sleep(dead_after_s + extra_s)
        bed.join()
        with swarm.lock:
            swarm.groups = None
    elif fault.kind == "delay":
        relay = swarm.relays[peer.name]
        relay.set_delay(spike_s)
        time.sleep(2 * extra_s)
        relay.set_delay(0.0)
    with swarm.lock:
        swarm.down.pop(peer.name, None)
        fault.healed = time.monotonic()
    log(f"healed: {fault.kind} {fault.peer}")


# ---- the run -------------------------------------------------------------------------------------


def judge(outcomes: list[Outcome], faults: list[Fault], converge_s: float) -> list[str]:
    """Violations among the requests: a wrong text, a hang, two endings, a stream lost (refused or
    cut short) while its entry peer was up, or an error where the swarm owed the client a pause:
    any error but "cannot hold the model" while a fault was under way or its side had not yet
    merged back (`converge_s` after it healed: a peer split away still sees itself alone until the
    sides take each other back, with --max-down 1 and the default caps the only way to be short)."""
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
        elif (
            o.kind == "error"
            and "cannot hold the model" in o.detail
            and any(f.at <= ended and o.started <= (f.healed or ended) + converge_s for f in faults)
        ):
            continue  # the explicit error the design allows, while a fault left too few peers on its side
        if o.kind != "ok":
            violations.append(f"request to {o.entry} (client {o.client}, prompt {o.prompt}): {o.kind}: {o.detail}")
    return violations


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="swarm-chaos-"))
    if args.testbed and (reason := unavailable()) is not None:
        log(f"--testbed: {reason}")
        return 2
    bed = TestBed(args.peers).start() if args.testbed else None
    swarm = ChaosSwarm(args, workdir, bed)
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
            text, endings, _ = swarm.ask(swarm.peers[0], body, args.request_timeout)
            if len(endings) != 2 or not endings[0].startswith("finish") or endings[1] != "[DONE]":
                log(f"the undisturbed run of {prompt!r} failed: {endings}")
                return 2
            expected.append(text)
        log(f"undisturbed outputs of {len(expected)} prompt(s) recorded; {args.faults} faults to come")

        monitor = Monitor(swarm)
        monitor.start()
        clients = Clients(swarm, args, expected, rng)
        clients.start()
        dead_after_s = float(read_config_file(swarm.config)["gossip"]["dead_after_s"])
        faults = inject(swarm, args, rng, dead_after_s)
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
            run_request(swarm, p, body, expected[0], args.request_timeout, outcome)
            after.append(outcome)
            if outcome.kind != "ok":
                violations.append(f"after healing, {p.name} answered {outcome.kind}: {outcome.detail}")

        bound = convergence_bound_s(swarm_config_from_dict(read_config_file(swarm.config)))
        violations += judge(clients.outcomes, faults.done, bound)
        split = any(f.kind == "split" for f in faults.done)
        term_report = check_terms(swarm, monitor, violations, split)
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
        if bed is not None:
            bed.close()
        if violations or args.keep:
            log(f"logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def check_terms(swarm: ChaosSwarm, monitor: Monitor, violations: list[str], split: bool) -> dict[str, Any]:
    """At most one leader per term on each side of the network, and no peer's term ever going back.
    The logs say who won each term but not from which side: they are judged only when nothing split."""
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
        if len(names) > 1 and not split:
            violations.append(f"term {term} was won by {sorted(names)} (logs)")
    for term, sides in sorted(monitor.leaders.items()):
        for side, ids in sides.items():
            if len(ids) > 1:
                who = sorted(monitor.names.get(i, i) for i in ids)
                violations.append(f"term {term} had leaders {who} on side {side} (status)")
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
        ("at most one leader per term on each side of the network", "term "),
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
