"""The layers this peer holds. The node asks for a range whenever the layer map changes; the host
loads it from the model files (in a worker thread, never on the event loop), keeps the tensors of
layers it already holds, and drops what it no longer serves. It knows the model side's loaders,
not the swarm's messages; the data plane will run its executor over `stage`."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import torch

from peer.checkpoint import open_checkpoint
from peer.model_store import ModelFiles
from peer.shard import held_tensors, load_stage
from peer.stage import StageModel

log = logging.getLogger(__name__)


class StageHost:
    """Holds at most one stage, [start, end) of the model, and swaps it for another range."""

    def __init__(self, files: ModelFiles, config: Any, dtype: torch.dtype, device: str) -> None:
        self.files = files
        self.config = config
        self.dtype = dtype
        self.device = device
        self.stage: StageModel | None = None
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
            reuse = held_tensors(self.stage) if self.stage is not None else {}
            source = open_checkpoint(self.files, self.config, self.dtype)
            try:
                stage = load_stage(source, self.config, start, end, dtype=self.dtype, device=self.device, reuse=reuse)
            finally:
                source.close()
            kept = sum(1 for name in reuse if _layer_index(name) in range(start, end))
            self.stage = stage
            del reuse
            gc.collect()  # release the layers dropped from the old range now, not at some later collection
            log.debug("layers [%d, %d): %d tensors kept from the previous range", start, end, kept)
            return time.perf_counter() - t0

    def unload(self) -> None:
        """Hold nothing."""
        with self._lock:
            self.stage = None
            gc.collect()


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1
