"""The `swarm` client: the status table drawn from a /swarm/status document shaped like
Node.status() (and fetched from a real local HTTP server), `swarm keygen` writing a key once, and
a clear error when the peer cannot be reached."""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from swarm.auth import key_fingerprint, load_keyring, load_swarm_key
from swarm.cli import format_status, format_timings, main

LEADER, MIDDLE, TAIL, SPARE, GONE = "a1a1a1a1a1a1a1a1", "b2b2b2b2b2b2b2b2", "c3c3c3c3c3c3c3c3", "d4d4", "e5e5"
FINGERPRINT = "0123456789abcdef" * 4


def peer(peer_id: str, node_id: str, state: str, memory_mb: int, loaded: list[int] | None) -> dict[str, Any]:
    """One entry of status["peers"], as swarm.node._peer_json writes it."""
    return {
        "peer_id": peer_id,
        "node_id": node_id,
        "url": f"http://10.0.0.{len(node_id)}:50051",
        "state": state,
        "memory_mb": memory_mb,
        "priority": 0,
        "incarnation": 2,
        "device": "cpu",
        "loaded": loaded,
        "epoch": 4,
        "ready": loaded is not None,
    }


STATUS: dict[str, Any] = {
    "peer_id": MIDDLE,
    "node_id": "mid",
    "url": "http://10.0.0.3:50051",
    "leader": LEADER,
    "term": 12,
    "role": "follower",
    "incarnation": 2,
    "ready": True,
    "model": {"spec": "smollm2-135m", "fingerprint": FINGERPRINT},
    "resources": {"device": "cpu", "name": "cpu", "usable_mb": 3000, "cap_mb": None},
    "loaded": {"start": 10, "end": 20, "epoch": 4},
    "layer_map": {
        "term": 12,
        "epoch": 4,
        "model": FINGERPRINT,
        "num_layers": 30,
        "stages": [
            {"peer_id": LEADER, "url": "http://10.0.0.6:50051", "start": 0, "end": 10, "ready": True},
            {"peer_id": MIDDLE, "url": "http://10.0.0.3:50051", "start": 10, "end": 20, "ready": True},
            {"peer_id": TAIL, "url": "http://10.0.0.4:50051", "start": 20, "end": 30, "ready": False},
        ],
    },
    "peers": [
        peer(MIDDLE, "mid", "alive", 3000, [10, 20]),
        peer(LEADER, "leader", "alive", 8192, [0, 10]),
        peer(TAIL, "tail", "suspect", 4096, [20, 30]),
        peer(SPARE, "spare-1", "alive", 64, None),
        peer(GONE, "gone", "dead", 2048, None),
    ],
    "dropped_messages": {"malformed": 0, "forged": 3, "replayed": 0, "stale": 1, "oversized": 0},
    "errors": ["tail failed to load layers [20, 30): out of memory"],
}


