"""`quantize`: int8 and int4 resident weights (`--quantize`) against unquantized ones, on this
machine. The targets are issue 17's, for int8; int4's figures are reported beside them.

- Memory: stages of a TinyLlama-shaped float32 checkpoint loaded in fresh processes at float32, at
  bfloat16, at int8 and at int4 (bfloat16 activations); targets: an int8 stage's RSS - base at most
  0.3 x its float32 share and 0.6 x its bfloat16 share (base: a process that imported everything,
  the quantization library included, and loaded no layer).
- Speed: greedy decode tokens/s of the whole model in one process, int8 and int4 against bfloat16,
  runs alternating; target int8 >= 0.9 x bfloat16.
- Quality: perplexity of a fixed local text (`data/perplexity.txt`, the opening of Lewis Carroll's
  Alice's Adventures in Wonderland, public domain) in one forward pass; target: int8 at most 2 %
  above the unquantized model (float32, the reference every other test holds to).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import MIB, log, median
from benchmarks.memory import run_child
from benchmarks.models import ensure_checkpoint

TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"
RSS_OF_FLOAT32, RSS_OF_BFLOAT16, SPEED, PERPLEXITY = 0.3, 0.6, 0.9, 1.02
VARIANTS = {
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}
QUANTIZED = ("int8", "int4")


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """RSS of each stage at float32, bfloat16 and int8, each in a fresh process, with its base."""
    out = Path(args.out).resolve()
    model_dir = Path(args.model_dir).resolve() if args.model_dir else ensure_checkpoint(
        out / "checkpoints" / "tinyllama-shaped-float32", "float32")  # fmt: skip
    args.dtype = "float32"
    base = {v: run_child(model_dir, args, 0, 0, dtype, q)["rss_bytes"] for v, (dtype, q) in VARIANTS.items()}
    rows = []
    for spec in args.ranges.split(","):
        start, end = (int(x) for x in spec.split(":"))
        got = {v: run_child(model_dir, args, start, end, dtype, q) for v, (dtype, q) in VARIANTS.items()}
        grown = {v: got[v]["rss_bytes"] - base[v] for v in VARIANTS}
        row = {
            "start": start,
            "end": end,
            "share_bytes": {v: got[v]["share_bytes"] for v in VARIANTS},
            "param_bytes": {v: got[v]["param_bytes"] for v in VARIANTS},
            "rss_bytes": {v: got[v]["rss_bytes"] for v in VARIANTS},
            "base_bytes": base,
        }
        for q in QUANTIZED:
            row[f"{q}_of_float32"] = grown[q] / got["float32"]["share_bytes"]
            row[f"{q}_of_bfloat16"] = grown[q] / got["bfloat16"]["share_bytes"]
        row["ok"] = row["int8_of_float32"] <= RSS_OF_FLOAT32 and row["int8_of_bfloat16"] <= RSS_OF_BFLOAT16
        rows.append(row)
    return rows


def load_whole(files: Any, config: Any, variant: str) -> Any:
    """The whole model as one stage, held as `variant` (VARIANTS) says."""
    import torch

    from peer.checkpoint import open_checkpoint
    from peer.shard import load_stage

    dtype, quantize = VARIANTS[variant]
    source = open_checkpoint(files, config, getattr(torch, dtype))
    try:
        return load_stage(source, config, 0, config.num_hidden_layers, dtype=getattr(torch, dtype), quantize=quantize)
    finally:
        source.close()


def perplexity(stage: Any, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given what precedes each, in one pass."""
    import torch

    from peer.kv_cache import SessionKVCache
    from peer.profile import head_dim

    config = stage.config
    cache = SessionKVCache(first_layer=0, num_layers=config.num_hidden_layers, batch=1,
                           kv_heads=config.num_key_value_heads, head_dim=head_dim(config), max_length=len(ids),
                           dtype=stage.compute_dtype, device="cpu")  # fmt: skip
    cache.begin_step(0, len(ids))
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = stage(x, torch.arange(len(ids))[None], cache, all_logits=True)[0].float()
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:]).item())


