"""The peer's HTTP server: an aiohttp application factory with thin handlers. It serves the
control-plane message endpoint and the data-plane stage endpoint (sealed msgpack envelopes in and
out), `GET /swarm/status`, `GET /healthz`, and mounts the OpenAI-compatible API. Handlers only
translate between HTTP and the node: errors become JSON bodies with the right status code."""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web

from swarm.errors import MessageRejected, Relayed
from swarm.node import MSG_PATH, MSGPACK, Node
from swarm.openai_api import add_routes
from swarm.stage_service import STAGE_PATH
from swarm.stage_service import STATUS as STAGE_STATUS

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


async def read_sealed(request: web.Request, limit: int) -> bytes | web.Response:
    """The body of a sealed message, or a 413 (counted) when it is over `limit` bytes."""
    node = request.app[NODE]
    if request.content_length is None or request.content_length <= limit:
        with contextlib.suppress(web.HTTPRequestEntityTooLarge):
            data = await request.read()
            if len(data) <= limit:
                return data
    node.drops["oversized"] += 1
    return error_response(413, "oversized", f"body exceeds {limit} bytes")


async def post_stage(request: web.Request) -> web.Response:
    """One sealed data-plane message (a step or a close) in, its sealed result out."""
    node = request.app[NODE]
    data = await read_sealed(request, node.data_limit)
    if isinstance(data, web.Response):
        return data
    try:
        checked = node.check_data(data)  # counts what it drops
    except MessageRejected as e:
        return error_response(STAGE_STATUS.get(e.reason, 409), e.reason, str(e))
    try:
        if checked.msg.kind == "step":
            body = await node.service.step(checked)
        else:
            body = await node.service.close(checked)
    except Relayed as e:
        return error_response(e.status, e.reason, str(e))
    except MessageRejected as e:
        node.drops[e.reason] += 1
        log.debug("refused %s from %s: %s", checked.msg.kind, checked.msg.sender, e)
        return error_response(STAGE_STATUS.get(e.reason, 409), e.reason, str(e))
    return web.Response(body=node.seal_reply(f"{checked.msg.kind}_result", body, checked.msg.sender),
                        content_type=MSGPACK)  # fmt: skip


async def post_message(request: web.Request) -> web.Response:
    """One sealed peer message in, one sealed reply out."""
    node = request.app[NODE]
    data = await read_sealed(request, node.config.security.max_message_bytes)
    if isinstance(data, web.Response):
        return data
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
    """The peer's aiohttp application: peer messages, the data plane, status and the OpenAI API."""
    limit = max(node.config.security.max_message_bytes, node.data_limit)
    app = web.Application(client_max_size=limit)  # each route checks its own, smaller limit
    app[NODE] = node
    app.router.add_post(MSG_PATH, post_message)
    app.router.add_post(STAGE_PATH, post_stage)
    add_routes(app, node)
    app.router.add_get("/swarm/status", get_status)
    app.router.add_get("/healthz", get_healthz)
    return app