def table(text: str) -> dict[str, list[str]]:
    """The rows of the peer table by peer id, split into cells."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert re.split(r"\s{2,}", lines[header]) == ["PEER", "NODE", "STATE", "MEMORY", "LAYERS", "READY", "URL"]
    rows = [re.split(r"\s{2,}", line) for line in lines[header + 1 : lines.index("(* leader)")]]
    return {row[0]: row for row in rows}


def test_format_status_lists_every_peer() -> None:
    text = format_status(STATUS)
    rows = table(text)
    assert rows == {
        LEADER: [LEADER, "leader *", "alive", "8192 MiB", "[0, 10)", "yes", "http://10.0.0.6:50051"],
        MIDDLE: [MIDDLE, "mid", "alive", "3000 MiB", "[10, 20)", "yes", "http://10.0.0.3:50051"],
        TAIL: [TAIL, "tail", "suspect", "4096 MiB", "[20, 30)", "no", "http://10.0.0.4:50051"],
        SPARE: [SPARE, "spare-1", "alive", "64 MiB", "standby", "-", "http://10.0.0.7:50051"],
        GONE: [GONE, "gone", "dead", "2048 MiB", "standby", "-", "http://10.0.0.4:50051"],
    }
    # Pipeline order first (not the order of "peers"), then the peers standing by.
    assert list(rows) == [LEADER, MIDDLE, TAIL, SPARE, GONE]
    assert sum("*" in cell for row in rows.values() for cell in row) == 1


def test_format_status_summary_lines() -> None:
    lines = format_status(STATUS).splitlines()
    assert lines[0] == f"swarm of 4 live peer(s); leader {LEADER} (leader), term 12"
    assert lines[1] == "model smollm2-135m (fingerprint 0123456789ab...)"
    quantized = {**STATUS, "model": {**STATUS["model"], "quantize": "int8"}}
    assert format_status(quantized).splitlines()[1] == "model smollm2-135m (fingerprint 0123456789ab...), int8 weights"
    assert lines[2] == "layer map epoch 4: READY (3 stage(s), 30 layers)"
    assert lines[3] == f"seen from {MIDDLE} (mid) at http://10.0.0.3:50051"
    assert lines[4] == "error: tail failed to load layers [20, 30): out of memory"
    assert lines[-1] == "(* leader)"


def test_format_status_not_ready_with_a_dead_peer_and_no_errors() -> None:
    status = copy.deepcopy(STATUS)
    status["ready"], status["errors"] = False, []
    status["peers"][2]["state"] = "dead"
    text = format_status(status)
    assert text.splitlines()[2] == "layer map epoch 4: not ready (3 stage(s), 30 layers)"
    assert "error:" not in text
    assert text.splitlines()[0].startswith("swarm of 3 live peer(s);")
    assert table(text)[TAIL][2] == "dead"


def test_format_status_marks_whichever_peer_leads() -> None:
    status = copy.deepcopy(STATUS)
    status["leader"] = TAIL
    rows = table(format_status(status))
    assert [row[1] for row in rows.values()] == ["leader", "mid", "tail *", "spare-1", "gone"]
    assert format_status(status).splitlines()[0] == f"swarm of 4 live peer(s); leader {TAIL} (tail), term 12"


def test_format_status_without_a_map_lists_every_peer_standing_by() -> None:
    """Before the first layer map (a lone peer, or a swarm too small for the model)."""
    status = copy.deepcopy(STATUS)
    status.update(ready=False, layer_map=None, leader=None, errors=[])
    text = format_status(status)
    assert text.splitlines()[0] == "swarm of 4 live peer(s); leader None, term 12"
    assert text.splitlines()[2] == "layer map epoch -: not ready"
    rows = table(text)
    assert list(rows) == [MIDDLE, LEADER, TAIL, SPARE, GONE]  # the order of "peers"
    assert {(row[4], row[5]) for row in rows.values()} == {("standby", "-")}
    assert not any("*" in row[1] for row in rows.values())


def test_format_status_with_a_stage_on_an_unknown_peer() -> None:
    """A map can name a peer this one has since forgotten: it is still listed, by its stage URL."""
    status = copy.deepcopy(STATUS)
    status["peers"] = [p for p in status["peers"] if p["peer_id"] != TAIL]
    rows = table(format_status(status))
    assert rows[TAIL] == [TAIL, "?", "unknown", "0 MiB", "[20, 30)", "no", "http://10.0.0.4:50051"]


# ---- keygen ----------------------------------------------------------------------------------------


def test_format_timings_lists_stages_hops_and_the_entry_when_reported() -> None:
    timings = {"time_to_first_token_s": 0.352, "tokens": 30, "tokens_per_s": 13.87, "total_s": 2.44,
               "compute_s_per_stage": {"a": 1.048}, "wire_s_per_hop": {"entry->a": 0.0, "a->entry": 0.016},
               "bytes_sent": 174423, "entry_s": 0.012, "communication_overhead": 0.018}  # fmt: skip
    lines = format_timings(timings).splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "time to first token", "tokens", "tokens per second", "total", "compute a", "wire entry->a",
        "wire a->entry", "at the entry", "bytes sent", "communication overhead",
    ]  # fmt: skip
    assert lines[7].endswith("12 ms") and lines[8].endswith("174,423") and lines[9].endswith("1.8 %")
    older = {k: v for k, v in timings.items() if k != "entry_s"}  # a peer before entry_s
    assert "at the entry" not in format_timings(older)


def test_keygen_writes_a_key_and_prints_its_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swarm.key"
    assert main(["keygen", "--out", str(path)]) == 0
    key = load_swarm_key(path)
    out = capsys.readouterr().out
    assert f"wrote a new swarm key to {path} (fingerprint {key_fingerprint(key)})" in out
    assert f"--swarm-key-file {path}" in out


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swarm.key"
    assert main(["keygen", "--out", str(path)]) == 0
    first = load_swarm_key(path)
    capsys.readouterr()
    assert main(["keygen", "--out", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("swarm: error: ")
    assert "already exists; pass --force" in captured.err
    assert load_swarm_key(path) == first
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    assert load_swarm_key(path) != first


# ---- status over HTTP ------------------------------------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib would send requests for 127.0.0.1 through a configured proxy."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


SEEN_AUTHORIZATION: list[str | None] = []


@pytest.fixture
def status_server(no_proxy: None) -> Iterator[str]:
    """A local HTTP server answering GET /swarm/status with STATUS; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            SEEN_AUTHORIZATION.append(self.headers.get("Authorization"))
            body = json.dumps(STATUS).encode() if self.path == "/swarm/status" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), name="status-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_status_prints_the_table(status_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", status_server + "/"]) == 0
    assert capsys.readouterr().out == format_status(STATUS) + "\n"


