"""The peer's HTTP server: an aiohttp application factory with thin handlers. It serves the
control-plane message endpoint (sealed msgpack envelopes in and out), the data plane's links
(`swarm.link`, WebSockets the transport accepts), `GET /swarm/status`, `GET /healthz`, and mounts
the OpenAI-compatible API. The application owns the node's lifetime: its cleanup context closes
the node (links, tasks, client session) when the server stops. With API keys
configured, everything but liveness and the sealed peer endpoints needs a Bearer key. Handlers
only translate between HTTP and the node: errors become JSON bodies with the right status code,
and refusals are counted and logged once per kind (`Node.flood`), never line by line."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.errors import MessageRejected
from swarm.guard import API_KEYS, ApiKeys
from swarm.link import LINK_PATH
from swarm.node import MSG_PATH, Node
from swarm.openai_api import add_routes
from swarm.transport import MSGPACK, status_of

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
API_KEY_RECHECK_S = 1.0  # the API key file is checked for changes at most this often
# Paths anyone may reach without an API key: liveness, and the sealed peer endpoints (every message
# there is authenticated with the swarm key instead).
OPEN_PATHS = ("/healthz", MSG_PATH, LINK_PATH)


def error_response(status: int, kind: str, message: str) -> web.Response:
    """A JSON error body: {"error": {"type", "message"}}."""
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


async def read_sealed(request: web.Request, limit: int) -> bytes | web.Response:
    """The body of a sealed message: a 413 (counted) once it is over `limit` bytes, and a 503 while
    the bodies being read, not yet authenticated, hold more than `Node.inbound_limit` bytes."""
    node = request.app[NODE]
    chunks: list[bytes] = []
    size = 0
    try:
        if request.content_length is None or request.content_length <= limit:
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                node.inbound_bytes += len(chunk)
                if size > limit:
                    break
                if node.inbound_bytes > node.inbound_limit:
                    node.flood.refused("busy", f"unauthenticated bodies in flight exceed {node.inbound_limit} bytes")
                    return error_response(503, "not_ready", "this peer is reading too much at once; try again")
                chunks.append(chunk)
            else:
                return b"".join(chunks)
    finally:
        node.inbound_bytes -= size
    node.drops["oversized"] += 1
    node.flood.refused("oversized", f"a {request.content_length or 'streamed'}-byte body from {request.remote}")
    return error_response(413, "oversized", f"body exceeds {limit} bytes")


async def get_link(request: web.Request) -> web.StreamResponse:
    """A peer link: the transport runs its handshake and reads its frames until it closes."""
    return await request.app[NODE].transport.accept(request)


async def post_message(request: web.Request) -> web.Response:
    """One sealed peer message in, one sealed reply out."""
    node = request.app[NODE]
    data = await read_sealed(request, node.config.security.max_message_bytes)
    if isinstance(data, web.Response):
        return data
    try:
        reply = node.handle(data, request.remote)
    except MessageRejected as e:
        node.flood.refused(e.reason, f"a peer message from {request.remote}: {e}")
        return error_response(status_of(e.reason), e.reason, str(e))
    return web.Response(body=reply, content_type=MSGPACK)


async def get_status(request: web.Request) -> web.Response:
    """Peers, leader, term, layer map and readiness, as JSON."""
    node = request.app[NODE]
    if node.membership is None:
        return error_response(503, "starting", "this peer is starting; ask again in a moment")
    return web.json_response(node.status())


async def get_healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves HTTP; says whether the swarm is ready."""
    node = request.app[NODE]
    return web.json_response({"status": "ok", "peer_id": node.peer_id, "ready": node.ready()})


def require_api_key(keys: ApiKeys, node: Node) -> Callable[..., Any]:
    """Middleware: without a valid `Authorization: Bearer <key>`, a 401 for every path but OPEN_PATHS."""
    last_check = time.monotonic()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        nonlocal last_check
        if request.path in OPEN_PATHS:
            return await handler(request)
        now = time.monotonic()
        if now - last_check >= API_KEY_RECHECK_S:
            last_check = now
            keys.reload()
        if keys.client_of(request.headers.get("Authorization")) is None:
            node.flood.refused("unauthorized", f"{request.method} {request.path[:100]} from {request.remote}")
            body = {"error": {"message": "this swarm needs an API key: send Authorization: Bearer <key>",
                              "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}  # fmt: skip
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


async def close_links(app: web.Application) -> None:
    """On shutdown, before the server waits for its handlers: the generations this peer runs end
    now (with an error), and its links close (a link's handler would otherwise wait forever)."""
    node = app[NODE]
    node.stopping = True
    await node.transport.close_links()


async def node_lifetime(app: web.Application) -> AsyncIterator[None]:
    """The node lives as long as the application: closed (safe twice) when the server stops."""
    yield
    await app[NODE].close()


def make_app(node: Node) -> web.Application:
    """The peer's aiohttp application: peer messages, the data plane, status and the OpenAI API.
    Raises SwarmKeyError when the configured API key file cannot be read."""
    limit = max(node.config.security.max_message_bytes, node.data_limit)
    key_file = node.config.security.api_key_file
    keys = ApiKeys(Path(key_file).expanduser() if key_file else None)
    app = web.Application(client_max_size=limit)  # each route checks its own, smaller limit
    if keys.required:
        app.middlewares.append(require_api_key(keys, node))
    app[API_KEYS] = keys
    app[NODE] = node
    app.router.add_post(MSG_PATH, post_message)
    app.router.add_get(LINK_PATH, get_link)
    app.on_shutdown.append(close_links)
    app.cleanup_ctx.append(node_lifetime)
    add_routes(app, node)
    app.router.add_get("/swarm/status", get_status)
    app.router.add_get("/healthz", get_healthz)
    return app
