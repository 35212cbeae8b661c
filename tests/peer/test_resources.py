"""Resource detection: device choice, free memory, and the simulated cap, with stand-in probes for
hardware this machine does not have."""

from __future__ import annotations

import pytest
import torch

from peer.config import ResourceConfig
from peer.errors import ConfigError
from peer.resources import MIB, DeviceMemory, Probes, detect_resources, resolve_dtype


def probes(cuda: int = 0, mps: bool = False) -> Probes:
    return Probes(
        cuda_count=lambda: cuda,
        mps_available=lambda: mps,
        cuda=lambda i: DeviceMemory(f"cuda:{i}", "Fake GPU", 8192 * MIB, 6000 * MIB),
        mps=lambda: DeviceMemory("mps", "Fake MPS", 16384 * MIB, 12000 * MIB),
        cpu=lambda: DeviceMemory("cpu", "CPU", 32768 * MIB, 20000 * MIB),
    )


def test_auto_prefers_cuda_then_mps_then_cpu() -> None:
    cfg = ResourceConfig()
    assert detect_resources(cfg, probes(cuda=2, mps=True)).device == "cuda:0"
    assert detect_resources(cfg, probes(mps=True)).device == "mps"
    assert detect_resources(cfg, probes()).device == "cpu"


def test_usable_is_free_less_reserve_capped() -> None:
    r = detect_resources(ResourceConfig(reserve_mb=500), probes(cuda=1))
    assert (r.total_bytes, r.free_bytes, r.cap_bytes, r.usable_bytes) == (
        8192 * MIB,
        6000 * MIB,
        None,
        5500 * MIB,
    )
    capped = detect_resources(ResourceConfig(max_memory_mb=512, reserve_mb=500), probes(cuda=1))
    assert capped.usable_bytes == 512 * MIB and capped.cap_bytes == 512 * MIB
    # A cap above what is free changes nothing.
    assert detect_resources(ResourceConfig(max_memory_mb=10**6, reserve_mb=0), probes()).usable_bytes == 20000 * MIB
    assert "512 MiB usable" in capped.summary()


def test_explicit_devices() -> None:
    assert detect_resources(ResourceConfig(device="cuda:1"), probes(cuda=2)).device == "cuda:1"
    with pytest.raises(ConfigError, match="1 CUDA device"):
        detect_resources(ResourceConfig(device="cuda:1"), probes(cuda=1))
    with pytest.raises(ConfigError, match="MPS is not available"):
        detect_resources(ResourceConfig(device="mps"), probes())
    with pytest.raises(ConfigError, match="device"):
        ResourceConfig(device="tpu")
    with pytest.raises(ConfigError, match="max_memory_mb"):
        ResourceConfig(max_memory_mb=0)


def test_real_machine_probe() -> None:
    r = detect_resources(ResourceConfig(device="cpu", max_memory_mb=300, reserve_mb=0))
    assert r.device == "cpu" and r.total_bytes >= r.free_bytes > 0
    assert r.usable_bytes == min(r.free_bytes, 300 * MIB)


def test_dtypes() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "mps") == torch.float16
