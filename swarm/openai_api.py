"""The public, OpenAI-compatible API every peer serves: `POST /v1/completions`,
`POST /v1/chat/completions` (whole, or `stream: true` as server-sent events ending with
`data: [DONE]`), `GET /v1/models`, and `GET /metrics` in Prometheus text. Handlers validate the
request body into an entry `Request`, run it, and shape the answer; every error is OpenAI's
`{"error": {message, type, param, code}}` with a 4xx or 5xx status. Responses add a `timings`
object (time to first token, tokens per second, compute per stage, wire per hop, bytes sent,
time at the entry)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import ClientConnectionResetError, web
from jinja2 import TemplateError

from peer.errors import InvalidInput, SwarmError
from peer.sampling import SamplingParams
from swarm.entry import MAX_STOP_STRINGS, Entry, Event, Request, Timings
from swarm.errors import MessageRejected, NotReady
from swarm.guard import API_KEYS, ClientSlots, client_of
from swarm.metrics import Metrics
from swarm.node import Node

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
ENTRY = web.AppKey("entry", Entry)
METRICS = web.AppKey("metrics", Metrics)
SLOTS = web.AppKey("slots", ClientSlots)


class ApiError(SwarmError):
    """An error in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "5"} if self.status == 503 else None
        return web.json_response(body, status=self.status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every error of the /v1 routes in OpenAI's shape, whatever raised it."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if not request.path.startswith("/v1/"):
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return ApiError(e.status, e.reason or "request refused", kind).response()
    except Exception:
        if not request.path.startswith("/v1/"):
            raise
        log.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal error; the peer's log has the details", "server_error").response()


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, bounded in size."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):  # the whole body, however it arrives
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be a number between {lo} and {hi}", param=name)
    return float(value)


def parse_common(body: dict[str, Any], node: Node) -> tuple[int, SamplingParams, tuple[str, ...], bool]:
    """max_tokens, sampling, stop strings and stream, from a completions or chat body."""
    model = body.get("model")
    if model is not None and model != node.model.spec:
        raise ApiError(404, f"the model {model!r} does not exist; this swarm serves {node.model.spec!r}",
                       param="model", code="model_not_found")  # fmt: skip
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = node.config.serving.default_max_tokens
    limit = node.config.serving.max_tokens_limit
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this swarm's limit of {limit}", param="max_tokens")
    n = body.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)  # a fresh draw per request, as OpenAI's API does
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < (1 << 63):
        raise ApiError(400, "seed must be a 64-bit integer", param="seed")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            seed=seed,
        )
    except InvalidInput as e:
        raise ApiError(400, str(e)) from e
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str) and stop:
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    return max_tokens, sampling, stops, stream


