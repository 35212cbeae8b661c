"""Tool calls (OpenAI's `tools` and `tool_choice`) on a model that may or may not know them. The tools
reach the model through its chat template where the template takes them (it names `tools`);
otherwise through the prompt format below (Hermes's, which Qwen's templates also use), in a system
message. A reply whose tool_choice is `required` or a named function is constrained to a call: JSON
`{"name": ..., "arguments": {...}}` whose arguments match that function's parameters (`peer.grammar`).
With `auto` the model chooses: a reply that is one or more `<tool_call>` blocks of valid calls
becomes tool_calls, anything else stays text. With `none` the tools stay out of the prompt. Earlier
turns (an assistant's tool_calls, a tool's result) are rendered the same way. It knows JSON bodies and
message lists; it neither tokenizes nor generates."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from peer.grammar import json_schema_grammar

MAX_TOOLS = 128  # as OpenAI's
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a function's name, as OpenAI's
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# The prompt format for templates that do not take tools: the tools as JSON, then how to call one.
TOOLS_PROMPT = (
    "You may call one or more functions to answer the user. The functions, as JSON schemas:\n<tools>\n{tools}\n"
    "</tools>\nTo call a function, reply with only:\n" + CALL_OPEN + '\n{{"name": <the function\'s name>, '
    '"arguments": <its arguments as a JSON object>}}\n' + CALL_CLOSE
)


class ToolError(ValueError):
    """A tools parameter or a message that cannot be used; names the parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    """One function a reply may call."""

    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema for its arguments

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class Tools:
    """A request's tools and its tool_choice: "auto", "required" or "named" (`named` then names the
    function; "none" leaves a request without tools)."""

    functions: tuple[Function, ...]
    choice: str
    named: str | None = None
    parallel: bool = True  # parallel_tool_calls: false keeps an auto reply to its first call

    @property
    def forced(self) -> bool:
        """The reply must be a call (`required`, or a named function)."""
        return self.choice != "auto"

    def grammar(self) -> str:
        """The grammar of a forced reply: one call of the named function, or of any of them. Each
        function's definitions (`$defs`, `definitions`) move to the grammar's root, renamed per
        function, and its references with them, so that they still resolve."""
        chosen = [(i, f) for i, f in enumerate(self.functions) if self.choice == "required" or f.name == self.named]
        defs: dict[str, Any] = {}
        schemas = []
        for i, f in chosen:
            parameters = _hoisted(f.parameters, f"f{i}_", defs)
            schemas.append({"type": "object", "properties": {"name": {"const": f.name}, "arguments": parameters},
                            "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
        root: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return json_schema_grammar({**root, "$defs": defs} if defs else root)


def _hoisted(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """`schema` with its definitions moved into `defs` under `prefix` and its local references
    ("#/$defs/X", "#/definitions/X") pointed at them."""
    if isinstance(schema, list):
        return [_hoisted(x, prefix, defs) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, definition in value.items():
                defs[prefix + name] = _hoisted(definition, prefix, defs)
        elif key == "$ref" and isinstance(value, str):
            for root in ("#/$defs/", "#/definitions/"):
                if value.startswith(root):
                    value = "#/$defs/" + prefix + value[len(root) :]
            out[key] = value
        else:
            out[key] = _hoisted(value, prefix, defs)
    return out


@dataclass(frozen=True)
class ToolCall:
    """A call the model made."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The tools and tool_choice of a chat body; None when it has no tools or tool_choice is none."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise ToolError(f"tools is a list of at most {MAX_TOOLS} functions", "tools")
    functions = []
    for tool in raw:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise ToolError('each tool is {"type": "function", "function": {"name": ..., "parameters": {...}}} '
                            "with a name of 1 to 64 letters, digits, _ or -", "tools")  # fmt: skip
        parameters = fn.get("parameters")
        if parameters is None or parameters == {}:
            parameters = {"type": "object", "properties": {}}
        description = fn.get("description") or ""
        if not isinstance(parameters, dict) or parameters.get("type") != "object" or not isinstance(description, str):
            raise ToolError(f"function {fn['name']}: parameters is a JSON schema of an object (\"type\": \"object\"), "
                            "description a string", "tools")  # fmt: skip
        functions.append(Function(fn["name"], description, parameters))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("two tools have the same name", "tools")
    parallel = body.get("parallel_tool_calls")
    if parallel not in (None, True, False):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if named not in names:
            raise ToolError(f"tool_choice names a function that is not among the tools ({', '.join(names)})",
                            "tool_choice")  # fmt: skip
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise ToolError('tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}', "tool_choice")  # fmt: skip
    return None if choice == "none" else Tools(tuple(functions), choice, named, parallel is not False)


def clean_messages(messages: Any) -> list[dict[str, Any]]:
    """A chat body's messages, checked: roles system, developer (a system message), user, assistant
    (whose content may be null beside tool_calls) and tool (a result, with its call's id); text
    content as a string or text parts. Each comes out as {role, content} plus, for an assistant's
    calls, tool_calls [{id, name, arguments (JSON text)}], and for a tool's result, tool_call_id."""
    if not isinstance(messages, list) or not messages:
        raise ToolError("messages must be a non-empty list", "messages")
    out = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ToolError("each message needs a role of system, developer, user, assistant or tool", "messages")
        content = _text(m.get("content"), role)
        clean: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            clean["tool_calls"] = [_call(c) for c in m["tool_calls"]] if isinstance(m["tool_calls"], list) else None
            if not clean["tool_calls"]:
                raise ToolError("an assistant's tool_calls is a non-empty list", "messages")
        elif content is None:
            raise ToolError(f"a {role} message needs content (a string or text parts)"
                            + (" or tool_calls" if role == "assistant" else ""), "messages")  # fmt: skip
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ToolError("a tool message needs the tool_call_id it answers", "messages")
            clean["tool_call_id"] = m["tool_call_id"]
        out.append(clean)
    return out


def _text(content: Any, role: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ToolError(f"a {role} message's content is a string or a list of text parts (only text is supported)",
                    "messages")  # fmt: skip


def _call(raw: Any) -> dict[str, str]:
    fn = raw.get("function") if isinstance(raw, dict) and raw.get("type", "function") == "function" else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
        raise ToolError('a tool call is {"id": ..., "type": "function", "function": {"name": ..., "arguments": '
                        '"<JSON>"}}', "messages")  # fmt: skip
    try:
        json.loads(fn["arguments"])
    except ValueError as e:
        raise ToolError(f"tool call {fn['name']}: its arguments are not JSON ({e})", "messages") from e
    return {"id": str(raw.get("id") or ""), "name": fn["name"], "arguments": fn["arguments"]}


def for_template(messages: list[dict[str, Any]], tools: Tools | None, native: bool) -> tuple[list[dict[str, Any]], Any]:
    """The messages (and the tools argument) to render with a chat template: in the template's own
    form where it takes tools (`native`), else in the prompt format of this module."""
    if native:
        rendered = []
        for m in messages:
            m = dict(m)
            if "tool_calls" in m:  # transformers' form: arguments as a mapping
                m["tool_calls"] = [{"type": "function", "id": c["id"],
                                    "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                                   for c in m["tool_calls"]]  # fmt: skip
            rendered.append(m)
        return rendered, [{"type": "function", "function": f.to_json()} for f in tools.functions] if tools else None
    rendered = []
    for m in messages:
        if m["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif "tool_calls" in m:
            calls = "\n".join(f"{CALL_OPEN}\n{_call_json(c['name'], c['arguments'])}\n{CALL_CLOSE}"
                              for c in m["tool_calls"])  # fmt: skip
            rendered.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            rendered.append({"role": m["role"], "content": m["content"]})
    if tools is not None:
        listed = "\n".join(json.dumps(f.to_json()) for f in tools.functions)
        prompt = TOOLS_PROMPT.format(tools=listed)
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, None


def _call_json(name: str, arguments: str) -> str:
    return json.dumps({"name": name, "arguments": json.loads(arguments)})


def new_call(name: str, arguments: Any) -> ToolCall:
    """A call with a fresh id, its arguments as compact JSON text."""
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, json.dumps(arguments, separators=(",", ":")))


def forced_call(text: str, tools: Tools) -> ToolCall | None:
    """The call a constrained reply holds (None if it was cut short, by max_tokens, before it parsed)."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    names = {f.name for f in tools.functions}
    if not (isinstance(raw, dict) and raw.get("name") in names and isinstance(raw.get("arguments"), dict)):
        return None
    return new_call(raw["name"], raw["arguments"])


def auto_calls(text: str, tools: Tools) -> list[ToolCall] | None:
    """The calls of an `auto` reply that is nothing but `<tool_call>` blocks of valid calls (only the
    first with parallel_tool_calls false); None for any other reply (it stays text)."""
    rest, calls = text.strip(), []
    names = {f.name for f in tools.functions}
    while rest:
        if not rest.startswith(CALL_OPEN) or CALL_CLOSE not in rest:
            return None
        body, rest = rest[len(CALL_OPEN) :].split(CALL_CLOSE, 1)
        rest = rest.strip()
        try:
            raw = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(raw, dict) and raw.get("name") in names and isinstance(raw.get("arguments"), dict)):
            return None
        calls.append(new_call(raw["name"], raw["arguments"]))
    return (calls if tools.parallel else calls[:1]) or None


def may_be_a_call(text: str) -> bool:
    """Whether an `auto` reply that begins with `text` may still turn out to be tool calls."""
    head = text.lstrip()
    return head.startswith(CALL_OPEN) or CALL_OPEN.startswith(head)
