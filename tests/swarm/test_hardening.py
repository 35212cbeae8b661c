"""Three `swarm-peer` processes on 127.0.0.1 (SmolLM2-135M), each with a keyring file of its own
and an API key file, attacked and operated as a deployed swarm is:

- the public API needs a Bearer key (401 without), and its limits hold: body size (413),
  max_tokens and prompt length (400), concurrent generations per client (429);
- a rogue process without the swarm key cannot join, win an election, push a layer map, open a
  session, inject, steal or close a session's activations, and its replay of captured traffic
  is refused, while a generation in flight finishes with the same text;
- the swarm key is rotated on the running peers (install, use, remove, peer by peer) while
  requests run back to back, and not one of them fails or changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from swarm.auth import Keyring, Sealer, key_fingerprint, load_keyring, load_swarm_key
from swarm.cli import main as swarm_cli
from swarm.identity import Identity
from swarm.layer_map import LayerMap
from tests.swarm.prober import Prober
from tests.swarm.procs import PeerProcess, start_seeded_swarm, wait_for, write_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CAPS_MB = {"a": 300, "b": 600, "c": 900}
KEY_A, KEY_B = "sk-client-a-0123456789abcdef", "sk-client-b-0123456789abcdef"
PROMPT = "The history of the printing press"
MAX_TOKENS = 12
LIMITS = {"max_request_bytes": 16 * 1024, "max_tokens_limit": 200, "max_prompt_tokens": 64,
          "max_sessions_per_client": 2}  # fmt: skip


@pytest.fixture(scope="module")
def swarm(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store, files = smollm2
    tmp = tmp_path_factory.mktemp("hardened")
    gossip = {"interval_s": 1.0, "suspect_after_s": 3.0, "dead_after_s": 6.0, "request_timeout_s": 2.0}
    config = write_config(tmp / "config.yaml", store.cache_dir, gossip=gossip, serving=LIMITS)
    (tmp / "api.keys").write_text(f"{KEY_A}\n{KEY_B}\n")
    peers: list[PeerProcess] = []
    try:
        status = start_seeded_swarm(tmp, config, CAPS_MB, peers, extra_args=("--api-key-file", str(tmp / "api.keys")),
                                    own_keyrings=True, api_key=KEY_A)  # fmt: skip
        by_url = {p.url: p for p in peers}
        ordered = [by_url[s["url"]] for s in status["layer_map"]["stages"]]
        yield {"tmp": tmp, "peers": ordered, "status": status, "key": load_swarm_key(tmp / "swarm.key"),
               "hidden_size": files.load_config().hidden_size}  # fmt: skip
    finally:
        for p in peers:
            p.stop()


def call(url: str, path: str, body: Any = None, key: str | None = KEY_A, raw: bytes | None = None) -> tuple[int, Any]:
    """A JSON request; the status and the decoded answer (the error object on failure)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers), timeout=300) as r:
            text = r.read()
            return r.status, json.loads(text) if r.headers.get_content_type() == "application/json" else text.decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def complete(url: str, key: str = KEY_A, **extra: Any) -> dict[str, Any]:
    status, body = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra},
                        key)  # fmt: skip
    assert status == 200, body
    answer: dict[str, Any] = body
    return answer


@pytest.fixture(scope="module")
def reference(swarm) -> str:
    return str(complete(swarm["peers"][0].url)["choices"][0]["text"])


# ---- the public API ----------------------------------------------------------------------------------


def test_the_api_needs_a_bearer_key(swarm, reference: str) -> None:
    url = swarm["peers"][1].url
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": []}),
                       ("/v1/models", None), ("/metrics", None), ("/swarm/status", None)):  # fmt: skip
        for key in (None, "sk-not-a-key-000000000000", KEY_A[:-1]):
            status, error = call(url, path, body, key)
            assert status == 401 and error["code"] == "invalid_api_key", (path, key, error)
    assert call(url, "/healthz", key=None)[0] == 200  # liveness stays open
    # The key is needed however the path is spelled (the check runs on the path the router sees).
    for path in ("/v1/models/", "/%76%31/models", "/healthz/../metrics", "/v1//models", "/swarm/status?x=1"):
        req = urllib.request.Request(url + path)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code in (401, 404), (path, e.value.code)
    head = urllib.request.Request(url + "/v1/models", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(head, timeout=30)
    assert e.value.code == 401
    assert call(url, "/v1/models", key=KEY_B)[0] == 200
    assert complete(url, KEY_B)["choices"][0]["text"] == reference


def test_the_api_limits_hold(swarm) -> None:
    url = swarm["peers"][2].url
    status, error = call(url, "/v1/completions", raw=b'{"prompt": "' + b"x" * 20_000 + b'"}')
    assert status == 413 and error["code"] == "request_too_large"
    status, error = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 201})
    assert status == 400 and error["param"] == "max_tokens" and "limit of 200" in error["message"]
    status, error = call(url, "/v1/completions", {"prompt": "word " * 100, "max_tokens": 1})
    assert status == 400 and error["code"] == "context_length_exceeded"
    status, error = call(url, "/v1/completions", {"prompt": list(range(65)), "max_tokens": 1})
    assert status == 400 and error["code"] == "context_length_exceeded"
    status, error = call(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 200}]})
    assert status == 400 and error["code"] == "context_length_exceeded"


