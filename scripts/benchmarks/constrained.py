"""`constrained`: what constrained decoding (structured output, forced tool calls) costs per token
against unconstrained decoding, on this machine.

- Swarm: a local swarm of SmolLM2 (the embedded model), greedy chat requests, runs alternating: with
  `response_format` `json_schema` (a fixed schema), and without, generating as many tokens
  (`ignore_eos`). Each run's decode time per token comes from its response's timings: (total - time
  to first token) / (tokens - 1). The ratio reported is the median of the runs' ratios.
- Library: llguidance's own cost per token (the next-token mask and taking the token) over the
  constrained reply's tokens, and the cost of rebuilding a matcher by replaying them, which is what
  a failover adds; xgrammar's, measured the same way, when it is installed (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from typing import Any

from benchmarks.harness import STREAM_TIMEOUT_S, Swarm, log, median, swarm_config, write_report
from benchmarks.models import BenchModel

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
        "coastal": {"type": "boolean"},
    },
    "required": ["name", "country", "population_millions", "landmarks", "coastal"],
    "additionalProperties": False,
}
QUESTION = "Describe the city of Paris as JSON: its name, country, population, landmarks and whether it is coastal."


def chat(url: str, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=STREAM_TIMEOUT_S) as resp:
        found: dict[str, Any] = json.loads(resp.read())
    return found


def per_token_s(answer: dict[str, Any]) -> float | None:
    t = answer["timings"]
    return (t["total_s"] - t["time_to_first_token_s"]) / (t["tokens"] - 1) if t["tokens"] > 1 else None


def library_costs(model: BenchModel, text: str, repeats: int = 20) -> dict[str, Any]:
    """Per-token mask-and-take cost and replay cost of llguidance (and xgrammar, if installed) over
    the tokens of `text`, with the model's own tokenizer."""
    from peer.grammar import Grammars, json_schema_grammar
    from peer.tokenizer import Tokenizer

    files = model.store().resolve(model.spec)
    config = files.load_config()
    tokenizer = Tokenizer.from_dir(files.meta_dir, config)
    ids = tokenizer.encode(text)
    grammars = Grammars(tokenizer.hf, config.vocab_size, tokenizer.eos_token_ids)
    grammar = json_schema_grammar(SCHEMA)
    steps, replays = [], []
    for _ in range(repeats):
        matcher = grammars.matcher(grammar)
        t0 = time.perf_counter()
        for token in ids:
            assert bool(matcher.allowed()[token]), "the reply's own tokens must be allowed"
            matcher.consume([token])
        steps.append((time.perf_counter() - t0) / len(ids))
        t0 = time.perf_counter()
        grammars.matcher(grammar, ids)
        replays.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"replayed_tokens": len(ids), "llguidance_ms_per_token": 1e3 * float(median(steps) or 0),
                           "llguidance_replay_ms": 1e3 * float(median(replays) or 0)}  # fmt: skip
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    mask = xgr.allocate_token_bitmask(1, config.vocab_size)
    steps, replays = [], []
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        t0 = time.perf_counter()
        for token in ids:
            matcher.fill_next_token_bitmask(mask)
            matcher.accept_token(token)
        steps.append((time.perf_counter() - t0) / len(ids))
        t0 = time.perf_counter()
        again = xgr.GrammarMatcher(compiled)
        for token in ids:
            again.accept_token(token)
        replays.append(time.perf_counter() - t0)
    out["xgrammar_ms_per_token"] = 1e3 * float(median(steps) or 0)
    out["xgrammar_replay_ms"] = 1e3 * float(median(replays) or 0)
    return out


def constrained(args: argparse.Namespace) -> int:
    """Decode time per token with a grammar against without, on one swarm, runs alternating."""
    model = BenchModel("smollm2", "smollm2-135m", "float32")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    rows: list[dict[str, Any]] = []
    with Swarm(model, args.num_peers, args.threads, swarm_config(args)) as swarm:
        first = chat(swarm.url, max_tokens=args.max_tokens, response_format=fmt)
        content = first["choices"][0]["message"]["content"]
        json.loads(content)  # it parses, or the bench says so now
        tokens = first["usage"]["completion_tokens"]
        log(f"the constrained reply: {tokens} tokens, {content}")
        ratios, with_grammar, without = [], [], []
        for run in range(args.runs):
            a = per_token_s(chat(swarm.url, max_tokens=args.max_tokens, response_format=fmt))
            b = per_token_s(chat(swarm.url, max_tokens=tokens, ignore_eos=True))
            if a and b:
                ratios.append(a / b)
                with_grammar.append(a)
                without.append(b)
            log(f"run {run + 1}: {1e3 * (a or 0):.2f} ms a token with the grammar, {1e3 * (b or 0):.2f} without")
    library = library_costs(model, content)
    row = {"model": model.name, "peers": args.num_peers, "tokens": tokens,
           "constrained_ms_per_token": 1e3 * float(median(with_grammar) or 0),
           "unconstrained_ms_per_token": 1e3 * float(median(without) or 0),
           "ratio": median(ratios), **library}  # fmt: skip
    rows.append(row)
    print(f"constrained decoding, {args.num_peers} peer(s) of SmolLM2, medians of {args.runs} alternating runs:")
    print(f"  decode {row['constrained_ms_per_token']:.2f} ms a token with a JSON-schema grammar, "
          f"{row['unconstrained_ms_per_token']:.2f} without: {row['ratio']:.3f} x")  # fmt: skip
    print(f"  llguidance alone: {library['llguidance_ms_per_token']:.3f} ms a token (mask and take), "
          f"{library['llguidance_replay_ms']:.2f} ms to replay {library['replayed_tokens']} tokens")  # fmt: skip
    if "xgrammar_ms_per_token" in library:
        print(f"  xgrammar alone: {library['xgrammar_ms_per_token']:.3f} ms a token, "
              f"{library['xgrammar_replay_ms']:.2f} ms to replay")  # fmt: skip
    write_report(args, "constrained", rows)
    return 0
