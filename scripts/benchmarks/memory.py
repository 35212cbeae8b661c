"""`memory`: loads stages of growing size, each in a fresh process, reads every weight once (as a
first forward pass would) and checks that the process's resident memory grows with its share:
RSS <= 1.2 x share + the runtime's base. By default it measures a TinyLlama-shaped checkpoint with
random weights, written once into the results directory; it starts no swarm and fetches no model."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import BENCH, MEMORY_SLACK, MIB, log, proc_status_bytes
from benchmarks.models import ensure_checkpoint

CHILD_TIMEOUT_S = 900  # one stage load, TinyLlama-sized at float32, on a slow disk


def load_child(args: argparse.Namespace) -> int:
    """In a fresh process: import the runtime, load stage [start, end) (none if empty), print JSON."""
    import torch

    from peer.checkpoint import open_checkpoint
    from peer.config import StoreConfig
    from peer.model_store import ModelStore
    from peer.profile import ModelProfile
    from peer.quantize import held_bytes, quantize_weight
    from peer.shard import load_stage
    from swarm.stage_host import release_freed_memory

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    files = ModelStore(StoreConfig(cache_dir=args.cache_dir), show_progress=False).resolve(args.model_dir)
    config = files.load_config()
    quantize = getattr(args, "quantize", "none")
    profile = ModelProfile.from_config(config, dtype, quantize)
    if quantize != "none":  # the base a quantizing peer has: the quantization library imported
        quantize_weight(torch.zeros(16, 32), quantize)
    empty = args.end <= args.start  # k = 0: the runtime's base, no stage
    source = open_checkpoint(files, config, dtype)
    try:
        stage = None if empty else load_stage(source, config, args.start, args.end, dtype=dtype, quantize=quantize)
    finally:
        source.close()
    gc.collect()
    release_freed_memory()  # as a peer's stage host does after every load
    loaded = proc_status_bytes("VmRSS")["VmRSS"]
    params = [] if stage is None else list({id(p): p for p in stage.parameters()}.values())
    # Weights loaded at the checkpoint's own dtype are views of its memory map, resident only once
    # read; read every one, as the first forward pass does, so RSS shows what a serving stage holds.
    with torch.no_grad():
        for p in params:
            (p.qdata if hasattr(p, "qdata") else p).sum()
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
        "param_bytes": sum(held_bytes(p) for p in params),
        "share_bytes": 0 if empty else profile.stage_weight_bytes(args.start, args.end),
    }
    print(json.dumps(report))
    return 0


def run_child(
    model_dir: Path, args: argparse.Namespace, start: int, end: int, dtype: str | None = None, quantize: str = "none"
) -> dict[str, Any]:
    """Measure one stage load in a fresh interpreter (at args.dtype unless `dtype` is given)."""
    cmd = [
        *(sys.executable, str(BENCH), "_load-child"),
        *("--model-dir", str(model_dir), "--dtype", dtype or args.dtype, "--threads", str(args.threads)),
        *("--start", str(start), "--end", str(end), "--cache-dir", str(Path(args.out) / "store-cache")),
        *("--quantize", quantize),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    log(f"loading layers [{start}, {end}) at {dtype or args.dtype}, quantize {quantize}, in a fresh process …")
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
