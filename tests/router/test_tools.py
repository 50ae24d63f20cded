"""Tool calling pieces without a model: the grammar a tool_choice builds, reading answers back, and the
OpenAI stream of a tool call (fragments that concatenate to the arguments)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from spindle_router.api import tools
from spindle_router.errors import ApiError
from spindle_router.grammar import GrammarChecker, parse_grammar

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
ECHO = {"type": "function", "function": {"name": "echo"}}


def schema_of(plan: tools.ToolPlan) -> dict:
    grammar = parse_grammar(plan.grammar)
    GrammarChecker().check(grammar)  # compiles
    return json.loads(grammar.value)


@pytest.mark.parametrize(
    "choice,allowed",
    [(None, ("add", "echo", tools.NO_TOOL)), ("auto", ("add", "echo", tools.NO_TOOL)), ("required", ("add", "echo")),
     ("echo", ("echo",)), ({"type": "function", "function": {"name": "add"}}, ("add",))],
)
def test_tool_choice_decides_the_allowed_calls(choice, allowed):
    plan = tools.plan_tools([ADD, ECHO], choice, None, None)
    assert plan is not None and plan.allowed == allowed
    schema = schema_of(plan)
    call = {"name": allowed[0], "arguments": {"a": 1, "b": 2} if allowed[0] == "add" else {"content": "x"}}
    jsonschema.validate(call, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "other", "arguments": {}}, schema)
    if "add" in allowed:
        with pytest.raises(jsonschema.ValidationError):  # arguments are held to the tool's parameters
            jsonschema.validate({"name": "add", "arguments": {"a": "1", "b": 2}}, schema)


def test_none_and_errors():
    assert tools.plan_tools([ADD], "none", None, None) is None
    assert tools.plan_tools(None, None, None, {"type": "json_object"}) is None
    with pytest.raises(ApiError, match="Tool with name nope not found"):
        tools.plan_tools([ADD], "nope", None, None)
    with pytest.raises(ApiError, match="mutually exclusive"):
        tools.plan_tools([ADD], "required", None, {"type": "json_object"})
    with pytest.raises(ApiError, match="given twice"):
        tools.plan_tools([ADD, ADD], None, None, None)


def test_tool_prompt_goes_to_the_last_message():
    plan = tools.plan_tools([ADD], "required", "Call a tool.", None)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    out = tools.with_tool_prompt(msgs, plan, template_uses_tools=False)
    assert out[0] == msgs[0] and msgs[1]["content"] == "u"  # the request is not mutated
    assert out[1]["content"].startswith("u\n---\n[") and out[1]["content"].endswith("Call a tool.")
    assert tools.with_tool_prompt(msgs, plan, template_uses_tools=True)[1]["content"] == "u\n---\nCall a tool."


def test_answers_read_back():
    call = tools.read_answer('{"name":"add","arguments":{"a":1,"b":2}}')
    assert (call.name, json.loads(call.arguments), call.content) == ("add", {"a": 1, "b": 2}, None)
    text = tools.read_answer('{"name":"no_tool","arguments":{"content":"hi"}}')
    assert (text.name, text.content) == (None, "hi")
    cut = tools.read_answer('{"name":"add","argu')
    assert (cut.name, cut.content) == (None, '{"name":"add","argu')
    msg = tools.message_json(call, "call_x")
    assert msg["tool_calls"][0] == {"id": "call_x", "type": "function",
                                    "function": {"name": "add", "arguments": call.arguments}}


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_stream_of_a_call(size):
    text = '{"name":"add","arguments":{"a":12,"b":{"c":[1,2]}}}'
    s = tools.ToolCallStream()
    parts = pieces(text, size)
    deltas = [s.feed(p, last=i == len(parts) - 1) for i, p in enumerate(parts)]
    sent = [d for d in deltas if d is not None]
    head = sent[0]["tool_calls"][0]
    assert head["id"] == s.call_id and head["function"]["name"] == "add"
    assert all("id" not in d["tool_calls"][0] for d in sent[1:])
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in sent)
    assert args == '{"a":12,"b":{"c":[1,2]}}'


def test_stream_of_text_and_of_a_cut_call():
    s = tools.ToolCallStream()
    text = '{"name":"no_tool","arguments":{"content":"hello"}}'
    deltas = [s.feed(c, last=i == len(text) - 1) for i, c in enumerate(text)]
    assert [d for d in deltas if d is not None] == [{"role": "assistant", "content": "hello"}]
    s = tools.ToolCallStream()
    text = '{"name":"add","arguments":{"a":1'
    deltas = [d for i, c in enumerate(text) if (d := s.feed(c, last=i == len(text) - 1)) is not None]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"a":1'
