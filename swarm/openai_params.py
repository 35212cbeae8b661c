"""The request side of the OpenAI-compatible API: a completions or chat body, checked parameter by
parameter against one table of what OpenAI's API takes, into the generations it asks for (one per
prompt and choice, each an entry `Request`). A parameter this swarm does not implement is answered
with a 400 that names it, never ignored; `null` means the default, as in OpenAI's schema. It knows
JSON bodies, the tokenizer and the serving limits; running the generations and shaping the answers
is `swarm.openai_api`'s business."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from peer.errors import InvalidInput, SwarmError
from peer.grammar import check_grammar, json_schema_grammar
from peer.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams, draw_seed
from swarm.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS
from swarm.entry import Request
from swarm.tools import ToolError, Tools, clean_messages, for_template, parse_tools

# Parameters taken and honoured, per endpoint ("both" for the two). `user` and `metadata` identify the
# caller to OpenAI and change nothing in the output: they are taken and ignored.
SUPPORTED = {
    "both": ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
             "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "top_k", "ignore_eos"),
    "completions": ("prompt", "echo", "best_of", "suffix"),
    "chat": ("messages", "max_completion_tokens", "top_logprobs", "metadata", "store", "service_tier",
             "modalities", "response_format", "tools", "tool_choice", "parallel_tool_calls"),
}  # fmt: skip
# Parameters of OpenAI's API this swarm refuses whenever they are set (not null).
REFUSED = {
    "functions": "the legacy `functions` (use `tools`)",
    "function_call": "the legacy `function_call` (use `tool_choice`)",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning effort (this model does not reason)",
    "web_search_options": "web search",
    "verbosity": "verbosity",
}


class ApiError(SwarmError):
    """An error in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


@dataclass(frozen=True)
class ApiRequest:
    """What a completions or chat body asks for, checked."""

    chat: bool
    prompts: tuple[tuple[int, ...], ...]  # token ids, one per prompt
    n: int  # choices per prompt
    max_tokens: int
    sampling: SamplingParams  # the first choice's; the others' seeds are derived (`requests`)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignore_eos: bool = False
    echo: bool = False
    # Log-probabilities: None for none; else how many alternatives per token (completions' `logprobs`,
    # chat's `top_logprobs`).
    logprobs: int | None = None
    tools: Tools | None = None  # chat's tools and tool_choice (None: no tools, or tool_choice none)

    def requests(self) -> list[Request]:
        """One generation per choice, in the order of the response's choices (prompt by prompt, n
        each). Choice i draws with a seed derived from the request's seed and i (choice 0: the seed
        itself, so one choice draws as it always did)."""
        out = []
        for p, prompt in enumerate(self.prompts):
            for j in range(self.n):
                index = p * self.n + j
                seed = self.sampling.seed if index == 0 else draw_seed(self.sampling.seed, 0, index)
                sampling = replace(self.sampling, seed=seed)
                out.append(Request(list(prompt), self.max_tokens, sampling, self.stop, self.ignore_eos, self.echo))
        return out