def test_status_json_prints_the_document(status_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", status_server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_of_an_unreachable_peer_is_a_clear_error(no_proxy: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", "http://127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("swarm: error: cannot reach http://127.0.0.1:1/swarm/status")


def test_status_sends_the_api_key_from_a_file_or_the_environment(
    status_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    SEEN_AUTHORIZATION.clear()
    monkeypatch.delenv("SWARM_API_KEY", raising=False)
    keys = tmp_path / "api.keys"
    keys.write_text("# mine\nsk-0123456789abcdef\nsk-second-key-000000\n")
    assert main(["status", "--url", status_server]) == 0
    assert main(["status", "--url", status_server, "--api-key-file", str(keys)]) == 0
    monkeypatch.setenv("SWARM_API_KEY", "sk-from-the-environment")
    assert main(["status", "--url", status_server]) == 0
    assert SEEN_AUTHORIZATION == [None, "Bearer sk-0123456789abcdef", "Bearer sk-from-the-environment"]
    assert main(["status", "--url", status_server, "--api-key-file", str(tmp_path / "absent")]) == 2
    assert "cannot read API key file" in capsys.readouterr().err


# ---- keys: a keyring that running peers reload -------------------------------------------------------


def fingerprints(out: str) -> list[tuple[str, str]]:
    return re.findall(r"^  ([0-9a-f]{12})  (primary|accepted)", out, re.MULTILINE)


def test_keys_rotate_a_keyring_file_step_by_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ring, new_key = tmp_path / "swarm.key", tmp_path / "new.key"
    assert main(["keygen", "--out", str(ring)]) == 0
    old = key_fingerprint(load_swarm_key(ring))
    assert main(["keygen", "--out", str(new_key)]) == 0
    new = key_fingerprint(load_swarm_key(new_key))
    capsys.readouterr()
    assert main(["keys", "install", "--keyring", str(ring), "--key-file", str(new_key)]) == 0
    out = capsys.readouterr().out
    assert fingerprints(out) == [(old, "primary"), (new, "accepted")] and "reload" in out
    assert main(["keys", "use", "--keyring", str(ring), new]) == 0
    assert fingerprints(capsys.readouterr().out) == [(old, "accepted"), (new, "primary")]
    assert main(["keys", "remove", "--keyring", str(ring), new]) == 2  # not the primary
    assert "make another key primary first" in capsys.readouterr().err
    assert main(["keys", "remove", "--keyring", str(ring), old]) == 0
    assert fingerprints(capsys.readouterr().out) == [(new, "primary")]
    assert load_keyring(ring).keys == [load_swarm_key(new_key)]
    assert ring.stat().st_mode & 0o777 == 0o600
    assert main(["keys", "list", "--keyring", str(ring)]) == 0
    assert fingerprints(capsys.readouterr().out) == [(new, "primary")]


def test_keys_install_starts_a_new_keyring_and_refuses_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring, key_file = tmp_path / "ring", tmp_path / "k"
    assert main(["keygen", "--out", str(key_file)]) == 0
    key = load_swarm_key(key_file)
    capsys.readouterr()
    assert main(["keys", "install", "--keyring", str(ring), "--key-file", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert fingerprints(out) == [(key_fingerprint(key), "primary")] and key.hex() not in out  # no secret printed
    assert load_keyring(ring).keys == [key]
    assert main(["keys", "install", "--keyring", str(ring), "--key-file", str(key_file)]) == 2
    assert "already holds key" in capsys.readouterr().err
    assert main(["keys", "use", "--keyring", str(ring), "0123456789ab"]) == 2
    assert "holds no key with fingerprint '0123456789ab'" in capsys.readouterr().err
    assert main(["keys", "install", "--keyring", str(ring), "--key-file", str(tmp_path / "absent")]) == 2
    assert "cannot read swarm key file" in capsys.readouterr().err
