"""The models the benchmarks run, as one typed description (`BenchModel`): SmolLM2-135M (the
embedded model), a tiny random Llama (6 layers, hidden 64, SmolLM2's vocabulary size: compute is
nearly free, so what it measures is the data plane's own cost), and a TinyLlama-shaped random
checkpoint in float32 or bfloat16. Random checkpoints are written once, with a word-level tokenizer
over their whole vocabulary. `Baseline` keeps Hugging Face's own model loaded in a process of its
own, with the peers' thread settings, so that its runs alternate with the swarm's."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import BENCH, MIB, log, proc_status_bytes
from swarm.launcher import openmp_wait

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
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=49152,  # SmolLM2's
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
MODELS = ("smollm2", "tiny", "tinyllama-float32", "tinyllama-bfloat16")
DECODE_PROMPT = "The history of the printing press"
PREFILL_TOKENS = 512
KV_BUDGET_MIB = 512  # the shipped executor.kv_cache_budget_mb, reserved on every peer


@dataclass(frozen=True)
class BenchModel:
    """A model the benchmarks run: what the baseline loads and what every peer is given."""

    name: str  # one of MODELS
    spec: str  # the model spec peers take (--model): smollm2-135m or a checkpoint directory
    dtype: str  # torch dtype name the baseline and the peers compute in
    cache_dir: str | None = None  # the model store's cache; None: the user's

    def store(self) -> Any:
        """The model store that resolves `spec`."""
        from peer.config import StoreConfig
        from peer.model_store import ModelStore

        return ModelStore(StoreConfig(cache_dir=self.cache_dir), show_progress=False)

    def profile(self) -> Any:
        """The ModelProfile (bytes of each part) at this dtype."""
        import torch

        from peer.profile import ModelProfile

        config = self.store().resolve(self.spec).load_config()
        return ModelProfile.from_config(config, getattr(torch, self.dtype))

    def peer_args(self) -> tuple[str, ...]:
        """What a `swarm-peer` needs to serve this model."""
        cache = ("--cache-dir", self.cache_dir) if self.cache_dir else ()
        return ("--model", self.spec, "--dtype", self.dtype, *cache)

    def prompt_ids(self, tokens: int | None, seed: int = 0) -> list[int]:
        """The decode prompt's ids, or `tokens` ids drawn at random (a long prompt of exact length)."""
        files = self.store().resolve(self.spec)
        config = files.load_config()
        if tokens is None:
            from peer.tokenizer import Tokenizer

            if self.name != "smollm2":
                return [1, *range(100, 120)]
            return Tokenizer.from_dir(files.meta_dir, config).encode(DECODE_PROMPT)
        import random

        rng = random.Random(seed)
        return [rng.randrange(3, config.vocab_size) for _ in range(tokens)]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, as the swarm's API streams it: to check a swarm's output against the
        baseline's tokens."""
        from peer.tokenizer import Tokenizer

        files = self.store().resolve(self.spec)
        return Tokenizer.from_dir(files.meta_dir, files.load_config()).decode(ids)

    def even_caps(self, peers: int) -> dict[str, int]:
        """Equal memory caps that split the model over `peers` stages (the partitioner goes by memory)."""
        cap = int(self.profile().total_weight_bytes / 2**20 / peers * 1.4) + KV_BUDGET_MIB + 64
        return {f"peer-{i + 1}": cap for i in range(peers)}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchModel:
        return cls(**json.loads(text))


def resolve_model(name: str, checkpoints: Path) -> BenchModel:
    """The bench model of `name`, its random checkpoint written first if it must be."""
    if name == "smollm2":
        return BenchModel(name, "smollm2-135m", "float32")
    shape, dtype = (TINY_SHAPE, "float32") if name == "tiny" else (TINYLLAMA_SHAPE, name.split("-", 1)[1])
    label = "tiny" if name == "tiny" else f"tinyllama-shaped-{dtype}"
    directory = ensure_checkpoint(checkpoints.resolve() / label, dtype, shape)
    bench_tokenizer(directory, shape["vocab_size"])
    return BenchModel(name, str(directory), dtype, str(checkpoints.resolve() / "store-cache"))


def models_of(names: str, checkpoints: str) -> list[BenchModel]:
    """The models of a --models comma list."""
    chosen = [m.strip() for m in names.split(",") if m.strip()]
    if not chosen or any(n not in MODELS for n in chosen):
        raise SystemExit(f"--models takes a comma list of {', '.join(MODELS)}")
    return [resolve_model(n, Path(checkpoints)) for n in chosen]


def ensure_checkpoint(directory: Path, dtype_name: str, shape: dict[str, Any] = TINYLLAMA_SHAPE) -> Path:
    """A random Llama checkpoint of `shape` in `directory`, written once and reused after."""
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        log(f"reusing checkpoint {directory}")
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    log(f"building a {shape['num_hidden_layers']}-layer {dtype_name} Llama with random weights (once) …")
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # construct in the target dtype: no float32 copy of a bf16 model
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape))
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


def baseline_child(args: argparse.Namespace) -> int:
    """In a fresh process: Hugging Face's own model, kept loaded; for each request read from stdin
    (a JSON line of prompt ids and max_tokens) a greedy `generate`, its token arrivals on stdout."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    model = BenchModel.from_json(args.model)
    files = model.store().resolve(model.spec)
    dtype = getattr(torch, model.dtype)
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

    def __init__(self, model: BenchModel, threads: int, device: str = "cpu", *, shared_cores: bool = True) -> None:
        self.model, self.threads, self.device = model, threads, device
        # OpenMP's wait as in the swarm it is paired with (`swarm.launcher.openmp_wait`): its peers
        # sleep at once where several share the machine's cores, and spin briefly where one is alone.
        self.shared_cores = shared_cores
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Baseline:
        cmd = [sys.executable, str(BENCH), "_baseline-child", "--model", self.model.to_json()]
        cmd += ["--threads", str(self.threads), "--device", self.device]
        env = {**os.environ, **openmp_wait(os.environ, shared_cores=self.shared_cores),
               "OMP_NUM_THREADS": str(self.threads)}  # fmt: skip
        log(f"baseline: loading {self.model.name} into Hugging Face transformers on {self.device}, "
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
