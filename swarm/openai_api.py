"""The public, OpenAI-compatible API every peer serves: `POST /v1/completions`,
`POST /v1/chat/completions` (whole, or `stream: true` as server-sent events ending with
`data: [DONE]`), `GET /v1/models` and `/v1/models/{id}`, and `GET /metrics` in Prometheus text.
Handlers read the request (`swarm.openai_params`) into one entry `Request` per prompt and choice,
run them at once, and shape the answer, log-probabilities included; every error is OpenAI's
`{"error": {message, type, param, code}}` with a 4xx or 5xx status. Responses add a `timings`
object (time to first token, tokens per second, compute per stage, wire per hop, bytes sent,
time at the entry)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import ClientConnectionResetError, web

from peer.errors import InvalidInput, SwarmError
from peer.tokenizer import Tokenizer
from swarm.detokenizer import Chunk, OutToken
from swarm.entry import Entry, Request, Timings
from swarm.errors import MessageRejected, NotReady
from swarm.guard import API_KEYS, ClientSlots, client_of
from swarm.metrics import Metrics
from swarm.node import Node
from swarm.openai_params import ApiError, ApiRequest, finite, parse_request
from swarm.tools import ToolCall, auto_calls, forced_call, may_be_a_call

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
ENTRY = web.AppKey("entry", Entry)
METRICS = web.AppKey("metrics", Metrics)
SLOTS = web.AppKey("slots", ClientSlots)
RETRY_AFTER_S = 5  # what a 429 or 503 asks a client to wait before it tries again


def error_response(e: ApiError) -> web.Response:
    """An ApiError as OpenAI's error body; a 503 or 429 says when to retry (`Retry-After`, seconds)."""
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return web.json_response(body, status=e.status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every error of the /v1 routes in OpenAI's shape, whatever raised it."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:
        if not request.path.startswith("/v1/"):
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return error_response(ApiError(e.status, e.reason or "request refused", kind))
    except Exception:
        if not request.path.startswith("/v1/"):
            raise
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ApiError(500, "internal error; the peer's log has the details", "server_error"))


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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {str(e) or 'nested too deep'}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def _run(request: web.Request, chat: bool) -> web.StreamResponse:
    node, entry = request.app[NODE], request.app[ENTRY]
    body = await read_json(request, node.config.serving.max_request_bytes)
    api = parse_request(body, node, chat)
    generations = api.requests()
    try:
        for generation in generations:
            entry.check(generation)
    except InvalidInput as e:
        raise ApiError(400, str(e), param="max_tokens") from e
    too_small = None if node.ready() else node.capacity_error()
    if too_small is not None:  # a 503 at once; a repartition under way is only a pause (in generate)
        raise _failure(NotReady(too_small))
    slots, client = request.app[SLOTS], client_of(request, request.app.get(API_KEYS))
    if len(generations) > slots.per_client:
        raise ApiError(400, f"this request asks for {len(generations)} generations (prompts times n); a client runs "
                       f"at most {slots.per_client} at once on this peer", param="n")  # fmt: skip
    if slots.busy(client) + len(generations) > slots.per_client:
        node.flood.refused("too_many_sessions", f"client {client} at {request.remote}")
        raise ApiError(429, f"this client already runs {slots.busy(client)} of its {slots.per_client} generations on "
                       "this peer; wait for one to finish", "rate_limit_error", code="too_many_sessions")  # fmt: skip
    with slots.hold(client, len(generations)):
        shape = _Shape(api, node.model.spec, node.tokenizer)
        request.app[METRICS].requests_started += 1
        if api.stream:
            return await _stream(request, entry, generations, shape)
        return await _whole(request, entry, generations, shape)


class ClientGone(Exception):
    """The client of a request hung up before its answer was ready."""


