"""A rogue process on 127.0.0.1 that does not hold the swarm key, run by the hardening tests as a
process of its own: `python -m tests.swarm.rogue` reads a JSON plan on stdin (the peers' URLs and
ids, the layer map's epoch, and a captured link handshake to replay) and tries everything an
outsider on the network can: join, win an election by claiming the highest priority, push a layer
map naming itself, gossip itself in, open a data-plane link to every stage (to open sessions,
inject activations or close them), and replay captured traffic. Each attempt is made three ways:
sealed under a key of its own, under no key (the insecure keyring), and as plain msgpack. It
prints one JSON object: each attempt's HTTP status and error type."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import msgpack

from swarm.auth import Keyring, Sealer
from swarm.identity import Identity
from swarm.link import LINK_HEADER, LINK_PATH, REFUSAL_HEADER, new_ephemeral
from swarm.membership import MemberInfo
from swarm.node import MSG_PATH

TOP_PRIORITY = 2**62


def post(url: str, data: bytes) -> tuple[int, str]:
    """POST raw bytes; the status and the error type (or "ok")."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/msgpack"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, "ok"
    except urllib.error.HTTPError as e:
        try:
            return e.code, str(json.loads(e.read())["error"]["type"])
        except (ValueError, KeyError, TypeError):
            return e.code, "unparsed"


def link(url: str, data: bytes) -> tuple[int, str]:
    """Ask for a link with `data` as its handshake; the HTTP status and error type (101 and "ok"
    when the link is opened)."""

    async def attempt() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url + LINK_PATH, headers={LINK_HEADER: base64.b64encode(data).decode()}):
                    return 101, "ok"
            except aiohttp.WSServerHandshakeError as e:
                return e.status, (e.headers or {}).get(REFUSAL_HEADER, "unparsed")

    return asyncio.run(attempt())


def main() -> int:
    plan: dict[str, Any] = json.load(sys.stdin)
    me = Identity.generate()
    info = MemberInfo(me.peer_id, "rogue", "http://127.0.0.1:9", 1, 1, TOP_PRIORITY, 1 << 40, "cpu",
                      plan["fingerprint"], plan["epoch"], 0, plan["num_layers"], True).to_dict()  # fmt: skip
    common = {"info": info, "leader": me.peer_id, "leader_priority": TOP_PRIORITY}
    ways = {
        "own_key": Sealer(me, Keyring.of(os.urandom(32))),
        "no_key": Sealer(me, Keyring()),
    }
    stages = plan["stages"]  # [{peer_id, url, start, end}] in pipeline order
    mine = [{"peer_id": me.peer_id, "url": "http://127.0.0.1:9", "start": 0, "end": plan["num_layers"]}]
    evil_map = {"term": plan["term"] + 100, "epoch": plan["epoch"] + 100, "model": plan["fingerprint"],
                "num_layers": plan["num_layers"], "stages": mine, "leader": me.peer_id}  # fmt: skip
    attempts: list[tuple[str, str, str, dict[str, Any], str]] = []  # name, url, kind, body, recipient
    for s in stages:
        base = s["url"]
        attempts += [
            ("join", base + MSG_PATH, "hello", {}, s["peer_id"]),
            ("election", base + MSG_PATH, "election", {}, s["peer_id"]),
            ("coordinator", base + MSG_PATH, "coordinator", {}, s["peer_id"]),
            ("layer_map", base + MSG_PATH, "layer_map", {"map": evil_map}, s["peer_id"]),
            ("gossip", base + MSG_PATH, "gossip", {"digest": [{"info": info, "dead": False}]}, s["peer_id"]),
            # A data-plane link: every session frame (open, activations, close) needs one first.
            ("link", base, "link", {"eph": new_ephemeral()[1]}, s["peer_id"]),
        ]
    results: dict[str, list[Any]] = {}
    for i, captured in enumerate(plan["captured"]):  # first, well within the clock skew allowed
        results[f"replay/{i}"] = [link(captured["url"], bytes.fromhex(captured["data"]))]
    for name, url, kind, body, to in attempts:
        send = link if kind == "link" else post
        for way, sealer in ways.items():
            data = sealer.seal(kind, {**common, **body}, term=plan["term"] + 100, incarnation=1, to=to)
            results.setdefault(f"{name}/{way}", []).append(send(url, data))
        plain = msgpack.packb({"kind": kind, "sender": me.peer_id, "to": to, "body": {**common, **body}})
        results.setdefault(f"{name}/plain", []).append(send(url, plain))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
