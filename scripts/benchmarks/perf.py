"""Performance against the single-process Hugging Face baseline, on the same model, machine and
thread budget in one run: `decode` (single-stream tokens/s for swarms of 1, 2 and 3 peers),
`prefill` (time to first token of a long prompt), `concurrency` (aggregate tokens/s of N sessions
at once, each output checked against its lone run), `overhead` (the swarm's own per-hop wire time
and communication share), `hops` (the tiny model: milliseconds a token for 1, 2 and 3 peers, and
so the cost of each extra hop) and `pipeline` (stages whose compute is a fixed wall time per pass:
aggregate tokens/s of many sessions with pipelining against the same run without)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    Swarm,
    complete,
    config_with,
    decode_rate,
    log,
    median,
    peer_metrics,
    plot_bars,
    plot_pairs,
    print_pairs,
    print_peer_memory,
    standby_rss,
    swarm_config,
    swarm_stream,
    write_report,
)
from benchmarks.models import Baseline, models_of

REFERENCE_PROMPTS = 4  # prompts each concurrency run times alone, for its one-session rate


def paired_runs(args: argparse.Namespace, measure: str, ids: list[int], max_tokens: int) -> list[dict[str, Any]]:
    """For each model and swarm size, runs of the baseline and of the swarm, alternating; the
    medians of each side, and the median of the ratios of each run to its pair. `measure` is
    "decode" (tokens/s) or "ttft" (seconds)."""

    def value(run: dict[str, Any]) -> float | None:
        return decode_rate(run["arrivals"]) if measure == "decode" else run["ttft_s"]

    rows = []
    for model in models_of(args.models, args.checkpoints):
        prompt = ids or model.prompt_ids(None)
        standby = standby_rss(model, args.threads, swarm_config(args), args.device)
        for n in [int(k) for k in args.peers.split(",")]:
            # The baseline waits between parallel regions as the swarm's peers do (one alone spins briefly).
            with Baseline(model, args.threads, args.device, shared_cores=n > 1) as base:
                base.run(prompt, min(max_tokens, 4))  # warm-up
                with Swarm(model, n, args.threads, swarm_config(args), args.device) as swarm:
                    swarm_stream(swarm.url, prompt, min(max_tokens, 4))  # warm-up
                    pairs, same = [], 0
                    for run in range(args.runs):
                        ours, theirs = base.run(prompt, max_tokens), swarm_stream(swarm.url, prompt, max_tokens)
                        pairs.append((value(ours), value(theirs)))
                        # Words, not characters: a stream's first piece carries the space after the prompt.
                        same += theirs["text"].split() == model.decode(ours["tokens"]).split()
                        log(f"{model.name}, {n} peer(s), run {run + 1}: baseline {pairs[-1][0] or 0:.3f}, "
                            f"swarm {pairs[-1][1] or 0:.3f}")  # fmt: skip
                    memory = swarm.rss(standby)
                b, w = median([p[0] for p in pairs]), median([p[1] for p in pairs])
                ratio = median([sw / sb if sw and sb else None for sb, sw in pairs])  # each run against its pair
                rows.append({"model": model.name, "peers": n, "baseline": b, "swarm": w, "ratio": ratio,
                             "runs": pairs, "same_text": same, "memory": memory})  # fmt: skip
    return rows


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
    for model in models_of(args.models, args.checkpoints):
        sub = argparse.Namespace(**{**vars(args), "models": model.name})
        rows += paired_runs(sub, "ttft", model.prompt_ids(args.prompt_tokens), 1)
    print(f"prefill: time to first token of a {args.prompt_tokens}-token prompt, medians of {args.runs} "
          f"alternating runs, {args.threads} thread(s) for the baseline and for each peer")  # fmt: skip
    print_pairs(rows, "seconds", 3)
    write_report(args, "prefill", rows)
    plot_pairs(rows, Path(args.out) / "prefill.png", f"time to first token, {args.prompt_tokens} tokens (s)")
    return 0


def concurrency(args: argparse.Namespace) -> int:
    """Aggregate tokens/s of N concurrent greedy sessions through one swarm, against one session
    alone measured in the same run; each output must equal the same prompt's output when it runs
    alone. Each run measures the lone rate afresh (REFERENCE_PROMPTS prompts one at a time) and then
    every level; the ratio reported is the median of the runs' ratios."""
    from concurrent.futures import ThreadPoolExecutor

    levels = sorted({int(n) for n in args.sessions.split(",")})
    rows: list[dict[str, Any]] = []
    ok = True
    for model in models_of(args.models, args.checkpoints):
        prompts = [model.prompt_ids(args.prompt_tokens, seed=i) for i in range(max(levels))]
        standby = standby_rss(model, args.threads, swarm_config(args), args.device)
        # One client runs every session: its per-client limit must let it.
        config = config_with(args, "concurrency", serving={"max_sessions_per_client": max(levels)})
        with Swarm(model, args.num_peers, args.threads, config, args.device) as swarm:

            def alone(p: list[int]) -> tuple[str, float]:
                t0 = time.perf_counter()
                answer = complete(swarm.url, p, args.max_tokens)
                return answer["choices"][0]["text"], args.max_tokens / (time.perf_counter() - t0)

            complete(swarm.url, prompts[0], 2)  # warm-up
            log(f"each prompt's own output: {len(prompts)} prompts one at a time …")
            texts = [alone(p)[0] for p in prompts]
            runs: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
            for run in range(args.runs):
                picked = [prompts[(run * REFERENCE_PROMPTS + j) % len(prompts)] for j in range(REFERENCE_PROMPTS)]
                single = statistics.median(alone(p)[1] for p in picked)
                for n in levels:
                    with ThreadPoolExecutor(n) as pool:
                        t0 = time.perf_counter()
                        results = list(pool.map(lambda p: complete(swarm.url, p, args.max_tokens), prompts[:n]))
                        wall = time.perf_counter() - t0
                    tokens = sum(r["usage"]["completion_tokens"] for r in results)
                    same = sum(r["choices"][0]["text"] == text for r, text in zip(results, texts, strict=False))
                    rate = tokens / wall
                    runs[n].append({"tokens_per_s": rate, "single": single, "speedup": rate / single,
                                    "identical": same})  # fmt: skip
                    ok = ok and same == n
                    log(f"run {run + 1}, {n} session(s): {rate:.2f} tokens/s, one alone {single:.2f}: "
                        f"{rate / single:.2f} x; {same}/{n} identical")  # fmt: skip
            memory = swarm.rss(standby)
        for n in levels:
            rows.append({"model": model.name, "sessions": n, "runs": runs[n],
                         "tokens_per_s": median([r["tokens_per_s"] for r in runs[n]]),
                         "speedup": median([r["speedup"] for r in runs[n]]),
                         "identical": sum(r["identical"] for r in runs[n]), "of": n * len(runs[n])})  # fmt: skip
        rows.append({"model": model.name, "sessions": 1, "memory": memory,
                     "alone_tokens_per_s": median([r["single"] for r in runs[levels[0]]])})  # fmt: skip
    print(f"concurrency: {args.num_peers} peers, {args.max_tokens} tokens per session, {args.threads} thread(s) each, "
          f"medians of {args.runs} run(s), each against one session alone in the same run")  # fmt: skip
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
    """Where a decode step's time goes, from the swarm's own timings and each peer's /metrics: per
    stage its compute, its forward passes' wall time (compute and the hand-offs to and from the
    compute thread), its steps' wait in the queue and its results' way out to the link; per hop the
    wire; at the entry, from a token coming home to the next step going out. The communication share
    is the wire's against the compute."""
    rows = []
    for model in models_of(args.models, args.checkpoints):
        ids = model.prompt_ids(None)
        with Swarm(model, args.num_peers, args.threads, swarm_config(args), args.device) as swarm:
            complete(swarm.url, ids, 4)  # warm-up
            for run in range(args.runs):
                before = {p.name: peer_metrics(str(p.url)) for p in swarm.peers}
                t = complete(swarm.url, ids, args.max_tokens)["timings"]
                after = {p.name: peer_metrics(str(p.url)) for p in swarm.peers}
                steps = t["tokens"]
                stages = {}
                for name in t["compute_s_per_stage"]:
                    grew = {k: v - before[name].get(k, 0.0) for k, v in after[name].items()}
                    passes = grew.get("swarm_stage_forward_passes_total") or 1
                    steps_run = grew.get("swarm_stage_steps_total") or 1
                    frames = grew.get("swarm_stage_frames_out_total") or 1
                    stages[name] = {
                        "queued_ms": 1000 * grew.get("swarm_stage_queued_seconds_total", 0.0) / steps_run,
                        "pass_ms": 1000 * grew.get("swarm_stage_pass_seconds_total", 0.0) / passes,
                        "out_ms": 1000 * grew.get("swarm_stage_send_seconds_total", 0.0) / frames,
                    }
                rows.append({
                    "model": model.name, "run": run + 1, "tokens": steps,
                    "wire_ms_per_hop": {k: 1000 * v / steps for k, v in t["wire_s_per_hop"].items()},
                    "compute_ms_per_stage": {k: 1000 * v / steps for k, v in t["compute_s_per_stage"].items()},
                    "stages": stages,
                    "entry_ms": 1000 * t["entry_s"] / max(1, steps - 1),
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
        at = "; ".join(f"{k} queued {v['queued_ms']:.2f}, pass {v['pass_ms']:.2f} "
                       f"(compute {r['compute_ms_per_stage'][k]:.2f}), out {v['out_ms']:.2f}"
                       for k, v in r["stages"].items())  # fmt: skip
        print(f"{'':>20}   at each stage: {at}; at the entry {r['entry_ms']:.2f}")
    write_report(args, "overhead", rows)
    return 0


def hops(args: argparse.Namespace) -> int:
    """Milliseconds a token through swarms of 1, 2 and 3 peers on the tiny model, whose compute is
    nearly free: the growth from 1 peer on is the data plane's own cost of each extra peer's hop."""
    rows = paired_runs(args, "decode", [], args.max_tokens)
    print(f"hops: one greedy stream of {args.max_tokens} tokens, medians of {args.runs} alternating runs, "
          f"{args.threads} thread(s) for the baseline and for each peer; milliseconds a token")  # fmt: skip
    print(f"{'model':>20} {'peers':>5} {'baseline':>9} {'swarm':>9} {'extra per peer':>15}")
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["peers"])
        alone = next((r for r in mine if r["peers"] == 1), None)
        for r in mine:
            ms = 1000 / r["swarm"] if r["swarm"] else None
            base = 1000 / r["baseline"] if r["baseline"] else None
            extra = None
            if alone is not None and alone["swarm"] and ms is not None and r["peers"] > 1:
                extra = (ms - 1000 / alone["swarm"]) / (r["peers"] - 1)
            r["ms_per_token"], r["baseline_ms_per_token"], r["extra_ms_per_peer"] = ms, base, extra
            cells = ("-" if v is None else f"{v:.2f}" for v in (base, ms, extra))
            print(f"{model:>20} {r['peers']:>5} {next(cells):>9} {next(cells):>9} {next(cells):>15}")
            summary.append(r)
    write_report(args, "hops", summary)
    return 0


def pipeline(args: argparse.Namespace) -> int:
    """Aggregate tokens/s of many greedy sessions through 3 peers whose every forward pass takes a
    fixed wall time (`standin.py`: on shared cores real compute would serialise the stages), with
    K micro-batches in flight (pipelining: every stage busy at once) against K = 1 (one micro-batch
    in flight). Both runs cap a pass at `--rows` rows, as memory or latency would on real hardware;
    each session's output is checked against its lone run."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    standin = [sys.executable, str(Path(__file__).resolve().parent / "standin.py"), str(args.pass_s)]
    rows: list[dict[str, Any]] = []
    ok = True
    for model in models_of(args.models, args.checkpoints):
        prompts = [model.prompt_ids(4, seed=i) for i in range(args.sessions)]
        alone: list[str] = []
        for k in (args.micro_batches, 1):
            serving = {"micro_batches": k, "max_batch_tokens": args.rows, "max_sessions_per_client": args.sessions}
            config = config_with(args, f"pipeline-k{k}", serving=serving)
            with Swarm(model, args.num_peers, args.threads, config, args.device, command=standin) as swarm:
                complete(swarm.url, prompts[0], 2)  # warm-up
                if not alone:
                    log(f"each of {len(prompts)} prompts alone, for reference …")
                    alone = [complete(swarm.url, p, args.max_tokens)["choices"][0]["text"] for p in prompts]
                for run in range(args.runs):
                    with ThreadPoolExecutor(args.sessions) as pool:
                        t0 = time.perf_counter()
                        results = list(pool.map(lambda p: complete(swarm.url, p, args.max_tokens), prompts))
                        wall = time.perf_counter() - t0
                    tokens = sum(r["usage"]["completion_tokens"] for r in results)
                    same = all(r["choices"][0]["text"] == a for r, a in zip(results, alone, strict=True))
                    ok = ok and same
                    rows.append({"model": model.name, "micro_batches": k, "run": run + 1, "tokens": tokens,
                                 "wall_s": wall, "tokens_per_s": tokens / wall, "identical": same})  # fmt: skip
                    log(f"K={k}, run {run + 1}: {tokens / wall:.1f} tokens/s")
    print(
        f"pipeline: {args.num_peers} peers, each pass {1000 * args.pass_s:.0f} ms of wall time, at most "
        f"{args.rows} rows; {args.sessions} sessions of {args.max_tokens} tokens; medians of {args.runs} runs"
    )
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        on = median([r["tokens_per_s"] for r in rows if r["model"] == model and r["micro_batches"] != 1])
        off = median([r["tokens_per_s"] for r in rows if r["model"] == model and r["micro_batches"] == 1])
        ratio = on / off if on and off else None
        summary.append({"model": model, "pipelined_tokens_per_s": on, "one_micro_batch_tokens_per_s": off,
                        "ratio": ratio})  # fmt: skip
        print(f"{model:>20}: K={args.micro_batches} {on or 0:.1f} tokens/s, K=1 {off or 0:.1f} tokens/s, "
              f"ratio {ratio or 0:.2f}")  # fmt: skip
    write_report(args, "pipeline", [*summary, *rows])
    return 0 if ok else 1