def completion_prompt(body: dict[str, Any], node: Node) -> list[int]:
    """Token ids of a completions prompt: a string, a list holding one string, or token ids (a list of
    integers, or a list holding one such list), as OpenAI's API takes them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if len(prompt) > node.config.serving.max_prompt_tokens:
            raise _too_long(len(prompt), node, "prompt")
        vocab = node.model.profile.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")
    assert node.tokenizer is not None
    try:
        return node.tokenizer.encode(prompt)
    except (TypeError, ValueError, InvalidInput) as e:
        raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from e


def _too_long(tokens: int, node: Node, param: str) -> ApiError:
    limit = node.config.serving.max_prompt_tokens
    return ApiError(400, f"the prompt has {tokens} tokens; this swarm takes at most {limit}", param=param,
                    code="context_length_exceeded")  # fmt: skip


def chat_prompt(body: dict[str, Any], node: Node) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "each message's content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    assert node.tokenizer is not None
    try:
        return node.tokenizer.apply_chat(clean)
    except (InvalidInput, TypeError, ValueError, TemplateError) as e:
        raise ApiError(400, f"the messages cannot be rendered: {e}", param="messages") from e


def _logprobs_wanted(body: dict[str, Any]) -> bool:
    value = body.get("logprobs")
    if value is None or value is False:
        return False
    if value is True or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5):
        return True
    raise ApiError(400, "logprobs must be null or an integer from 0 to 5", param="logprobs")


async def _run(request: web.Request, chat: bool) -> web.StreamResponse:
    node, entry = request.app[NODE], request.app[ENTRY]
    body = await read_json(request, node.config.serving.max_request_bytes)
    max_tokens, sampling, stops, stream = parse_common(body, node)
    want_logprobs = False if chat else _logprobs_wanted(body)
    if node.tokenizer is None:
        raise ApiError(503, "this peer has no tokenizer loaded", "server_error")
    prompt_ids = chat_prompt(body, node) if chat else completion_prompt(body, node)
    if len(prompt_ids) > node.config.serving.max_prompt_tokens:
        raise _too_long(len(prompt_ids), node, "messages" if chat else "prompt")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
    req = Request(prompt_ids, max_tokens, sampling, stops, ignore_eos)
    try:
        entry.check(req)
    except InvalidInput as e:
        raise ApiError(400, str(e), param="max_tokens") from e
    too_small = None if node.ready() else node.capacity_error()
    if too_small is not None:  # a 503 at once; a repartition under way is only a pause (in generate)
        raise _failure(NotReady(too_small))
    slots, client = request.app[SLOTS], client_of(request, request.app.get(API_KEYS))
    if slots.busy(client) >= slots.per_client:
        node.flood.refused("too_many_sessions", f"client {client} at {request.remote}")
        raise ApiError(429, f"this client already runs {slots.per_client} generations on this peer; wait for one to "
                       "finish", "rate_limit_error", code="too_many_sessions")  # fmt: skip
    with slots.hold(client):
        return await _generate(request, chat, req, body, stream, want_logprobs)


async def _generate(
    request: web.Request, chat: bool, req: Request, body: dict[str, Any], stream: bool, want_logprobs: bool
) -> web.StreamResponse:
    node, entry, metrics = request.app[NODE], request.app[ENTRY], request.app[METRICS]
    prompt_ids = req.prompt_ids
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    timings = Timings()
    metrics.requests_started += 1
    shape = _Shape(rid, created, node.model.spec, chat, len(prompt_ids))
    if stream:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(request, entry, req, timings, shape, metrics, include_usage)
    text, tokens, logprobs, finish = "", [], [], None
    try:
        async with contextlib.aclosing(entry.generate(req, timings)) as events:
            async for event in events:
                text += event.text
                if event.token is not None:
                    tokens.append(event.token)
                    logprobs.append(event.logprob)
                finish = event.finish_reason or finish
    except SwarmError as e:  # NotReady, a stage's refusal, or another of the package's errors
        metrics.requests_failed += 1
        raise _failure(e) from e
    metrics.record(timings)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
        choice["logprobs"] = _logprobs_json(node, tokens, logprobs) if want_logprobs else None
    return web.json_response(shape.whole(choice, len(tokens), timings))


def _failure(e: Exception) -> ApiError:
    if isinstance(e, NotReady):
        return ApiError(503, str(e), "server_error", code="swarm_not_ready")
    if isinstance(e, MessageRejected) and e.reason == "cache_full":  # from a later stage or our own
        return ApiError(503, str(e), "server_error", code="overloaded")
    return ApiError(502, f"the swarm failed to run the request: {e}", "server_error", code="pipeline_error")


def _logprobs_json(node: Node, tokens: list[int], logprobs: list[float | None]) -> dict[str, Any]:
    assert node.tokenizer is not None
    pieces = [node.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


class _Shape:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, prompt_tokens: int) -> None:
        self.rid, self.created, self.model, self.chat, self.prompt_tokens = rid, created, model, chat, prompt_tokens

    def whole(self, choice: dict[str, Any], completion_tokens: int, timings: Timings) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion_tokens),
            "timings": timings.to_json(),
        }

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def chunk(self, event: Event | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if event is not None and event.text:
                delta["content"] = event.text
            choice = {"index": 0, "delta": delta, "finish_reason": event.finish_reason if event else None}
        else:
            choice = {"index": 0, "text": event.text if event else "", "logprobs": None,
                      "finish_reason": event.finish_reason if event else None}  # fmt: skip
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }


async def _stream(
    request: web.Request,
    entry: Entry,
    req: Request,
    timings: Timings,
    shape: _Shape,
    metrics: Metrics,
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(obj: Any) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    tokens = 0
    try:
        if shape.chat:
            await send(shape.chunk(None, first=True))
        async with contextlib.aclosing(entry.generate(req, timings)) as events:
            async for event in events:
                tokens += event.token is not None
                if event.finish_reason:
                    # The last chunk also carries the request's usage and timings.
                    chunk = shape.chunk(event)
                    chunk["usage"], chunk["timings"] = shape.usage(tokens), timings.to_json()
                    await send(chunk)
                elif event.text:
                    await send(shape.chunk(event))
        metrics.record(timings)
        if include_usage:  # OpenAI's stream_options.include_usage: a final chunk with no choices
            await send({**shape.chunk(None), "choices": [], "usage": shape.usage(tokens)})
    except (ConnectionResetError, ClientConnectionResetError):
        metrics.requests_failed += 1
        log.info("client went away during %s; its session is closed", shape.rid)
        return response
    except SwarmError as e:  # NotReady, a stage's refusal, or another of the package's errors
        metrics.requests_failed += 1
        error = _failure(e)
        await send({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def post_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's text completions."""
    return await _run(request, chat=False)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's chat completions."""
    return await _run(request, chat=True)


async def get_models(request: web.Request) -> web.Response:
    """The one model this swarm serves."""
    node = request.app[NODE]
    model = {"id": node.model.spec, "object": "model", "created": 0, "owned_by": "swarm-inference"}
    return web.json_response({"object": "list", "data": [model]})


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this peer's counters and the swarm's state."""
    return web.Response(text=request.app[METRICS].render(request.app[NODE]), content_type="text/plain")


def add_routes(app: web.Application, node: Node) -> None:
    """Mount the public API on the peer's application."""
    app[NODE] = node
    app[ENTRY] = node.entry
    app[METRICS] = Metrics()
    app[SLOTS] = ClientSlots(node.config.serving.max_sessions_per_client)
    app.middlewares.append(openai_errors)
    app.router.add_post("/v1/completions", post_completions)
    app.router.add_post("/v1/chat/completions", post_chat_completions)
    app.router.add_get("/v1/models", get_models)
    app.router.add_get("/metrics", get_metrics)