def test_a_client_runs_at_most_its_share_of_generations(swarm, reference: str) -> None:
    """Two long streams hold client A's two slots: a third request of A is refused at once with a
    429, while client B is served; once the streams end, A is served again."""
    url = swarm["peers"][0].url
    started, finished = threading.Barrier(3), []

    def long_stream() -> None:
        body = {"prompt": PROMPT, "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY_A}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.readline()  # the first event: this stream holds its slot
            started.wait(timeout=120)
            finished.append(resp.read().decode().splitlines())

    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(long_stream) for _ in range(2)]
        started.wait(timeout=120)
        status, error = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, KEY_A)
        assert not finished, "the streams ended before the third request: the test proves nothing"
        assert status == 429 and error["code"] == "too_many_sessions"
        assert complete(url, KEY_B)["choices"][0]["text"] == reference
        for s in streams:
            s.result()
    assert len(finished) == 2 and all("data: [DONE]" in lines for lines in finished)
    assert complete(url, KEY_A)["choices"][0]["text"] == reference


# ---- a rogue process without the key ----------------------------------------------------------------


def status_of(peer: PeerProcess) -> dict[str, Any]:
    status = peer.status()
    assert status is not None, f"{peer.name} does not answer"
    return status


def swarm_state(peers: list[PeerProcess]) -> list[tuple[Any, ...]]:
    out = []
    for p in peers:
        s = p.status()
        assert s is not None
        members = sorted(m["peer_id"] for m in s["peers"])
        out.append((s["leader"], s["term"], s["layer_map"]["epoch"], members, s["ready"]))
    return out


