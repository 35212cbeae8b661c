"""A client holding the swarm key, as an entry peer does, that steps sessions of its own through a
pipeline by hand: tests know those sessions' ids, and check them after an attack or a flood."""

from __future__ import annotations

import urllib.request
from typing import Any

import torch

from swarm.auth import Keyring, Opener, Sealer
from swarm.identity import Identity
from swarm.layer_map import LayerMap
from swarm.membership import MemberInfo
from swarm.stage_service import STAGE_PATH
from swarm.tensors import pack


class Prober:
    """Seals steps and closes to the first stage of `layer_map` (a /swarm/status layer map) and
    opens the replies."""

    def __init__(self, layer_map: dict[str, Any], fingerprint: str, keyring: Keyring) -> None:
        self.me = Identity.generate()
        self.sealer = Sealer(self.me, keyring)
        self.opener = Opener(keyring, max_clock_skew_s=30, replay_window=64, max_message_bytes=1 << 24,
                             peer_id=self.me.peer_id)  # fmt: skip
        self.map = layer_map
        self.info = MemberInfo(self.me.peer_id, "prober", "http://127.0.0.1:9", 1, 1, -1, 0, "cpu", fingerprint,
                               0, 0, 0, False).to_dict()  # fmt: skip

    def seal(self, kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
        """The first stage's URL and the sealed message."""
        first = self.map["stages"][0]
        body = {"info": self.info, "leader": None, "leader_priority": None, "epoch": self.map["epoch"],
                "map": LayerMap.from_dict(self.map).id, "route": self.map["stages"], **body}  # fmt: skip
        return first["url"] + STAGE_PATH, self.sealer.seal(kind, body, term=0, incarnation=1, to=first["peer_id"])

    def send(self, url: str, data: bytes) -> dict[str, Any]:
        """POST a sealed message; the opened reply's body (an HTTPError for a refusal)."""
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as resp:
            body: dict[str, Any] = self.opener.open(resp.read()).body
            return body

    def step(self, session: str, ids: list[int], start: int, opening: bool = False) -> int:
        """One greedy step of `session` through the whole pipeline; the token sampled."""
        body: dict[str, Any] = {"session": session, "start": start, "input": pack(torch.tensor([ids]))}
        if opening:
            body["open"] = {"max_length": 32, "sampling": {"temperature": 0.0}}
        return int(self.send(*self.seal("step", body))["token"])

    def close(self, session: str) -> bool:
        return bool(self.send(*self.seal("close", {"session": session}))["closed"])
