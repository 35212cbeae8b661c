"""What every benchmark shares: logging to stderr, a local swarm of `swarm-peer` processes on one
model (`Swarm`, over `swarm.local`), streamed and whole completions timed from the client's side,
medians and rates, and the JSON report and bar plots each mode writes."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.models import BenchModel
    from swarm.local import PeerProcess

BENCH = Path(__file__).resolve().parent.parent / "bench.py"  # the script the children run as
MEMORY_SLACK = 1.2  # allowed RSS growth per byte of weights
MIB = 1024 * 1024
STREAM_TIMEOUT_S = 300.0  # one socket read of the stream; a failover that takes longer is a failure


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def proc_status_bytes(*fields: str, pid: int | str = "self") -> dict[str, int]:
    """Fields of a process's /proc/<pid>/status given in kB (this process's by default), in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0]) * 1024
    return values


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


def decode_rate(arrivals: list[float]) -> float | None:
    """Tokens per second after the first: how fast a stream decodes."""
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return None
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def median_interval(arrivals: list[float]) -> float | None:
    """The median time between consecutive chunks: the normal per-token time."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return statistics.median(gaps) if gaps else None


class Swarm:
    """A local swarm of `peers` processes on one model (a `swarm.local.Swarm`); stopped on exit."""

    def __init__(
        self,
        model: BenchModel,
        peers: int,
        threads: int,
        config: Path,
        device: str = "cpu",
        extra_args: tuple[str, ...] = (),
        command: list[str] | None = None,
    ) -> None:
        self.model, self.count, self.threads, self.config, self.device = model, peers, threads, config, device
        self.extra_args = extra_args  # more flags for every peer
        self.command = command  # how to start a peer (default: `swarm-peer`)
        self.tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
        self.peers: list[PeerProcess] = []
        self.status: dict[str, Any] = {}

    def __enter__(self) -> Swarm:
        from swarm.local import Swarm as Peers

        extra = (*self.model.peer_args(), "--device", self.device, *self.extra_args)
        caps: dict[str, int | None] = dict(self.model.even_caps(self.count))
        log(f"swarm: {self.count} peer(s) on {self.device}, caps {list(caps.values())} MiB, "
            f"{self.threads} thread(s) each …")  # fmt: skip
        try:
            swarm = Peers(self.tmp, self.config, caps, threads=self.threads, extra_args=extra, peers=self.peers,
                          command=self.command)  # fmt: skip
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
        profile = self.model.profile()
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


def standby_rss(model: BenchModel, threads: int, config: Path, device: str = "cpu") -> int:
    """The resident memory of a `swarm-peer` that holds no layer (its cap is below one layer's): the
    runtime's base, to which a serving peer adds its share of the weights."""
    from swarm.local import PeerProcess, wait_for

    tmp = Path(tempfile.mkdtemp(prefix="swarm-standby-"))
    args = ["--config", str(config), "--port", "0", "--max-memory-mb", "16", "--no-mdns", "--state-dir", str(tmp / "s")]
    args += [*model.peer_args(), "--device", device]
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


def peer_metrics(url: str) -> dict[str, float]:
    """A peer's /metrics samples, by name with labels."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=STREAM_TIMEOUT_S) as resp:
        text = resp.read().decode()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line and not line.startswith("#"))}  # fmt: skip


def config_with(args: argparse.Namespace, name: str, **sections: dict[str, Any]) -> Path:
    """The peers' config (`--config`, else the shipped one) with `sections` laid over it, written to
    `<out>/<name>.yaml`."""
    import yaml

    from peer.config import read_config_file

    raw: dict[str, Any] = read_config_file(str(swarm_config(args)))
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    path = Path(args.out) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def swarm_config(args: argparse.Namespace) -> Path:
    from peer.config import default_config_path

    return Path(args.config) if args.config else default_config_path()


def print_pairs(rows: list[dict[str, Any]], unit: str, digits: int) -> None:
    print(f"{'model':>20} {'peers':>5} {'baseline':>9} {'swarm':>9} {'ratio':>6} {'same text':>9}   "
          f"({unit}, medians; ratio: median of swarm / baseline over the pairs of runs; same text: "
          f"runs whose words equal the baseline's)")  # fmt: skip
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        b, w = (f"{v:.{digits}f}" if v is not None else "-" for v in (r["baseline"], r["swarm"]))
        print(f"{r['model']:>20} {r['peers']:>5} {b:>9} {w:>9} {ratio:>6} {r['same_text']:>4}/{len(r['runs'])}")


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
