"""Command line: generate text with the model run as N chained stages in one process.

    python -m peer.generate --stages 3 --prompt "The future of AI is" --max-tokens 30

It resolves the model spec (fetching the embedded default on first use), loads each stage from
only its own tensors, streams the generated text, and prints per-stage compute timings. It is the
swarm without the network; the swarm demo replaces it as the project's main command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace

import torch

from peer.config import (
    ModelConfig,
    ResourceConfig,
    StoreConfig,
    default_config_path,
    peer_config_from_dict,
    read_config_file,
)
from peer.errors import SwarmError
from peer.model_store import ModelStore
from peer.pipeline import LocalPipeline, even_split, load_stages
from peer.profile import ModelProfile
from peer.resources import MIB, detect_resources, resolve_dtype
from peer.sampling import SamplingParams
from peer.tokenizer import Tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peer.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    p.add_argument("--stages", type=int, default=3, help="number of chained stages (default 3)")
    p.add_argument("--max-tokens", type=int, default=30, help="tokens to generate at most (default 30)")
    p.add_argument("--model", help="model spec (default from the config: smollm2-135m)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--config", default=str(default_config_path()), help="YAML config file")
    p.add_argument("--cache-dir", help="model cache directory")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    cfg = peer_config_from_dict(read_config_file(args.config))
    model_cfg: ModelConfig = replace(cfg.model, **{k: v for k, v in (("spec", args.model), ("dtype", args.dtype)) if v})
    resource_cfg: ResourceConfig = replace(cfg.resources, device=args.device) if args.device else cfg.resources
    store_cfg: StoreConfig = replace(cfg.store, cache_dir=args.cache_dir) if args.cache_dir else cfg.store
    if args.threads:
        torch.set_num_threads(args.threads)

    resources = detect_resources(resource_cfg)
    dtype = resolve_dtype(model_cfg.dtype, resources.device)
    print(f"device: {resources.summary()}", file=sys.stderr)
    files = ModelStore(store_cfg).resolve(model_cfg.spec)
    config = files.load_config()
    tokenizer = Tokenizer.from_dir(files.meta_dir, config)
    profile = ModelProfile.from_config(config, dtype)
    ranges = even_split(profile.num_layers, args.stages)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)

    t0 = time.perf_counter()
    stages = load_stages(files, config, ranges, dtype=dtype, device=resources.device, show_progress=True)
    print(
        f"loaded {len(stages)} stages of {model_cfg.spec} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    pipe = LocalPipeline(stages, cfg.executor)

    prompt_ids = (
        tokenizer.apply_chat([{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt)
    )
    decoder = tokenizer.stream(prompt_ids)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    first_token_s = None
    count = 0
    for token in pipe.generate("cli", prompt_ids, args.max_tokens, sampling, tokenizer.eos_token_ids):
        count += 1
        first_token_s = first_token_s or time.perf_counter() - start
        if token not in tokenizer.eos_token_ids:
            print(decoder.push(token), end="", flush=True)
    print(decoder.flush(), flush=True)
    total_s = time.perf_counter() - start
    print_timings(
        pipe,
        profile,
        ranges,
        prompt_len=len(prompt_ids),
        tokens=count,
        ttft_s=first_token_s or 0.0,
        total_s=total_s,
    )
    return 0


def print_timings(
    pipe: LocalPipeline,
    profile: ModelProfile,
    ranges: list[tuple[int, int]],
    *,
    prompt_len: int,
    tokens: int,
    ttft_s: float,
    total_s: float,
) -> None:
    """A table of each stage's layers, weight bytes and compute time."""
    steps = max(pipe.timings.steps, 1)
    print()
    print(f"{'stage':>5}  {'layers':>9}  {'weights MiB':>11}  {'compute s':>9}  {'ms/step':>8}")
    for i, ((start, end), secs) in enumerate(zip(ranges, pipe.timings.per_stage_s, strict=True)):
        mib = profile.stage_weight_bytes(start, end) / MIB
        print(f"{i:>5}  {f'[{start}, {end})':>9}  {mib:>11.1f}  {secs:>9.3f}  {1000 * secs / steps:>8.2f}")
    decode_s = max(total_s - ttft_s, 1e-9)
    rate = (tokens - 1) / decode_s if tokens > 1 else 0.0
    print(
        f"prompt {prompt_len} tokens, generated {tokens} tokens; time to first token {1000 * ttft_s:.0f} ms, "
        f"decode {rate:.1f} tokens/s, total {total_s:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
