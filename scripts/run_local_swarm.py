"""The local swarm demo: start N `swarm-peer` processes on 127.0.0.1 with different memory caps
and a fresh swarm key, wait until they have elected a leader and loaded their layers, stream the
answer to a prompt through the swarm, print the layer map and a table of the request's timings,
and stop every peer, also on Ctrl-C or an error.

    python scripts/run_local_swarm.py --num-peers 3 --prompt "The future of AI is" --max-tokens 30
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.config import default_config_path, read_config_file
from peer.errors import SwarmError
from peer.model_store import ModelStore
from peer.profile import ModelProfile
from peer.resources import MIB, detect_resources, resolve_dtype
from swarm.cli import fetch_json, format_status, format_timings, stream_text
from swarm.config import swarm_config_from_dict
from swarm.local import Swarm

READY_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-peers", type=int, default=3, help="peers to start (default 3)")
    p.add_argument("--prompt", default="The future of AI is", help="text to continue (or the message with --chat)")
    p.add_argument("--max-tokens", type=int, default=30, help="tokens to generate at most (default 30)")
    p.add_argument("--chat", action="store_true", help="use the model's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--model", help="model spec (default from the config: smollm2-135m)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"],
                   help="hold weights as int8 or int4 (default from the config: none)")  # fmt: skip
    p.add_argument("--config", default=str(default_config_path()), help="YAML config for the peers")
    p.add_argument("--threads", type=int, help="torch threads per peer (default: every core)")
    p.add_argument("--keep-logs", action="store_true", help="keep the peers' logs and state after the run")
    return p.parse_args(argv)


def memory_caps_mb(config: Any, spec: str, peers: int, quantize: str) -> list[int]:
    """Caps in proportion 1 : 2 : ... : N whose sum holds the model with room to spare."""
    store = ModelStore(config.peer.store)
    files = store.resolve(spec)  # fetched once here, so the peers do not all fetch it at once
    resources = detect_resources(config.peer.resources)
    dtype = resolve_dtype(config.peer.model.dtype, resources.device, quantize)
    profile = ModelProfile.from_config(files.load_config(), dtype, quantize)
    tokens = config.partition.kv_reserve_tokens
    # Each stage may hold a table (embeddings or head) besides its layers: count both ends.
    need = profile.total_weight_bytes + profile.head_bytes + profile.kv_bytes(0, profile.num_layers, tokens)
    weights = list(range(1, peers + 1))
    return [math.ceil(1.5 * need * w / sum(weights) / MIB) + 16 for w in weights]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and a plain `kill` both stop the peers (even where the shell started us ignoring SIGINT).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.num_peers < 1:
        print("error: --num-peers must be at least 1", file=sys.stderr)
        return 2
    config = swarm_config_from_dict(read_config_file(args.config))
    spec = args.model or config.peer.model.spec
    workdir = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    swarm: Swarm | None = None
    try:
        quantize = args.quantize or config.peer.model.quantize
        caps = memory_caps_mb(config, spec, args.num_peers, quantize)
        # Every peer may use every core: the stages of a generation take turns, and with two peers or
        # more their idle threads sleep at once (swarm.local: OMP_WAIT_POLICY=PASSIVE) instead of spinning.
        threads = args.threads or os.cpu_count() or 1
        print(f"starting {args.num_peers} peers (memory caps {', '.join(f'{c} MiB' for c in caps)}), "
              f"logs in {workdir}", file=sys.stderr)  # fmt: skip
        names = {f"peer-{i + 1}": cap for i, cap in enumerate(caps)}
        # Each peer in a session of its own: Ctrl-C reaches this script, which stops them in order.
        swarm = Swarm(workdir, Path(args.config), names, threads=threads,
                      extra_args=("--model", spec, "--quantize", quantize), own_session=True)  # fmt: skip
        swarm.start()
        try:
            swarm.wait_ready(READY_TIMEOUT_S, show=lambda line: print(line, file=sys.stderr))
        except AssertionError as e:
            raise SwarmError(str(e)) from None
        urls = [str(p.url) for p in swarm.peers]
        first = urls[0]
        entry = urls[-1]  # any peer takes prompts; use the last started
        print(f"\nprompt (entered at {entry}): {args.prompt}\n", file=sys.stderr)
        body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        body.update({"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt})
        final: dict[str, Any] = {}
        if not args.chat:
            print(args.prompt, end="", flush=True)
        for piece in stream_text(entry, body, args.chat):
            if isinstance(piece, dict):
                final = piece
            else:
                print(piece, end="", flush=True)
        print("\n")
        status = fetch_json(first + "/swarm/status")
        print(format_status(status))
        if final.get("timings"):
            print("\n" + format_timings(final["timings"]))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the peers", file=sys.stderr)
        return 130
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if swarm is not None:
            swarm.stop()
        if not args.keep_logs:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