def _gone(request: web.Request) -> bool:
    """Whether the client hung up: aiohttp drops a connection's transport when it is lost."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _whole(request: web.Request, entry: Entry, generations: list[Request], shape: _Shape) -> web.StreamResponse:
    """Every choice's generation at once; the answer when all are done. A client that hangs up
    stops them all within a step (its sessions close), rather than holding its slots to the end."""
    metrics = request.app[METRICS]

    async def one(generation: Request) -> tuple[list[Chunk], Timings]:
        timings, chunks = Timings(), []
        async with contextlib.aclosing(entry.generate(generation, timings)) as events:
            async for chunk in events:
                if _gone(request):
                    raise ClientGone
                chunks.append(chunk)
        return chunks, timings

    tasks = [asyncio.ensure_future(one(g)) for g in generations]
    try:
        results = await asyncio.gather(*tasks)
    except ClientGone:
        metrics.requests_failed += 1
        log.info("client went away during %s; its %d session(s) are closed", shape.rid, len(generations))
        return web.Response(status=499)  # nobody reads it (nginx's "client closed request")
    except SwarmError as e:  # NotReady, a stage's refusal, or another of the package's errors
        metrics.requests_failed += 1
        raise _failure(e) from e
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for _, timings in results:
        metrics.record(timings)
    choices = [shape.choice(i, chunks) for i, (chunks, _) in enumerate(results)]
    return web.json_response(shape.whole(choices, [t for _, t in results]))


async def _stream(request: web.Request, entry: Entry, generations: list[Request], shape: _Shape) -> web.StreamResponse:
    """Server-sent events: every choice's chunks as they come (each with its index), a chunk with
    the usage at the end when stream_options.include_usage asks for it, then `data: [DONE]`."""
    metrics = request.app[METRICS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(obj: Any) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    # (choice, its next chunk | None when it ended | the error that ended it); bounded: a producer
    # waits while the client reads slowly.
    queue: asyncio.Queue[tuple[int, Chunk | SwarmError | None]] = asyncio.Queue(4 * len(generations))
    timings = [Timings() for _ in generations]

    async def pump(i: int, generation: Request) -> None:
        try:
            async with contextlib.aclosing(entry.generate(generation, timings[i])) as events:
                async for chunk in events:
                    await queue.put((i, chunk))
            await queue.put((i, None))
        except SwarmError as e:
            await queue.put((i, e))
        except Exception as e:  # a bug, or a frame the entry could not use: the stream ends with an error
            log.exception("choice %d of %s failed", i, shape.rid)
            await queue.put((i, SwarmError(f"internal error ({type(e).__name__}); the peer's log has the details")))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        if shape.api.chat:
            for i in range(len(generations)):
                await send(shape.chunk(i, None))
        running = len(generations)
        while running:
            i, item = await queue.get()
            if _gone(request):  # held-back text (a tool call) writes nothing: the client's hang-up shows here
                raise ConnectionResetError("the client went away")
            if item is None:
                running -= 1
            elif isinstance(item, SwarmError):
                metrics.requests_failed += 1
                error = _failure(item)
                await send({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
                break
            else:
                for chunk in shape.stream(i, item):
                    if chunk["choices"][0]["finish_reason"]:  # the choice's last chunk also carries its timings
                        chunk["timings"] = timings[i].to_json()
                    await send(chunk)
        else:
            for t in timings:
                metrics.record(t)
            if shape.api.include_usage:  # OpenAI's stream_options.include_usage: a final chunk with no choices
                await send({**shape.head(), "choices": [], "usage": shape.usage(timings)})
    except (ConnectionResetError, ClientConnectionResetError):
        metrics.requests_failed += 1
        log.info("client went away during %s; its session(s) are closed", shape.rid)
        return response
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _failure(e: Exception) -> ApiError:
    if isinstance(e, NotReady):
        return ApiError(503, str(e), "server_error", code="swarm_not_ready")
    if isinstance(e, MessageRejected) and e.reason == "cache_full":  # from a later stage or our own
        return ApiError(503, str(e), "server_error", code="overloaded")
    return ApiError(502, f"the swarm failed to run the request: {e}", "server_error", code="pipeline_error")


class _Shape:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, api: ApiRequest, model: str, tokenizer: Tokenizer | None) -> None:
        self.api, self.model = api, model
        self.rid = ("chatcmpl-" if api.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in api.prompts)
        self._offsets: dict[int, int] = {}  # per choice: characters of its text streamed so far
        # Per choice of a request with tools: the chunks held while the reply may be tool calls.
        self._held: dict[int, list[Chunk]] = {}

    def head(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": ("chat.completion.chunk" if self.api.stream else "chat.completion")
            if self.api.chat
            else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def whole(self, choices: list[dict[str, Any]], timings: list[Timings]) -> dict[str, Any]:
        """The response of a request that was not streamed."""
        return {**self.head(), "choices": choices, "usage": self.usage(timings), "timings": _merged(timings)}

    def usage(self, timings: list[Timings]) -> dict[str, int]:
        completion = sum(t.tokens for t in timings)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def choice(self, index: int, chunks: list[Chunk]) -> dict[str, Any]:
        """One choice of a whole response."""
        text = "".join(c.text for c in chunks)
        tokens = [t for c in chunks for t in c.tokens]
        finish = chunks[-1].finish_reason if chunks else None
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if self.api.chat:
            calls = self._calls(text, finish)
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [c.to_json() for c in calls]}
                choice["finish_reason"] = "tool_calls"
            choice["logprobs"] = self._chat_logprobs(tokens)
        else:
            choice["text"] = text
            choice["logprobs"] = self._completion_logprobs(tokens, 0)
        return choice

    def _calls(self, text: str, finish: str | None) -> list[ToolCall] | None:
        """The tool calls a finished reply holds, if the request has tools and the reply is calls."""
        tools = self.api.tools
        if tools is None or finish != "stop":
            return None
        if tools.forced:
            call = forced_call(text, tools)
            return [call] if call is not None else None
        return auto_calls(text, tools)

    def stream(self, index: int, chunk: Chunk) -> list[dict[str, Any]]:
        """The chunks to send for one choice's next chunk of text. A reply that is (or, with tool_choice
        auto, may still turn out to be) tool calls is held back whole, and goes out at its end as
        OpenAI streams calls: a delta with each call's id and name, then one with its arguments."""
        tools = self.api.tools
        if tools is None:
            return [self.chunk(index, chunk)] if chunk.text or chunk.tokens or chunk.finish_reason else []
        held = self._held.setdefault(index, [])
        if held is not _RELEASED:
            held.append(chunk)
            text = "".join(c.text for c in held)
            if chunk.finish_reason is None and (tools.forced or may_be_a_call(text)):
                return []
            self._held[index] = _RELEASED
            calls = self._calls(text, chunk.finish_reason)
            if calls:
                return self._call_chunks(index, calls)
            chunk = Chunk(text, tuple(t for c in held for t in c.tokens), chunk.finish_reason)
        return [self.chunk(index, chunk)] if chunk.text or chunk.tokens or chunk.finish_reason else []

    def _call_chunks(self, index: int, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = []
        for at, call in enumerate(calls):
            head = {"index": at, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(self._delta(index, {"tool_calls": [head]}))
            out.append(self._delta(index, {"tool_calls": [{"index": at, "function": {"arguments": call.arguments}}]}))
        out.append(self._delta(index, {}, "tool_calls"))
        return out

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head(), "choices": [choice]}

    def chunk(self, index: int, chunk: Chunk | None) -> dict[str, Any]:
        """A streamed chunk of one choice (None: a chat stream's opening, with the role)."""
        if self.api.chat:
            if chunk is None:
                choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}  # fmt: skip
            else:
                delta = {"content": chunk.text} if chunk.text else {}
                choice = {"index": index, "delta": delta, "logprobs": self._chat_logprobs(list(chunk.tokens)),
                          "finish_reason": chunk.finish_reason}  # fmt: skip
        else:
            assert chunk is not None
            at = self._offsets.get(index, 0)
            self._offsets[index] = at + len(chunk.text)
            choice = {"index": index, "text": chunk.text,
                      "logprobs": self._completion_logprobs(list(chunk.tokens), at),
                      "finish_reason": chunk.finish_reason}  # fmt: skip
        return {**self.head(), "choices": [choice]}

    def _completion_logprobs(self, tokens: list[OutToken], offset: int) -> dict[str, Any] | None:
        """Completions' logprobs object: each token's text, log-probability, most likely alternatives
        (a map from text to log-probability; the chosen token is always among them, as in OpenAI's)
        and offset in the choice's text. The prompt's first token has no log-probability (null)."""
        if self.api.logprobs is None:
            return None
        offsets: list[int] = []
        top: list[dict[str, float | None] | None] = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token.text)
            if token.logprob is None:
                top.append(None)
                continue
            alternatives: dict[str, float | None] = {}
            for alt in token.top:
                alternatives.setdefault(alt.text, finite(alt.logprob))
            alternatives.setdefault(token.text, finite(token.logprob))
            top.append(alternatives)
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [finite(t.logprob) for t in tokens],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def _chat_logprobs(self, tokens: list[OutToken]) -> dict[str, Any] | None:
        """Chat's logprobs object: per token of the message (the end-of-sequence token is not one) its
        text, log-probability, UTF-8 bytes and the most likely alternatives (top_logprobs of them)."""
        if self.api.logprobs is None:
            return None
        content = [
            {
                "token": t.text,
                "logprob": finite(t.logprob),
                "bytes": list(t.text.encode()),
                "top_logprobs": [
                    {"token": a.text, "logprob": finite(a.logprob), "bytes": list(a.text.encode())} for a in t.top
                ],
            }
            for t in tokens
            if not t.ends
        ]
        return {"content": content, "refusal": None}


_RELEASED: list[Chunk] = []  # a choice whose reply turned out to be text, and streams as it comes


def _merged(timings: list[Timings]) -> dict[str, Any]:
    """The timings of a response: its one generation's, or with several, the slowest one's."""
    return max(timings, key=lambda t: t.total_s).to_json()


async def post_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's text completions."""
    return await _run(request, chat=False)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's chat completions."""
    return await _run(request, chat=True)


def _model(node: Node) -> dict[str, Any]:
    return {"id": node.model.spec, "object": "model", "created": 0, "owned_by": "swarm-inference"}


async def get_models(request: web.Request) -> web.Response:
    """The one model this swarm serves."""
    return web.json_response({"object": "list", "data": [_model(request.app[NODE])]})


async def get_model(request: web.Request) -> web.Response:
    """One model by its id: the one this swarm serves, or a 404 in OpenAI's shape."""
    node = request.app[NODE]
    wanted = request.match_info["model_id"]
    if wanted != node.model.spec:
        raise ApiError(404, f"the model {wanted!r} does not exist; this swarm serves {node.model.spec!r}",
                       param="model", code="model_not_found")  # fmt: skip
    return web.json_response(_model(node))


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
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/metrics", get_metrics)