def parse_request(body: dict[str, Any], node: Any, chat: bool) -> ApiRequest:
    """Check a body against the parameter table and read it; ApiError (a 400 naming the parameter,
    or a 404 for another model) when it asks for anything this swarm does not do."""
    check_parameters(body, chat)
    max_tokens, sampling, stops, stream = parse_common(body, node)
    n = _integer(body, "n", 1, 1, node.config.serving.max_sessions_per_client)
    echo = False if chat else _flag(body, "echo")
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens must be a positive integer (0 only with echo)", param="max_tokens")
    logprobs = chat_logprobs(body) if chat else completion_logprobs(body)
    if not chat:
        best_of = body.get("best_of")
        if best_of is not None and (type(best_of) is not int or best_of != n):
            raise ApiError(400, "best_of is not supported (only null, or equal to n)", param="best_of")
        if body.get("suffix") not in (None, ""):
            raise ApiError(400, "suffix (insertion) is not supported", param="suffix")
    else:
        _check_chat_extras(body)
    tools = _tools(body) if chat else None
    grammar = response_grammar(body) if chat else ""
    if stops and (grammar or (tools is not None and tools.forced)):  # a stop string would cut the reply short
        raise ApiError(400, "stop cannot be combined with response_format or a forced tool call: the reply "
                       "ends where its grammar does", param="stop")  # fmt: skip
    if tools is not None and tools.forced:
        if grammar:
            raise ApiError(400, "a forced tool call and response_format cannot both shape the reply",
                           param="response_format")  # fmt: skip
        grammar = tools.grammar()
        try:
            check_grammar(grammar)
        except InvalidInput as e:
            raise ApiError(400, f"the tools' parameters: {e}", param="tools") from e
    sampling = replace(sampling, top_logprobs=logprobs or 0, prompt_logprobs=echo and logprobs is not None,
                       grammar=grammar)  # fmt: skip
    prompts = [chat_prompt(body, node, tools)] if chat else completion_prompts(body, node)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise ApiError(400, "stream_options takes include_usage only", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage") is True)
    return ApiRequest(chat, tuple(tuple(p) for p in prompts), n, max_tokens, sampling, stops, stream, include_usage,
                      _flag(body, "ignore_eos"), echo, logprobs, tools)  # fmt: skip


def _tools(body: dict[str, Any]) -> Tools | None:
    try:
        return parse_tools(body)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from e


def check_parameters(body: dict[str, Any], chat: bool) -> None:
    """A 400 naming the first parameter that this endpoint does not take, or that this swarm refuses."""
    known = set(SUPPORTED["both"]) | set(SUPPORTED["chat" if chat else "completions"])
    for name, value in body.items():
        if name in REFUSED and value is not None:
            raise ApiError(400, f"{name} is not supported: this swarm does not offer {REFUSED[name]}", param=name)
        if name not in known and name not in REFUSED:
            endpoint = "chat completions" if chat else "completions"
            raise ApiError(400, f"unknown parameter {name!r} for {endpoint}", param=name, code="unknown_parameter")


def _check_chat_extras(body: dict[str, Any]) -> None:
    """Chat parameters taken only in their default (or harmless) forms, until this swarm does more."""
    if body.get("store") not in (None, False):
        raise ApiError(400, "store is not supported: this swarm keeps no completions", param="store")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise ApiError(400, "service_tier takes auto or default only", param="service_tier")
    if body.get("modalities") not in (None, ["text"]):
        raise ApiError(400, 'modalities takes ["text"] only', param="modalities")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ApiError(400, "metadata is a map of strings", param="metadata")


def response_grammar(body: dict[str, Any]) -> str:
    """The grammar of chat's `response_format`: "" for text; any JSON object for `json_object`; JSON
    matching the schema for `json_schema` (always enforced, `strict` or not)."""
    fmt = body.get("response_format")
    if fmt is None:
        return ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text" and set(fmt) == {"type"}:
        return ""
    if kind == "json_object" and set(fmt) == {"type"}:
        return json_schema_grammar(None)
    spec = fmt.get("json_schema") if kind == "json_schema" and set(fmt) == {"type", "json_schema"} else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
        raise ApiError(
            400,
            'response_format is {"type": "text"}, {"type": "json_object"}, or {"type": '
            '"json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            param="response_format",
        )
    if spec.get("strict") not in (None, True, False) or not set(spec) <= {"name", "schema", "strict", "description"}:
        raise ApiError(400, "json_schema takes name, schema, strict and description", param="response_format")
    grammar = json_schema_grammar(spec["schema"])
    try:
        check_grammar(grammar)
    except InvalidInput as e:
        raise ApiError(400, f"response_format's schema: {e}", param="response_format") from e
    return grammar


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be a number between {lo:g} and {hi:g}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def parse_common(body: dict[str, Any], node: Any) -> tuple[int, SamplingParams, tuple[str, ...], bool]:
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
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this swarm's limit of {limit}", param="max_tokens")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)  # a fresh draw per request, as OpenAI's API does
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < (1 << 63):
        raise ApiError(400, "seed must be a 64-bit integer", param="seed")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            top_k=_integer(body, "top_k", 0, 0, 1 << 31),
            seed=seed,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            logit_bias=_logit_bias(body, node.model.profile.vocab_size),
        )
    except InvalidInput as e:
        raise ApiError(400, str(e)) from e
    return max_tokens, sampling, _stops(body), _flag(body, "stream")


