"""What memory this peer can give to weights and KV cache. It detects the device (CUDA, then MPS,
then CPU), reads its total and free memory, and applies the simulated cap from config, so peers on
one machine can pretend to be small GPUs. The probes are injectable so the decision is tested
without the hardware; this module never allocates model memory itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from peer.config import ResourceConfig
from peer.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as its driver reports it."""

    device: str  # torch device string: "cpu", "cuda:0", "mps"
    name: str  # human-readable device name
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Resources:
    """The device a peer runs on and the bytes it can give to weights and KV cache."""

    device: str
    name: str
    total_bytes: int
    free_bytes: int
    cap_bytes: int | None  # simulated cap, if one was configured
    usable_bytes: int  # min(free - reserve, cap): the budget for weights plus KV cache

    def summary(self) -> str:
        """One log line: device, free and usable memory."""
        cap = f", cap {self.cap_bytes // MIB} MiB" if self.cap_bytes is not None else ""
        return (
            f"{self.device} ({self.name}): {self.free_bytes // MIB} of {self.total_bytes // MIB} MiB free"
            f"{cap}, {self.usable_bytes // MIB} MiB usable"
        )


def probe_cuda(index: int) -> DeviceMemory:
    """Free and total memory of one CUDA device."""
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(f"cuda:{index}", torch.cuda.get_device_name(index), int(total), int(free))


def probe_mps() -> DeviceMemory:
    """Apple-silicon memory: the recommended working set, less what torch holds already."""
    total = int(torch.mps.recommended_max_memory())
    free = max(0, total - int(torch.mps.driver_allocated_memory()))
    return DeviceMemory("mps", "Apple MPS", total, free)


def probe_cpu() -> DeviceMemory:
    """System memory; 'free' is what the kernel says is available without swapping."""
    vm = psutil.virtual_memory()
    return DeviceMemory("cpu", "CPU", int(vm.total), int(vm.available))


@dataclass(frozen=True)
class Probes:
    """How to see the hardware; tests replace these."""

    cuda_count: Callable[[], int] = lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps_available: Callable[[], bool] = lambda: bool(
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    )
    cuda: Callable[[int], DeviceMemory] = probe_cuda
    mps: Callable[[], DeviceMemory] = probe_mps
    cpu: Callable[[], DeviceMemory] = probe_cpu


def _probe(device: str, probes: Probes) -> DeviceMemory:
    if device == "auto":
        if probes.cuda_count() > 0:
            return probes.cuda(0)
        if probes.mps_available():
            return probes.mps()
        return probes.cpu()
    if device == "cpu":
        return probes.cpu()
    if device == "mps":
        if not probes.mps_available():
            raise ConfigError("device 'mps' was asked for but MPS is not available on this machine")
        return probes.mps()
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = probes.cuda_count()
    if index >= count:
        raise ConfigError(f"device {device!r} was asked for but this machine has {count} CUDA device(s)")
    return probes.cuda(index)


def detect_resources(config: ResourceConfig, probes: Probes | None = None) -> Resources:
    """Pick the device and compute the bytes it can give to weights plus KV cache."""
    mem = _probe(config.device, probes or Probes())
    reserve = config.reserve_mb * MIB
    usable = max(0, mem.free_bytes - reserve)
    cap = config.max_memory_mb * MIB if config.max_memory_mb is not None else None
    if cap is not None:
        usable = min(usable, cap)
    return Resources(mem.device, mem.name, mem.total_bytes, mem.free_bytes, cap, usable)


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (fast and exact there); bfloat16 where the accelerator supports it, else float16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(name: str, device: str, quantize: str = "none") -> torch.dtype:
    """Turn a config dtype name into a torch dtype for this device; "auto" with quantized weights on
    CPU is bfloat16, the activations PyTorch's int8 weight-only kernel takes (`peer.quantize`).
    ConfigError for int4 weights off the CPU, where this build has no int4 kernel for them."""
    if quantize == "int4" and device != "cpu":
        raise ConfigError(
            f"int4 weights run on the CPU only (PyTorch's CPU int4 kernel); use --quantize int8 on {device}"
        )
    if name == "auto":
        if quantize != "none" and device == "cpu":
            return torch.bfloat16
        return default_dtype(device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtypes[name]
