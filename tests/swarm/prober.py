"""A client holding the swarm key, as an entry peer does, that steps sessions of its own through a
pipeline by hand over the same links the peers use: tests know those sessions' ids, and check them
after an attack or a flood. Each call opens links to every stage of the layer map (so that the last
stage can send the token home, and any stage its refusal), does its work and closes them."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import torch

from peer.sampling import SamplingParams
from swarm.auth import Keyring, Message, Opener, Sealer
from swarm.errors import MessageRejected
from swarm.frames import Opening, Row, close_frame, pass_frame
from swarm.guard import FloodLog
from swarm.identity import Identity
from swarm.layer_map import LayerMap
from swarm.link import LINK_HEADER, LINK_PATH, new_ephemeral
from swarm.membership import MemberInfo
from swarm.tensors import pack
from swarm.transport import Transport

T = TypeVar("T")
ANSWER_S = 60.0  # a generous cap on waiting for a stage's answer


class Answer:
    """What came back for a row: a token, or a refusal's reason."""

    def __init__(self, sender: str, kind: str, value: Any) -> None:
        self.sender, self.kind, self.value = sender, kind, value

    def __repr__(self) -> str:
        return f"Answer({self.kind}={self.value!r} from {self.sender[:8]})"


class Prober:
    """Steps and closes sessions of its own on the pipeline of `layer_map` (a /swarm/status map)."""

    def __init__(self, layer_map: dict[str, Any], fingerprint: str, keyring: Keyring) -> None:
        self.me = Identity.generate()
        self.keyring = keyring
        self.sealer = Sealer(self.me, keyring)
        self.opener = Opener(keyring, max_clock_skew_s=30, replay_window=64, max_message_bytes=1 << 24,
                             peer_id=self.me.peer_id)  # fmt: skip
        self.map = LayerMap.from_dict(layer_map)
        self.info = MemberInfo(self.me.peer_id, "prober", "http://127.0.0.1:9", 1, 1, -1, 0, "cpu", fingerprint,
                               0, 0, 0, False).to_dict()  # fmt: skip
        self.steps = 0

    def seal(self, kind: str, body: dict[str, Any], to: str | None) -> bytes:
        """A sealed envelope from the prober, carrying its member info as a peer's would."""
        common = {"info": self.info, "leader": None, "leader_priority": None}
        return self.sealer.seal(kind, {**common, **body}, term=0, incarnation=1, to=to)

    def _check(self, data: bytes) -> Message:
        return self.opener.open(data)

    def run(self, work: Callable[[Transport, asyncio.Queue[Answer]], Awaitable[T]]) -> T:
        """Open links to every stage, run `work` with the transport and the queue of answers, close."""

        async def main() -> T:
            transport = Transport(
                self.me.peer_id, seal=self.seal, check=self._check, drops=Counter(),
                flood=FloodLog(logging.getLogger("prober")), request_timeout_s=10.0, heartbeat_s=60.0,
                max_frame_bytes=1 << 26,
            )  # fmt: skip
            answers: asyncio.Queue[Answer] = asyncio.Queue()
            transport.handlers["tokens"] = lambda s, b, *_: answers.put_nowait(Answer(s, "token", b["rows"][0][2]))
            transport.handlers["refused"] = lambda s, b, *_: answers.put_nowait(Answer(s, "refused", b["reason"]))
            try:
                for stage in self.map.stages:
                    await transport.connect(stage.peer_id, stage.url)
                return await work(transport, answers)
            finally:
                await transport.close()

        return asyncio.run(main())

    def row(self, session: str, ids_or_width: int, start: int, opening: bool = False) -> Row:
        self.steps += 1
        sampling = SamplingParams(temperature=0.0)
        return Row(
            session, self.me.peer_id, self.steps, start, ids_or_width, Opening(32, sampling) if opening else None
        )

    def step(self, session: str, ids: list[int], start: int, opening: bool = False) -> int:
        """One greedy step of `session` through the whole pipeline; the token sampled (MessageRejected
        with the reason if a stage refused it)."""
        frame = pass_frame(self.map.id, self.map.epoch, [self.row(session, len(ids), start, opening)],
                           pack(torch.tensor([ids])))  # fmt: skip
        answer = self.send(0, frame)
        if answer.kind != "token":
            raise MessageRejected(answer.value, f"stage {answer.sender} refused the step")
        return int(answer.value)

    def send(self, stage: int, frame: dict[str, Any]) -> Answer:
        """Send one frame to a stage of the map; the first answer that comes back."""
        target = self.map.stages[stage]

        async def work(transport: Transport, answers: asyncio.Queue[Answer]) -> Answer:
            await transport.send(target.peer_id, target.url, frame)
            return await asyncio.wait_for(answers.get(), ANSWER_S)

        return self.run(work)

    def exchange(self, start: Callable[[], Any]) -> Answer:
        """With links open to every stage, call `start` (which sets another sender going, and returns
        its concurrent future); the first answer that comes back to the prober."""

        async def work(transport: Transport, answers: asyncio.Queue[Answer]) -> Answer:
            await asyncio.wrap_future(start())
            return await asyncio.wait_for(answers.get(), ANSWER_S)

        return self.run(work)

    def send_only(self, stage: int, frames: list[dict[str, Any]]) -> None:
        """Send frames to a stage and wait for nothing (what it drops, it only counts)."""
        target = self.map.stages[stage]

        async def work(transport: Transport, answers: asyncio.Queue[Answer]) -> None:
            for frame in frames:
                await transport.send(target.peer_id, target.url, frame)

        self.run(work)

    def handshake_once(self, stage: int) -> bytes:
        """A genuine link handshake to a stage, delivered once (the link opened); its bytes, to replay."""
        target = self.map.stages[stage]
        data = self.seal("link", {"eph": new_ephemeral()[1]}, target.peer_id)

        async def deliver() -> None:
            headers = {LINK_HEADER: base64.b64encode(data).decode()}
            async with aiohttp.ClientSession() as session, session.ws_connect(target.url + LINK_PATH, headers=headers):
                pass

        asyncio.run(deliver())
        return data

    def close(self, session: str) -> None:
        """Close a session along the pipeline (nothing comes back)."""
        first = self.map.stages[0]

        async def work(transport: Transport, answers: asyncio.Queue[Answer]) -> None:
            await transport.send(first.peer_id, first.url, close_frame(self.map.id, self.map.epoch, [session]))

        self.run(work)