def model_row(store: Any, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Decode tokens/s at bfloat16, int8 and int4 (alternating runs), and perplexity at every variant."""
    from peer.pipeline import LocalPipeline
    from peer.tokenizer import Tokenizer

    files = store.resolve(spec)
    config = files.load_config()
    ids = Tokenizer.from_dir(files.meta_dir, config).encode(TEXT.read_text())
    stages = {v: load_whole(files, config, v) for v in VARIANTS}
    ppl = {v: perplexity(stage, ids) for v, stage in stages.items()}
    log(f"{spec}: perplexity {', '.join(f'{v} {p:.3f}' for v, p in ppl.items())} over {len(ids)} tokens")
    rates: dict[str, list[float | None]] = {v: [] for v in ("bfloat16", *QUANTIZED)}
    for run in range(args.runs + 1):  # the first round warms up
        for variant in rates:
            pipe = LocalPipeline([stages[variant]])
            t0 = time.perf_counter()
            produced = sum(1 for _ in pipe.generate(f"r{run}", ids[:16], args.max_tokens))
            if run:
                rates[variant].append(produced / (time.perf_counter() - t0))
    speed = {v: median(r) or 0.0 for v, r in rates.items()}
    log(f"{spec}: decode tok/s {', '.join(f'{v} {s:.1f}' for v, s in speed.items())}")
    row: dict[str, Any] = {"model": spec, "text_tokens": len(ids), "perplexity": ppl}
    row.update(tokens_per_s=speed, runs=rates)
    for q in QUANTIZED:
        row[f"{q}_perplexity_ratio"] = ppl[q] / ppl["float32"]
        row[f"{q}_speed_ratio"] = speed[q] / speed["bfloat16"]
    row["ok"] = row["int8_perplexity_ratio"] <= PERPLEXITY and row["int8_speed_ratio"] >= SPEED
    return row


def quantize(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from peer.config import StoreConfig
    from peer.model_store import ModelStore

    torch.set_num_threads(args.threads)
    memory = memory_rows(args)
    store = ModelStore(StoreConfig(cache_dir=args.cache_dir))
    models = [model_row(store, spec, args) for spec in args.models.split(",")]
    print(f"quantize, {args.threads} thread(s), torch {torch.__version__}; MiB")
    print(f"int8 RSS - base against the share: <= {RSS_OF_FLOAT32} x float32, <= {RSS_OF_BFLOAT16} x bfloat16")
    print(f"{'layers':>9} {'f32 share':>9} {'bf16 share':>10} {'q share':>8} {'q RSS-base':>10} "
          f"{'of f32':>7} {'of bf16':>7}  ok")  # fmt: skip
    for r in memory:
        share = r["share_bytes"]
        for q in QUANTIZED:
            grown = r["rss_bytes"][q] - r["base_bytes"][q]
            verdict = ("yes" if r["ok"] else "NO") if q == "int8" else "-"
            print(f"[{r['start']},{r['end']}) {share['float32'] / MIB:>9.0f} {share['bfloat16'] / MIB:>10.0f} "
                  f"{q} {share[q] / MIB:>3.0f} {grown / MIB:>10.0f} {r[f'{q}_of_float32']:>7.3f} "
                  f"{r[f'{q}_of_bfloat16']:>7.3f} {verdict:>3}")  # fmt: skip
    print(f"decode (target int8 >= {SPEED} x bfloat16) and perplexity (target int8 <= {PERPLEXITY} x float32)")
    for r in models:
        p, s = r["perplexity"], r["tokens_per_s"]
        print(f"{r['model']:>14}: tok/s bf16 {s['bfloat16']:.1f} int8 {s['int8']:.1f} "
              f"({r['int8_speed_ratio']:.2f} x) int4 {s['int4']:.1f} ({r['int4_speed_ratio']:.2f} x); "
              f"perplexity f32 {p['float32']:.3f} bf16 {p['bfloat16']:.3f} int8 {p['int8']:.3f} "
              f"({r['int8_perplexity_ratio']:.4f} x) int4 {p['int4']:.3f} ({r['int4_perplexity_ratio']:.4f} x) "
              f"{'ok' if r['ok'] else 'MISSED'}")  # fmt: skip
    summary = {
        "mode": "quantize",
        "threads": args.threads,
        "torch_version": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "memory": memory,
        "models": models,
    }
    (out / "quantize.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'quantize.json'}")
    return 0 if all(r["ok"] for r in memory + models) else 1