def test_a_rogue_process_without_the_key_changes_nothing(swarm, reference: str) -> None:
    peers = swarm["peers"]
    status = peers[0].status()
    assert status is not None
    before = swarm_state(peers)
    prober = Prober(status["layer_map"], status["model"]["fingerprint"], load_keyring(swarm["tmp"] / "a.key"))
    prompt = [1, 504, 3021, 282, 260, 6163]
    # The victim session and a control that no one attacks, stepped alike.
    tokens = {s: prober.step(s, prompt, 0, opening=True) for s in ("victim", "control")}
    assert tokens["victim"] == tokens["control"]
    # A genuine link handshake, delivered once, captured for the rogue to replay.
    genuine = prober.handshake_once(0)
    drops_before = [status_of(p)["dropped_messages"] for p in peers]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, peers[0].url, KEY_A, max_tokens=40, ignore_eos=True)  # in flight meanwhile
        plan = {
            "stages": status["layer_map"]["stages"],
            "epoch": status["layer_map"]["epoch"],
            "map": LayerMap.from_dict(status["layer_map"]).id,
            "term": status["term"],
            "fingerprint": status["model"]["fingerprint"],
            "num_layers": status["model"]["num_layers"],
            "captured": [{"url": status["layer_map"]["stages"][0]["url"], "data": genuine.hex()}],
        }
        rogue = subprocess.run([sys.executable, "-m", "tests.swarm.rogue"], input=json.dumps(plan), cwd=ROOT,
                               capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        text = running.result()["choices"][0]["text"]
    results = json.loads(rogue.stdout)
    control = ["join", "election", "coordinator", "layer_map", "gossip"]
    ways = ["own_key", "no_key", "plain"]
    assert set(results) == {f"{a}/{w}" for a in [*control, "link"] for w in ways} | {"replay/0"}
    for attempt, answers in results.items():
        want = (409, "replayed") if attempt.startswith("replay/") else (
            (400, "malformed") if attempt.endswith("/plain") else (401, "unknown_key"))  # fmt: skip
        assert all(tuple(a) == want for a in answers), (attempt, answers)
    assert text.startswith(reference)  # the generation in flight ran on, undisturbed
    assert swarm_state(peers) == before  # no member, leader, term or layer map came from the rogue
    drops_after = [status_of(p)["dropped_messages"] for p in peers]
    sealed_attempts = 2 * (len(control) + 1) * len(peers)
    assert sum(d["unknown_key"] - b["unknown_key"] for d, b in zip(drops_after, drops_before, strict=True)) == (
        sealed_attempts
    )
    assert sum(d["replayed"] - b["replayed"] for d, b in zip(drops_after, drops_before, strict=True)) == 1
    # The flood is counted, not logged line by line: one warning per kind of refusal at most.
    for p in peers:
        lines = p.log().splitlines()
        for kind in ("unknown_key", "malformed"):
            assert sum(f"refused {kind}:" in line for line in lines) <= 1, (p.name, kind)
    # The victim session is open and intact: its next step gives what the untouched control's does.
    nxt = {s: prober.step(s, [tokens[s]], len(prompt)) for s in ("victim", "control")}
    assert nxt["victim"] == nxt["control"]
    for s in ("victim", "control"):
        prober.close(s)
    wait_for(lambda: all(status_of(p)["sessions"] == 0 for p in peers), 60, "the probed sessions closed on every stage")


# ---- key rotation on the running swarm ---------------------------------------------------------------


def has_keys(peer: PeerProcess, want: dict[str, Any]) -> bool:
    status = peer.status()
    keys = status["swarm_keys"] if status else {}
    return keys.get("primary") == want["primary"] and keys.get("accepted") == want["accepted"]


def test_rotating_the_swarm_key_loses_no_request(swarm, reference: str, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, peers = swarm["tmp"], swarm["peers"]
    old, new = swarm["key"], os.urandom(32)
    (tmp / "new.key").write_text(new.hex() + "\n")
    old_fp, new_fp = key_fingerprint(old), key_fingerprint(new)
    stop, texts, failures = threading.Event(), [], []

    def traffic() -> None:  # requests back to back, entering at every peer in turn
        i = 0
        while not stop.is_set():
            try:
                texts.append(complete(peers[i % len(peers)].url)["choices"][0]["text"])
            except Exception as e:  # any failure is the test's finding, not the end of the traffic
                failures.append(f"{type(e).__name__}: {e}")
            i += 1

    drops_before = sum(status_of(p)["dropped_messages"]["unknown_key"] for p in peers)
    thread = threading.Thread(target=traffic, name="rotation-traffic")
    thread.start()
    try:
        steps = [
            (["install", "--key-file", str(tmp / "new.key")], {"primary": old_fp, "accepted": [old_fp, new_fp]}),
            (["use", new_fp], {"primary": new_fp, "accepted": [new_fp, old_fp]}),
            (["remove", old_fp], {"primary": new_fp, "accepted": [new_fp]}),
        ]
        for args, want in steps:
            for name, peer in zip(CAPS_MB, sorted(peers, key=lambda p: p.name), strict=True):
                served = len(texts)
                assert swarm_cli(["keys", args[0], "--keyring", str(tmp / f"{name}.key"), *args[1:]]) == 0
                peer.signal(signal.SIGHUP)  # reload now rather than at the next gossip round
                wait_for(lambda p=peer, w=want: has_keys(p, w), 30, f"{peer.name} to reload its keys")
                # Requests go on between each peer's change (and so across mixed keyrings).
                wait_for(lambda n=served: len(texts) >= n + 1 or failures, 120, "a request after the change")
    finally:
        stop.set()
        thread.join(timeout=300)
    capsys.readouterr()
    assert not failures, failures
    assert len(texts) >= 9 and all(t == reference for t in texts)
    drops_after = sum(status_of(p)["dropped_messages"]["unknown_key"] for p in peers)
    assert drops_after == drops_before, "a message was sealed under a key its receiver did not hold"
    assert all(load_keyring(tmp / f"{n}.key").keys == [new] for n in CAPS_MB)
    # The old key opens nothing any more: a message sealed under it is refused.
    stale = Sealer(Identity.generate(), Keyring.of(old)).seal("hello", {}, term=0, incarnation=1)
    req = urllib.request.Request(peers[0].url + "/swarm/msg", data=stale)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["type"] == "unknown_key"
