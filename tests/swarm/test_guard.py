"""The gatekeeping pieces on their own: API key files (parsed, compared, reloaded in place), the
per-client generation slots, the flood log (one line per kind, then a summary at most once a
minute), and the connection limit of the HTTP site (one more connection gets a 503 and a close)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from swarm.errors import SwarmKeyError
from swarm.guard import FLOOD_SUMMARY_S, MAX_API_KEYS, ApiKeys, ClientSlots, FloodLog, LimitedSite

pytestmark = pytest.mark.timeout(60)

ALICE_KEY = "sk-alice-0123456789abcdef"
BOB_KEY = "sk-bob-0123456789abcdef01"


def key_file(tmp_path: Path, *keys: str, name: str = "api.keys") -> Path:
    path = tmp_path / name
    path.write_text("# clients\n" + "\n".join(keys) + "\n")
    return path


def test_a_valid_bearer_key_names_its_client_and_anything_else_is_refused(tmp_path: Path) -> None:
    keys = ApiKeys(key_file(tmp_path, ALICE_KEY, BOB_KEY + "  # bob's laptop"))
    alice, bob = keys.client_of(f"Bearer {ALICE_KEY}"), keys.client_of(f"Bearer {BOB_KEY}")
    assert alice and bob and alice != bob
    assert ALICE_KEY not in alice  # the name is a hash, the key never shows in logs or tables
    for header in (None, "", ALICE_KEY, f"Basic {ALICE_KEY}", f"Bearer {ALICE_KEY}x", "Bearer ", "Bearer \u00e9\u00e9"):
        assert keys.client_of(header) is None, header


def test_without_a_file_no_key_is_required(tmp_path: Path) -> None:
    keys = ApiKeys(None)
    assert not keys.required and keys.client_of(f"Bearer {ALICE_KEY}") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no API key"),
        ("# only a comment\n", "holds no API key"),
        ("short\n", "line 1: an API key is at least 16"),
        (f"{ALICE_KEY}\nwith a space inside it\n", "line 2"),
        ("\n".join(f"key-{i:020d}" for i in range(MAX_API_KEYS + 1)), f"at most {MAX_API_KEYS}"),
    ],
    ids=["empty", "comments", "short", "space", "too-many"],
)
def test_a_bad_api_key_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "api.keys"
    path.write_text(text)
    with pytest.raises(SwarmKeyError, match=message):
        ApiKeys(path)


def test_a_missing_api_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SwarmKeyError, match="cannot read API key file"):
        ApiKeys(tmp_path / "absent")


def test_keys_are_added_and_revoked_by_rewriting_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = key_file(tmp_path, ALICE_KEY)
    keys = ApiKeys(path)
    assert not keys.reload()  # unchanged
    key_file(tmp_path, BOB_KEY[:-1] + "2")  # same length, written at once: the content tells
    assert keys.reload()
    assert keys.client_of(f"Bearer {ALICE_KEY}") is None and keys.client_of(f"Bearer {BOB_KEY[:-1]}2")
    # A broken, emptied or removed file opens the API to nobody (so emptying it revokes every key),
    # with one warning per change of the file.
    with caplog.at_level(logging.WARNING, logger="swarm.guard"):
        path.write_text("broken\n")
        assert keys.reload() and not keys.reload()
        assert keys.client_of(f"Bearer {BOB_KEY[:-1]}2") is None
        path.write_text("")
        assert keys.reload() and keys.client_of(f"Bearer {BOB_KEY[:-1]}2") is None
        path.unlink()
        assert keys.reload() and not keys.reload()
    assert sum("no API key is valid" in r.getMessage() for r in caplog.records) == 3
    key_file(tmp_path, ALICE_KEY)
    assert keys.reload() and keys.client_of(f"Bearer {ALICE_KEY}")


def test_client_slots_count_per_client_and_forget_idle_clients() -> None:
    slots = ClientSlots(2)
    with slots.hold("a"), slots.hold("a"), slots.hold("b"):
        assert (slots.busy("a"), slots.busy("b")) == (2, 1)
    assert (slots.busy("a"), slots.busy("b")) == (0, 0)
    assert not slots._held  # nothing kept for clients with nothing under way
    with pytest.raises(RuntimeError), slots.hold("a"):
        raise RuntimeError("a generation that fails still gives its slot back")
    assert slots.busy("a") == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_logs_one_line_per_kind_then_one_summary_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock, logger = Clock(), logging.getLogger("test.flood")
    flood = FloodLog(logger, clock)
    with caplog.at_level(logging.WARNING, logger="test.flood"):
        for i in range(10_000):
            flood.refused("forged", f"message {i}")
            flood.refused("malformed", f"body {i}")
        assert len(caplog.records) == 2  # the first of each kind
        clock.now = FLOOD_SUMMARY_S
        flood.refused("forged", "one more")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "message 0" in lines[0] and "counted, not logged" in lines[0]
    assert "19999 more" in lines[2] and "forged 10000" in lines[2] and "malformed 9999" in lines[2]
    assert flood.total == {"forged": 10_001, "malformed": 10_000}


async def test_connections_beyond_the_limit_get_a_503_and_the_others_keep_working() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    refused: list[int] = []
    site = LimitedSite(runner, "127.0.0.1", 0, 2, lambda: refused.append(1))
    await site.start()
    port = runner.addresses[0][1]
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:  # two keep-alive connections, each with a request answered
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in held:
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await reader.read()  # the third is answered and closed without sending anything
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
        writer.close()
        assert site.refused == 1 and refused == [1]
        for _, writer in held:
            writer.close()
            await writer.wait_closed()
        while runner.server is not None and runner.server.connections:
            await asyncio.sleep(0.01)  # the server notices the closes on its own loop turn
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
            assert resp.status == 200 and await resp.text() == "hi"  # room again once they closed
    finally:
        await runner.cleanup()
