"""Benchmarks, one subcommand per measurement, each writing `<out>/<mode>.json` (and a plot where it
has one). The families live in `scripts/benchmarks/`, over one typed model description
(`benchmarks.models.BenchModel`):

- `perf.py`: `decode`, `prefill`, `concurrency`, `overhead`, `hops` and `pipeline` run local swarms
  (`swarm-peer` processes on 127.0.0.1) on SmolLM2-135M (the embedded model), a tiny random Llama,
  or a TinyLlama-shaped random checkpoint, against Hugging Face's own model kept loaded in a
  separate process with the same thread count as each peer, runs alternating, so that each ratio
  compares runs made under the same conditions.
- `memory.py`: per-stage resident memory against the stage's share of the weights.
- `quantize.py`: int8 and int4 weights against float32 and bfloat16: resident memory, decode speed
  and perplexity on a fixed local text.
- `constrained.py`: decode time per token with a JSON-schema grammar against without, and the
  grammar library's own cost per token and per replay.
- `failover.py`: the wait from SIGKILLing a stage mid-stream to the next token, and the text checked.
- `network.py`: on the network test bed, decode under added delay per hop, and failover from a cut.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.constrained import constrained  # noqa: E402
from benchmarks.failover import _interrupt, failover  # noqa: E402
from benchmarks.harness import log  # noqa: E402
from benchmarks.memory import load_child, memory  # noqa: E402
from benchmarks.models import MODELS, PREFILL_TOKENS, baseline_child  # noqa: E402
from benchmarks.network import network  # noqa: E402
from benchmarks.perf import concurrency, decode, hops, overhead, pipeline, prefill  # noqa: E402
from benchmarks.quantize import quantize  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(
        dest="mode",
        required=True,
        metavar="{decode,prefill,concurrency,overhead,hops,pipeline,memory,quantize,constrained,failover,network}",
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
    con = perf("concurrency", "aggregate tokens/s of concurrent sessions through one swarm", concurrency, 5, 32)
    con.add_argument("--sessions", default="1,4,16", help="concurrent sessions, a comma list (default %(default)s)")
    con.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")
    con.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default %(default)s)")
    con.set_defaults(models="tinyllama-float32")
    ovh = perf("overhead", "per-hop wire time and communication share of a decode step", overhead, 3, 32)
    ovh.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")
    hop = perf("hops", "ms a token through 1, 2, 3 peers of the tiny model: the cost of each hop", hops, 5, 64)
    hop.add_argument("--peers", default="1,2,3", help="swarm sizes, a comma list (default %(default)s)")
    hop.set_defaults(models="tiny")
    pip = perf("pipeline", "aggregate tokens/s with K micro-batches in flight against one", pipeline, 5, 16)
    pip.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")
    pip.add_argument("--sessions", type=int, default=12, help="concurrent sessions (default %(default)s)")
    pip.add_argument("--pass-s", type=float, default=0.05, help="wall time of every forward pass (default %(default)s)")
    pip.add_argument("--rows", type=int, default=4, help="most rows one pass takes (default %(default)s)")
    pip.add_argument("--micro-batches", type=int, default=3, help="K when pipelining (default %(default)s)")
    pip.set_defaults(models="tiny")

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
    child.add_argument("--quantize", default="none")
    child.set_defaults(func=load_child)

    qua = modes.add_parser("quantize", help="int8 and int4 weights: resident memory, decode speed and perplexity")
    qua.add_argument("--model-dir", help="checkpoint for the memory rows (default: TinyLlama-shaped, float32)")
    qua.add_argument("--ranges", default="0:11,5:16", help="stages [start, end) for the memory rows")
    qua.add_argument("--models", default="smollm2-135m,gemma3-270m", help="model specs for speed and perplexity")
    qua.add_argument("--runs", type=int, default=5, help="decode runs per variant, alternating (default %(default)s)")
    qua.add_argument("--max-tokens", type=int, default=64, help="tokens per decode run (default %(default)s)")
    qua.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    qua.add_argument("--cache-dir", help="model cache for the embedded models (default: the user's)")
    qua.add_argument("--out", default="results", help="directory for quantize.json and generated checkpoints")
    qua.set_defaults(func=quantize)

    gra = modes.add_parser("constrained", help="decode time per token with a JSON-schema grammar against without")
    gra.add_argument("--num-peers", type=int, default=3, help="peers in the swarm (default %(default)s)")
    gra.add_argument("--runs", type=int, default=5, help="pairs of runs, alternating (default %(default)s)")
    gra.add_argument("--max-tokens", type=int, default=120, help="the constrained reply's bound (default %(default)s)")
    gra.add_argument("--threads", type=int, default=1, help="torch threads per peer (default %(default)s)")
    gra.add_argument("--config", help="the peers' config (default: the shipped configs/default.yaml)")
    gra.add_argument("--out", default="results", help="directory for constrained.json")
    gra.set_defaults(func=constrained)

    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` of this script stops its peers too
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        log("interrupted; the peers were stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
