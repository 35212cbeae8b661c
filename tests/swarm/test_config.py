"""The swarm side of the config: the repository's default.yaml gives exactly the dataclass defaults
(so the two cannot drift), unknown or bad values are ConfigErrors, HOST:PORT parsing, and the
daemon's flags laid over the file, its exposure check and where it finds the swarm key."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from peer.config import default_config_path, read_config_file
from peer.errors import ConfigError
from swarm.auth import Keyring
from swarm.config import (
    SWARM_SECTIONS,
    DiscoveryConfig,
    NodeConfig,
    SecurityConfig,
    SwarmConfig,
    parse_host_port,
    swarm_config_from_dict,
)
from swarm.daemon import check_exposure, config_from_args, parse_args, resolve_keyring
from swarm.errors import SwarmKeyError

KEY = bytes(range(32))


def default_raw() -> dict[str, Any]:
    return read_config_file(default_config_path())


def test_default_yaml_holds_every_swarm_section() -> None:
    raw = default_raw()
    for name, cls in SWARM_SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name


@pytest.mark.parametrize("section", sorted(SWARM_SECTIONS))
def test_default_yaml_gives_the_dataclass_defaults(section: str) -> None:
    from_yaml = getattr(swarm_config_from_dict(default_raw()), section)
    from_code = getattr(SwarmConfig(), section)
    for f in dataclasses.fields(from_code):
        assert getattr(from_yaml, f.name) == getattr(from_code, f.name), f"{section}.{f.name}"
        assert type(getattr(from_yaml, f.name)) in (type(getattr(from_code, f.name)), int), f"{section}.{f.name}"
    assert from_yaml == from_code


def test_default_yaml_gives_the_model_side_defaults_too() -> None:
    assert swarm_config_from_dict(default_raw()).peer == SwarmConfig().peer


def test_empty_file_is_all_defaults() -> None:
    assert swarm_config_from_dict({}) == SwarmConfig()
    assert swarm_config_from_dict(dict.fromkeys(SWARM_SECTIONS)) == SwarmConfig()


def test_unknown_section_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown config section"):
        swarm_config_from_dict({**default_raw(), "gossp": {"interval_s": 1.0}})


@pytest.mark.parametrize("section", sorted(SWARM_SECTIONS))
def test_unknown_key_is_a_config_error(section: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\) in config section '{section}': typo_s"):
        swarm_config_from_dict({section: {"typo_s": 1}})


def test_section_that_is_not_a_mapping_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        swarm_config_from_dict({"gossip": [1, 2]})


@pytest.mark.parametrize(
    ("section", "values", "match"),
    [
        ("gossip", {"suspect_after_s": 6.0, "dead_after_s": 6.0}, "interval_s < suspect_after_s < dead_after_s"),
        ("gossip", {"interval_s": 3.0}, "interval_s < suspect_after_s"),
        ("gossip", {"interval_s": 0}, "gossip.interval_s must be positive"),
        ("gossip", {"fanout": True}, "gossip.fanout must be a positive integer"),
        ("gossip", {"max_members": 0}, "gossip.max_members"),
        ("node", {"port": -1}, "node.port must be 0..65535"),
        ("node", {"port": 65536}, "node.port"),
        ("node", {"port": "80"}, "node.port"),
        ("node", {"host": ""}, "node.host"),
        ("node", {"node_id": "has space"}, "node.node_id"),
        ("node", {"node_id": "x" * 65}, "node.node_id"),
        ("node", {"node_id": 5}, "node.node_id"),
        ("node", {"priority": 1.5}, "node.priority"),
        ("election", {"coordinator_timeout_s": 2.0}, "coordinator_timeout_s must exceed timeout_max_s"),
        ("election", {"coordinator_timeout_s": 1.0}, "coordinator_timeout_s must exceed"),
        ("election", {"timeout_min_s": 3.0}, "timeout_min_s <= timeout_max_s"),
        ("election", {"timeout_min_s": 0}, "0 < timeout_min_s"),
        ("election", {"startup_grace_s": -1}, "election.startup_grace_s"),
        ("discovery", {"join": ["nohost"]}, "expected HOST:PORT .or .IPv6.:PORT., got 'nohost'"),
        ("discovery", {"join": ["127.0.0.1:5000", "h:0"]}, "expected HOST:PORT .or .IPv6.:PORT., got 'h:0'"),
        ("discovery", {"join": "a:1"}, "discovery.join must be a list"),
        ("discovery", {"mdns": "yes"}, "discovery.mdns"),
        ("security", {"insecure": 1}, "security.insecure"),
        ("security", {"max_clock_skew_s": 0}, "security.max_clock_skew_s"),
        ("security", {"replay_window": 0}, "security.replay_window"),
        ("security", {"max_message_bytes": 1.5}, "security.max_message_bytes"),
        ("security", {"swarm_key_file": 5}, "security.swarm_key_file"),
        ("partition", {"kv_reserve_tokens": -1}, "partition.kv_reserve_tokens"),
        ("serving", {"max_batch_tokens": 0}, "serving.max_batch_tokens must be a positive integer"),
        ("serving", {"max_batch_tokens": 1.5}, "serving.max_batch_tokens"),
        ("serving", {"batch_wait_s": -0.1}, "serving.batch_wait_s must be between 0 and 10"),
        ("serving", {"batch_wait_s": 11}, "serving.batch_wait_s"),
        ("serving", {"batch_wait_s": "1"}, "serving.batch_wait_s"),
        ("serving", {"loop_nice": 20}, "serving.loop_nice must be an integer from 0 to 19"),
        ("serving", {"loop_nice": -1}, "serving.loop_nice"),
        ("serving", {"loop_nice": 1.5}, "serving.loop_nice"),
        ("serving", {"max_tokens_limit": 0}, "serving.max_tokens_limit must be a positive integer"),
        ("serving", {"max_prompt_tokens": -1}, "serving.max_prompt_tokens must be a positive integer"),
        ("serving", {"max_sessions_per_client": 0}, "serving.max_sessions_per_client"),
        ("serving", {"max_connections": "many"}, "serving.max_connections"),
        ("serving", {"max_tokens_limit": 8}, "serving.default_max_tokens \\(16\\) exceeds serving.max_tokens_limit"),
        ("security", {"cluster": ""}, "security.cluster must be 1-64 letters"),
        ("security", {"cluster": "lab b"}, "security.cluster"),
        ("security", {"cluster": 5}, "security.cluster"),
        ("security", {"api_key_file": 5}, "security.api_key_file must be a path string"),
    ],
)
def test_bad_values_are_config_errors(section: str, values: dict[str, Any], match: str) -> None:
    raw = default_raw()
    raw[section] = {**raw[section], **values}
    with pytest.raises(ConfigError, match=match):
        swarm_config_from_dict(raw)


def test_join_list_becomes_a_tuple() -> None:
    config = swarm_config_from_dict({"discovery": {"join": ["a:1", "[::1]:2"]}})
    assert config.discovery.join == ("a:1", "[::1]:2")
    from_yaml = DiscoveryConfig(join=["a:1"])  # type: ignore[arg-type]  # a list, as YAML gives it
    assert from_yaml == DiscoveryConfig(join=("a:1",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("[::1]:5000", ("::1", 5000)), ("host.local:1", ("host.local", 1)),
     ("peer-2:65535", ("peer-2", 65535))],
)  # fmt: skip
def test_parse_host_port_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    ["nohost", "h:0", "h:70000", "h:65536", ":5000", "h:", "h:-1", "h :1", "", "h:1x",
     "[::1:5000", "host]:1", "::1:5000", "1.2.3.4:5:6"],
)  # fmt: skip
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_host_port(text)


def test_parse_host_port_rejects_a_non_string() -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_host_port(5000)  # type: ignore[arg-type]


# ---- the daemon's flags ----------------------------------------------------------------------------


def test_no_flags_gives_the_file() -> None:
    assert config_from_args(parse_args([])) == swarm_config_from_dict(default_raw())


def test_flags_override_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "swarm.key"
    args = parse_args(
        [
            "--host", "0.0.0.0",
            "--port", "0",
            "--model", "some/model",
            "--max-vram-mb", "2048",
            "--priority", "5",
            "--state-dir", str(tmp_path / "state"),
            "--swarm-key-file", str(key_file),
            "--api-key-file", str(tmp_path / "api.keys"),
            "--insecure",
            "--mdns-interface", "127.0.0.1",
            "--no-mdns",
            "--join", "10.0.0.2:50051",
            "--join", "[::1]:50052",
            "--node-id", "peer-a",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.node == NodeConfig(
        host="0.0.0.0", port=0, node_id="peer-a", priority=5, state_dir=str(tmp_path / "state")
    )
    assert config.peer.model.spec == "some/model"
    assert config.peer.resources.max_memory_mb == 2048
    assert config.security == dataclasses.replace(
        SecurityConfig(), swarm_key_file=str(key_file), api_key_file=str(tmp_path / "api.keys"), insecure=True
    )
    assert config.discovery == DiscoveryConfig(
        mdns=False, mdns_interface="127.0.0.1", join=("10.0.0.2:50051", "[::1]:50052")
    )
    # What no flag touched stays as the file says.
    assert (config.gossip, config.election, config.partition) == (
        SwarmConfig().gossip,
        SwarmConfig().election,
        SwarmConfig().partition,
    )
    assert config.peer.executor == SwarmConfig().peer.executor
    assert config.peer.model.dtype == "auto"


def test_max_memory_mb_is_the_same_flag_as_max_vram_mb() -> None:
    assert config_from_args(parse_args(["--max-memory-mb", "512"])).peer.resources.max_memory_mb == 512
    assert config_from_args(parse_args(["--max-vram-mb", "512"])) == config_from_args(
        parse_args(["--max-memory-mb", "512"])
    )


def test_flags_lay_over_another_config_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.yaml"
    path.write_text("node:\n  port: 6000\n  priority: 3\ngossip:\n  fanout: 5\ndiscovery:\n")
    config = config_from_args(parse_args(["--config", str(path), "--priority", "9", "--join", "h:1"]))
    assert (config.node.port, config.node.priority) == (6000, 9)
    assert config.gossip.fanout == 5
    assert config.discovery.join == ("h:1",)
    assert config.node.host == NodeConfig().host


def test_a_flag_for_a_section_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "peer.yaml"
    path.write_text("node: 5\n")
    with pytest.raises(ConfigError, match="'node' must be a mapping"):
        config_from_args(parse_args(["--config", str(path), "--port", "1"]))


def test_a_bad_flag_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        config_from_args(parse_args(["--join", "nohost"]))
    with pytest.raises(ConfigError, match=r"node\.node_id"):
        config_from_args(parse_args(["--node-id", "a b"]))
    with pytest.raises(ConfigError, match=r"node\.port"):
        config_from_args(parse_args(["--port", "70000"]))


# ---- exposure and the swarm key --------------------------------------------------------------------


def on(host: str, *, insecure: bool = False) -> SwarmConfig:
    return SwarmConfig(node=NodeConfig(host=host), security=SecurityConfig(insecure=insecure))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "peer.local"])
def test_non_loopback_without_a_key_is_refused(host: str) -> None:
    with pytest.raises(SwarmKeyError, match=f"refusing to listen on {host} without a swarm key") as e:
        check_exposure(on(host), Keyring())
    assert "swarm keygen" in str(e.value)
    assert "--insecure" in str(e.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_non_loopback_with_a_key_or_insecure_is_allowed(host: str) -> None:
    check_exposure(on(host), Keyring.of(KEY))
    check_exposure(on(host, insecure=True), Keyring())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_without_a_key_is_allowed(host: str) -> None:
    check_exposure(on(host), Keyring())


def test_resolve_swarm_key_reads_the_file_in_config(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(KEY.hex() + "\n")
    config = SwarmConfig(security=SecurityConfig(swarm_key_file=str(path)))
    assert resolve_keyring(config, {}).keys == [KEY]
    assert resolve_keyring(config, {"SWARM_KEY": "ab" * 32}).keys == [KEY]  # the file wins


def test_resolve_swarm_key_falls_back_to_the_environment() -> None:
    assert resolve_keyring(SwarmConfig(), {"SWARM_KEY": KEY.hex()}).keys == [KEY]
    assert not resolve_keyring(SwarmConfig(), {}).secure
    assert not resolve_keyring(SwarmConfig(), {"SWARM_KEY": ""}).secure
    with pytest.raises(SwarmKeyError, match=r"^SWARM_KEY must be 64 hex digits"):
        resolve_keyring(SwarmConfig(), {"SWARM_KEY": "abc"})


def test_resolve_swarm_key_of_a_missing_file(tmp_path: Path) -> None:
    config = SwarmConfig(security=SecurityConfig(swarm_key_file=str(tmp_path / "absent.key")))
    with pytest.raises(SwarmKeyError, match="cannot read swarm key file"):
        resolve_keyring(config, {"SWARM_KEY": KEY.hex()})


def test_swarm_peer_on_a_public_address_without_a_key_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarm.daemon import main

    monkeypatch.delenv("SWARM_KEY", raising=False)
    for name in ("aiohttp", "zeroconf", "peer", "swarm.stage_host"):  # main() quiets these; restore after
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    # It stops before resolving any model, so the missing model path is never reached.
    code = main(["--host", "0.0.0.0", "--port", "0", "--no-mdns", "--model", str(tmp_path / "nothing")])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without a swarm key" in err and "--insecure" in err


def test_the_event_loop_runs_niced_above_its_compute_thread() -> None:
    """Run in a thread of its own: niceness is per thread on Linux, and the test runner's must not change."""
    import os
    import threading

    from swarm.daemon import lower_loop_priority

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, int] = {}

    def loop_thread() -> None:
        seen["base"] = nice()
        compute = lower_loop_priority(7)
        try:
            seen["loop"], seen["compute"] = nice(), compute.submit(nice).result()
        finally:
            compute.shutdown(wait=True)

    thread = threading.Thread(target=loop_thread, name="niced-loop")
    thread.start()
    thread.join(timeout=30)
    assert seen["loop"] == min(seen["base"] + 7, 19) and seen["compute"] == seen["base"]
