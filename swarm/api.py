"""The peer's HTTP server: an aiohttp application factory with thin handlers. It serves the
peer-to-peer message endpoint (sealed msgpack envelopes in and out), `GET /swarm/status` and
`GET /healthz`; the data plane and the OpenAI-compatible routes join it later. Handlers only
translate between HTTP and the node: errors become JSON bodies with the right status code."""

from __future__ import annotations

import logging

from aiohttp import web

from swarm.errors import MessageRejected
from swarm.node import MSG_PATH, MSGPACK, Node

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)

# HTTP status for each reason a peer message is dropped.
REJECT_STATUS = {
    "malformed": 400,
    "forged": 401,
    "oversized": 413,
    "not_ready": 503,
}


def error_response(status: int, kind: str, message: str) -> web.Response:
    """A JSON error body: {"error": {"type", "message"}}."""
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


async def post_message(request: web.Request) -> web.Response:
    """One sealed peer message in, one sealed reply out."""
    node = request.app[NODE]
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        node.drops["oversized"] += 1
        return error_response(413, "oversized", f"body exceeds {node.config.security.max_message_bytes} bytes")
    try:
        reply = node.handle(data)
    except MessageRejected as e:
        log.debug("dropped message from %s: %s", request.remote, e)
        return error_response(REJECT_STATUS.get(e.reason, 409), e.reason, str(e))
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


def make_app(node: Node) -> web.Application:
    """The peer's aiohttp application, bounded to the configured message size."""
    app = web.Application(client_max_size=node.config.security.max_message_bytes)
    app[NODE] = node
    app.router.add_post(MSG_PATH, post_message)
    app.router.add_get("/swarm/status", get_status)
    app.router.add_get("/healthz", get_healthz)
    return app
