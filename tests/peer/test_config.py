"""Config: the shipped default.yaml builds every section; unknown keys and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.config import PeerConfig, default_config_path, peer_config_from_dict, read_config_file
from peer.errors import ConfigError


def test_default_yaml_matches_dataclass_defaults() -> None:
    assert peer_config_from_dict(read_config_file(default_config_path())) == PeerConfig()


def test_unknown_key_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*kv_budget"):
        peer_config_from_dict({"executor": {"kv_budget": 3}})
    with pytest.raises(ConfigError, match="dtype"):
        peer_config_from_dict({"model": {"dtype": "int3"}})
    with pytest.raises(ConfigError, match="mapping"):
        peer_config_from_dict({"store": [1, 2]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "none.yaml")


def test_wrong_types_are_refused() -> None:
    bad_sections = [
        {"resources": {"device": "cuda:abc"}},
        {"resources": {"device": 5}},
        {"resources": {"max_memory_mb": "512"}},
        {"model": {"spec": 123}},
        {"model": {"spec": "  "}},
        {"executor": {"max_sessions": 2.5}},
        {"executor": {"session_idle_timeout_s": "soon"}},
        {"store": {"cache_dir": 7}},
    ]
    for raw in bad_sections:
        with pytest.raises(ConfigError):
            peer_config_from_dict(raw)
    assert peer_config_from_dict({"resources": {"device": "cuda:1"}}).resources.device == "cuda:1"
