"""Tools: the tools and tool_choice of a body are read and checked; messages with tool calls and
tool results are rendered in the template's form or in our prompt format; a forced reply's grammar
admits exactly the calls of the chosen functions; an auto reply is calls only when it is nothing but
valid `<tool_call>` blocks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from peer.grammar import Grammars
from swarm.tools import (
    TOOLS_PROMPT,
    ToolError,
    auto_calls,
    clean_messages,
    for_template,
    forced_call,
    may_be_a_call,
    parse_tools,
)
from tests.helpers import byte_grammars

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tools_and_tool_choice_are_read() -> None:
    tools = parse_tools({"tools": [WEATHER, TIME]})
    assert tools is not None and tools.choice == "auto" and not tools.forced
    assert [f.name for f in tools.functions] == ["get_weather", "get_time"]
    assert tools.functions[1].parameters == {"type": "object", "properties": {}}
    named = parse_tools(
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert named is not None and (named.choice, named.named) == ("named", "get_time") and named.forced
    # A function may be called "none" or "required" and still be forced by name.
    odd = parse_tools({"tools": [WEATHER, {"type": "function", "function": {"name": "none"}}],
                       "tool_choice": {"type": "function", "function": {"name": "none"}}})  # fmt: skip
    assert odd is not None and odd.named == "none" and odd.forced
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tools({}) is None and parse_tools({"tools": [], "tool_choice": None}) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
    ids=repr,
)
def test_bad_tools_name_their_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ToolError) as e:
        parse_tools(body)
    assert e.value.param == param


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TURNS = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "31 C"},
]


def test_tool_turns_are_accepted_and_rendered_in_our_prompt_format() -> None:
    messages = clean_messages(TURNS)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2]["tool_calls"] == [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    tools = parse_tools({"tools": [WEATHER]})
    rendered, tools_arg = for_template(messages, tools, native=False)
    assert tools_arg is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in rendered[0]["content"] and "<tools>" in rendered[0]["content"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert rendered[2] == {"role": "assistant", "content": call}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n31 C\n</tool_response>"}
    alone, _ = for_template(clean_messages(TURNS[1:2]), tools, native=False)
    assert alone[0]["role"] == "system" and alone[0]["content"] == TOOLS_PROMPT.format(tools=json.dumps(
        tools.functions[0].to_json()))  # fmt: skip


def test_a_template_that_takes_tools_gets_them_as_they_are() -> None:
    tools = parse_tools({"tools": [WEATHER]})
    rendered, tools_arg = for_template(clean_messages(TURNS), tools, native=True)
    assert tools_arg == [{"type": "function", "function": tools.functions[0].to_json()}]
    assert rendered[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert rendered[3]["role"] == "tool" and rendered[3]["tool_call_id"] == "call_1"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],  # no tool_call_id
        [{"role": "assistant", "content": None}],  # neither content nor calls
        [{"role": "assistant", "content": None, "tool_calls": []}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        [],
    ],
    ids=repr,
)
def test_bad_turns_are_refused_with_a_message_that_says_why(messages: list[Any]) -> None:
    with pytest.raises(ToolError) as e:
        clean_messages(messages)
    assert e.value.param == "messages"


def test_auto_replies_are_calls_only_when_nothing_else() -> None:
    tools = parse_tools({"tools": [WEATHER]})
    assert tools is not None
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    calls = auto_calls(f"  {call}\n{call}", tools)
    assert calls is not None and [c.name for c in calls] == ["get_weather"] * 2
    assert json.loads(calls[0].arguments) == {"city": "Oslo"} and calls[0].id != calls[1].id
    for text in ("It is sunny.", f"Sure! {call}", call.replace("get_weather", "other"), "<tool_call>{", ""):
        assert auto_calls(text, tools) is None
    assert may_be_a_call("  <tool") and may_be_a_call("<tool_call>{") and not may_be_a_call("It")
    single = parse_tools({"tools": [WEATHER], "parallel_tool_calls": False})
    assert single is not None and len(auto_calls(f"{call}\n{call}", single) or []) == 1


def test_a_forced_grammar_admits_the_chosen_functions_calls_only() -> None:
    """Checked with llguidance itself over a byte-level vocabulary of single bytes."""
    tools = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
    named = parse_tools(
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert tools is not None and named is not None
    grammars = byte_grammars()
    good = '{"name":"get_weather","arguments":{"city":"Rome"}}'
    assert accepts(grammars, tools.grammar(), good) and accepts(
        grammars, tools.grammar(), '{"name":"get_time","arguments":{}}'
    )
    assert not accepts(grammars, named.grammar(), good)
    assert not accepts(grammars, tools.grammar(), '{"name":"get_weather","arguments":{}}')  # city is required
    assert forced_call(good, tools) is not None and forced_call(good[:-3], tools) is None
    assert not accepts(grammars, tools.grammar(), good.replace(",", ", "))  # compact: no whitespace between tokens


def accepts(grammars: tuple[Grammars, Any], grammar: str, text: str) -> bool:
    matcher = grammars[0].matcher(grammar)
    for token in grammars[1].encode(text):
        if not bool(matcher.allowed()[token]):
            return False
        matcher.consume([token])
    return matcher.done


def test_definitions_move_to_the_grammars_root_and_their_references_follow() -> None:
    """A pydantic model's nested types come as $defs and #/$defs/... references."""
    located = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}}, "required": ["where"],
               "$defs": {"Loc": {"type": "object", "properties": {"city": {"enum": ["Rome", "Oslo"]}},
                                 "required": ["city"], "additionalProperties": False}}}  # fmt: skip
    tool = {"type": "function", "function": {"name": "find", "parameters": located}}
    tools = parse_tools({"tools": [tool, WEATHER], "tool_choice": "required"})
    assert tools is not None
    grammars = byte_grammars()
    assert accepts(grammars, tools.grammar(), '{"name":"find","arguments":{"where":{"city":"Oslo"}}}')
    assert not accepts(grammars, tools.grammar(), '{"name":"find","arguments":{"where":{"city":"Bern"}}}')
