"""The layers this peer holds. The node asks for a range whenever the layer map changes; the host
loads it from the model files (in a worker thread, never on the event loop), keeps the tensors of
layers it already holds, and drops what it no longer serves before reading the rest. It holds no
stage while it loads. Holding the last stage, it also holds the tokenizer's grammar form
(`peer.grammar`, built once, in the loading thread), with which the last stage constrains sessions
that ask for structured output. It knows the model side's loaders, not the swarm's messages; the
data plane runs its executor over `stage`."""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from typing import Any

import torch

from peer.checkpoint import open_checkpoint
from peer.grammar import Grammars
from peer.model_store import ModelFiles
from peer.shard import held_tensors, load_stage
from peer.stage import StageModel
from peer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class StageHost:
    """Holds at most one stage, [start, end) of the model, and swaps it for another range."""

    def __init__(
        self,
        files: ModelFiles,
        config: Any,
        dtype: torch.dtype,
        device: str,
        quantize: str = "none",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.files = files
        self.config = config
        self.dtype = dtype
        self.device = device
        self.quantize = quantize  # how projection, head and embedding weights are held (peer.quantize)
        self.stage: StageModel | None = None
        self.tokenizer = tokenizer
        self.grammars: Grammars | None = None  # built with the first last stage this host holds
        self._lock = threading.Lock()  # one load at a time, whoever calls

    @property
    def range(self) -> tuple[int, int] | None:
        """The layers held, or None."""
        stage = self.stage
        return (stage.start, stage.end) if stage is not None else None

    def load(self, start: int, end: int) -> float:
        """Hold layers [start, end), reading only the tensors not held already; returns seconds taken."""
        with self._lock:
            t0 = time.perf_counter()
            if self.range == (start, end):
                return 0.0
            # Keep what the new range shares with the old one and let the rest go before reading,
            # so memory peaks at the new stage plus one tensor in flight, not at both stages.
            reuse = held_tensors(self.stage, start, end) if self.stage is not None else {}
            self.stage = None
            gc.collect()
            source = open_checkpoint(self.files, self.config, self.dtype)
            try:
                stage = load_stage(source, self.config, start, end, dtype=self.dtype, device=self.device, reuse=reuse,
                                   quantize=self.quantize)  # fmt: skip
            finally:
                source.close()
            log.debug("layers [%d, %d): %d tensors kept from the previous range", start, end, len(reuse))
            if stage.is_last and self.grammars is None and self.tokenizer is not None:
                self.grammars = _grammars(self.tokenizer, self.config.vocab_size)
            self.stage = stage
            release_freed_memory()
            return time.perf_counter() - t0

    def unload(self) -> None:
        """Hold nothing."""
        with self._lock:
            self.stage = None
            gc.collect()
            release_freed_memory()


def _grammars(tokenizer: Tokenizer, vocab_size: int) -> Grammars | None:
    """The tokenizer's grammar form, or None (logged) for a tokenizer llguidance cannot read."""
    try:
        return Grammars(tokenizer.hf, vocab_size, tokenizer.eos_token_ids)
    except Exception as e:  # a slow or exotic tokenizer: structured output is refused, the rest serves
        log.warning("structured output is off on this peer: its tokenizer has no grammar form (%s)", e)
        return None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc only; elsewhere nothing to do). Tensors
    of a few MB come from the heap, whose freed space glibc keeps: after a stage is swapped for
    another, the old stage's memory would stay resident."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
