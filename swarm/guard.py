"""Gatekeeping for the peer's HTTP server: the optional API keys of the public endpoints
(`security.api_key_file`), the limit on each client's concurrent generations and on open
connections (`serving`), and logging of refused traffic that a flood cannot turn into a flood of
log lines. Nothing here knows what a generation is."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.errors import SwarmKeyError

log = logging.getLogger(__name__)

MAX_API_KEYS = 256  # keys one API key file may hold
MIN_API_KEY_CHARS = 16
FLOOD_SUMMARY_S = 60.0  # refused traffic is summed up in one log line at most this often


def parse_api_keys(text: str, where: str) -> list[bytes]:
    """API keys written one per line (blank lines and `#` comments ignored); each at least 16
    characters of printable ASCII without spaces, as clients send them in a Bearer header."""
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) < MIN_API_KEY_CHARS or not line.isascii() or not line.isprintable() or " " in line:
            raise SwarmKeyError(
                f"{where}, line {number}: an API key is at least {MIN_API_KEY_CHARS} printable ASCII characters "
                "without spaces"
            )
        keys.append(line.encode())
    if not keys:
        raise SwarmKeyError(f"{where} holds no API key")
    if len(keys) > MAX_API_KEYS:
        raise SwarmKeyError(f"{where} holds {len(keys)} API keys; at most {MAX_API_KEYS}")
    return keys


MAX_KEY_FILE_BYTES = 1 << 20  # key files are small; a larger one is read as far as this


def file_stamp(path: Path | None) -> bytes | None:
    """The SHA-256 of a small file's content (None if it cannot be read): changes with any edit,
    however quick, where size and modification time may not."""
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            return hashlib.sha256(f.read(MAX_KEY_FILE_BYTES)).digest()
    except OSError:
        return None


class ApiKeys:
    """The keys that open the public API, read from a file and re-read when it changes (so keys
    are added and revoked without a restart); with no file, the API is open."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._digests: dict[bytes, str] = {}  # SHA-256 of a key -> the client name it stands for
        self._stamp: bytes | None = None
        if path is not None:
            self._load(path)

    @property
    def required(self) -> bool:
        return self.path is not None

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SwarmKeyError(f"cannot read API key file {path}: {e}") from e
        keys = parse_api_keys(text, f"API key file {path}")
        self._stamp = file_stamp(path)
        self._digests = {hashlib.sha256(k).digest(): f"key-{hashlib.sha256(k).hexdigest()[:8]}" for k in keys}

    def reload(self) -> bool:
        """Re-read the file if it changed. A file that is gone, empty or broken opens the API to
        nobody until it is mended (so emptying it revokes every key), with one warning per change."""
        stamp = file_stamp(self.path)
        if self.path is None or stamp == self._stamp:
            return False
        try:
            self._load(self.path)
        except SwarmKeyError as e:
            self._stamp, self._digests = stamp, {}
            log.warning("no API key is valid until the file is mended: %s", e)
            return True
        log.info("API keys reloaded from %s: %d key(s)", self.path, len(self._digests))
        return True

    def client_of(self, authorization: str | None) -> str | None:
        """The client a request's Authorization header names, or None if it holds no valid key.
        Keys are looked up by their SHA-256, so the time taken says nothing about a key's bytes."""
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        return self._digests.get(hashlib.sha256(authorization[7:].strip().encode(errors="replace")).digest())


class FloodLog:
    """Logs the first refusal of each kind as a warning and then only counts: one summary line per
    `FLOOD_SUMMARY_S` says how many more there were. Its tables are bounded by the number of kinds,
    which the code fixes, not the traffic."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._last_summary = clock()

    def refused(self, kind: str, detail: str) -> None:
        self.total[kind] += 1
        if self.total[kind] == 1:
            self.logger.warning("refused %s: %s (further refusals of this kind are counted, not logged)", kind, detail)
            return
        self._pending[kind] += 1
        self.flush()

    def flush(self) -> None:
        """The summary line, if one is due and there is anything to sum up (also called on a timer,
        so that a flood that stopped is summed up too)."""
        now = self.clock()
        if self._pending and now - self._last_summary >= FLOOD_SUMMARY_S:
            counts = ", ".join(f"{k} {n}" for k, n in sorted(self._pending.items()))
            self.logger.warning("refused %d more in the last %.0f s: %s", sum(self._pending.values()),
                                now - self._last_summary, counts)  # fmt: skip
            self._pending.clear()
            self._last_summary = now


class ClientSlots:
    """Concurrent generations per client (its API key, or its address without keys). The table
    holds only clients with a generation under way, so it is bounded by the server's own limits."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._held: Counter[str] = Counter()

    def busy(self, client: str) -> int:
        return self._held[client]

    @contextmanager
    def hold(self, client: str, count: int = 1) -> Iterator[None]:
        """`count` slots for the duration of the block (check `busy` against `per_client` first)."""
        self._held[client] += count
        try:
            yield
        finally:
            self._held[client] -= count
            if self._held[client] <= 0:
                del self._held[client]


API_KEYS = web.AppKey("api_keys", ApiKeys)


def client_of(request: web.Request, keys: ApiKeys | None) -> str:
    """Who a request comes from, for per-client limits: its API key's name, else its address."""
    client = keys.client_of(request.headers.get("Authorization")) if keys is not None and keys.required else None
    return client or f"addr-{request.remote}"


class _Refuse(asyncio.Protocol):
    """A connection over the limit: a 503 and a close, before any request is read."""

    BODY = b'{"error": {"type": "overloaded", "message": "too many open connections; try again shortly"}}'

    def connection_made(self, transport: Any) -> None:
        head = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(self.BODY)).encode() + b"\r\n\r\n"
        )
        transport.write(head + self.BODY)
        transport.close()


class LimitedSite(web.TCPSite):
    """A TCP site that holds at most `max_connections` connections open; one more is answered 503
    and closed at once, counted in `refused`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int,
                 on_refused: Callable[[], None] | None = None) -> None:  # fmt: skip
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self.refused = 0
        self._on_refused = on_refused

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                if self._on_refused is not None:
                    self._on_refused()
                return _Refuse()
            return server()

        self._server = await loop.create_server(connection, self._host, self._port, reuse_address=self._reuse_address)