def _logit_bias(body: dict[str, Any], vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: a map from token ids (as strings, JSON's keys) to biases in [-100, 100]."""
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias maps at most {MAX_LOGIT_BIAS} token ids to biases", param="logit_bias")
    out = []
    for key, bias in raw.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 else -1
        if str(token) != key:  # "01", " 1", "+1": not a token id as OpenAI writes one
            token = -1
        if not 0 <= token < vocab:
            raise ApiError(400, f"logit_bias keys are token ids in [0, {vocab}), not {key!r}", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias values are numbers in [-100, 100], not {bias!r}", param="logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    ok = stops is not None and len(stops) <= MAX_STOP_STRINGS
    if stops is None or not ok or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings of 1 to "
                       f"{MAX_STOP_CHARS} characters", param="stop")  # fmt: skip
    return stops


def completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions' `logprobs`: null, or how many alternatives per token (0 to MAX_TOP_LOGPROBS)."""
    value = body.get("logprobs")
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be null or an integer from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
    return value


def chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's `logprobs` (true or false) and `top_logprobs` (0 to MAX_TOP_LOGPROBS, with logprobs)."""
    wanted = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if type(top) is not int or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return top


def completion_prompts(body: dict[str, Any], node: Any) -> list[list[int]]:
    """Token ids of each prompt of a completions body: a string, token ids (a list of integers), or a
    list of several of either, as OpenAI's API takes them."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a non-empty string, a list of token ids, or a list of those",
                       param="prompt")  # fmt: skip
    if len(prompts) > node.config.serving.max_sessions_per_client:
        raise ApiError(400, f"a request takes at most {node.config.serving.max_sessions_per_client} prompts",
                       param="prompt")  # fmt: skip
    return [_prompt_ids(p, node) for p in prompts]


def completion_prompt(body: dict[str, Any], node: Any) -> list[int]:
    """Token ids of a completions body that holds exactly one prompt."""
    prompts = completion_prompts(body, node)
    if len(prompts) != 1:
        raise ApiError(400, "expected one prompt", param="prompt")
    return prompts[0]


def _prompt_ids(prompt: Any, node: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if len(prompt) > node.config.serving.max_prompt_tokens:
            raise too_long(len(prompt), node, "prompt")
        vocab = node.model.profile.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "each prompt must be a non-empty string or a list of token ids", param="prompt")
    if node.tokenizer is None:
        raise ApiError(503, "this peer has no tokenizer loaded", "server_error")
    try:
        ids = node.tokenizer.encode(prompt)
    except (TypeError, ValueError, InvalidInput) as e:
        raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from e
    if len(ids) > node.config.serving.max_prompt_tokens:
        raise too_long(len(ids), node, "prompt")
    return list(ids)


def too_long(tokens: int, node: Any, param: str) -> ApiError:
    """The 400 for a prompt over the swarm's limit."""
    limit = node.config.serving.max_prompt_tokens
    return ApiError(400, f"the prompt has {tokens} tokens; this swarm takes at most {limit}", param=param,
                    code="context_length_exceeded")  # fmt: skip


def chat_prompt(body: dict[str, Any], node: Any, tools: Tools | None = None) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template, with the tools where the
    request has any (`swarm.tools`: through the template where it takes them, else in our prompt
    format). OpenAI's `developer` role is its newer name for `system`, and is rendered as one."""
    try:
        messages = clean_messages(body.get("messages"))
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from e
    if node.tokenizer is None:
        raise ApiError(503, "this peer has no tokenizer loaded", "server_error")
    native = bool(getattr(node.tokenizer, "takes_tools", False))
    rendered, tools_arg = for_template(messages, tools, native)
    try:
        ids = node.tokenizer.apply_chat(rendered, tools=tools_arg) if tools_arg else node.tokenizer.apply_chat(rendered)
    except (InvalidInput, TypeError, ValueError, TemplateError) as e:
        raise ApiError(400, f"the messages cannot be rendered: {e}", param="messages") from e
    if len(ids) > node.config.serving.max_prompt_tokens:
        raise too_long(len(ids), node, "messages")
    return list(ids)


def finite(logprob: float | None) -> float | None:
    """A log-probability as JSON can carry it: -inf as OpenAI's floor of -9999.0, NaN as null."""
    if logprob is None or math.isnan(logprob):
        return None
    return max(logprob, -9999.0)
