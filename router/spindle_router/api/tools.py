"""OpenAI tool calling on /v1/chat/completions: `tools` + `tool_choice` -> a grammar, and the model's
constrained output -> `message.tool_calls` (whole, or streamed as OpenAI streams them).

The grammar makes the model write exactly one compact JSON object

    {"name":"<tool>","arguments":{...valid against that tool's `parameters`...}}

with `name` one of the allowed tools (`required`: any; a named choice: that one). With `auto` (the default
when tools are given) one more choice, `no_tool`, lets the model answer in text: its `arguments.content`
becomes the message content. `none` ignores the tools. The chat template receives `tools`; a template that
does not use them gets them appended to the last message with the tool prompt, as TGI does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from spindle_router.errors import ApiError, SchemaError
from spindle_router.validation import Fields

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt. Respond in the format {\"name\": function name, \"arguments\": "
    "dictionary of argument name and its value}. Do not use variables."
)
_NO_TOOL_ARGS = {
    "type": "object",
    "properties": {"content": {"type": "string", "description": "The response content"}},
    "required": ["content"],
    "additionalProperties": False,
}


def _tool_error(message: str) -> ApiError:
    return ApiError(422, "tool_error", f"Tool error: {message}")


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request with active tools changes: the template's `tools`, the grammar, the answer's shape."""

    tools: list[dict[str, Any]]  # as given (OpenAI shape), for the chat template
    allowed: tuple[str, ...]  # names the model may call (NO_TOOL among them with `auto`)
    prompt: str
    schema: dict[str, Any] = field(compare=False)

    @property
    def grammar(self) -> dict[str, Any]:
        """The request grammar (TGI's `json` shape; validation checks and compiles it)."""
        return {"type": "json", "value": self.schema}


def _parse_tools(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, list):
        raise SchemaError("tools: invalid type, expected a sequence")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(raw):
        f = Fields(tool, f"tools[{i}]")
        kind = f.str("type") or "function"
        if kind != "function":
            raise SchemaError(f"tools[{i}].type: unknown variant `{kind}`, expected `function`")
        fn = Fields(f.required("function"), f"tools[{i}].function")
        name = fn.str("name", optional=False)
        assert name is not None
        params = fn.raw("parameters") if fn.raw("parameters") is not None else fn.raw("arguments")
        if params is not None and not isinstance(params, dict):
            raise SchemaError(f"tools[{i}].function.parameters: invalid type, expected a map")
        if name in functions:
            raise _tool_error(f"Tool with name {name} is given twice")
        if name == NO_TOOL:
            raise _tool_error(f"`{NO_TOOL}` is a reserved tool name")
        functions[name] = params if params is not None else {"type": "object"}
    return functions


def _chosen(choice: Any, functions: dict[str, dict[str, Any]]) -> tuple[str, ...] | None:
    """Names the model may call; None when tools are off (`none`)."""
    if choice is None or choice == "auto":
        return (*functions, NO_TOOL)
    if choice == "none":
        return None
    if choice == "required":
        return tuple(functions)
    if isinstance(choice, str):
        name = choice
    else:
        f = Fields(choice, "tool_choice")
        name = Fields(f.required("function"), "tool_choice.function").str("name", optional=False)
    if name not in functions:
        raise _tool_error(f"Tool with name {name} not found")
    return (name,)


def plan_tools(tools: Any, tool_choice: Any, tool_prompt: Any, response_format: Any) -> ToolPlan | None:
    """The tool plan of a chat request, or None when it uses no tools; 422 `tool_error` when inconsistent."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise _tool_error("tool_choice is set but no tools are given")
        return None
    functions = _parse_tools(tools)
    if not functions:
        return None
    allowed = _chosen(tool_choice, functions)
    if allowed is None:
        return None
    if response_format is not None:
        raise _tool_error("Grammar and tools are mutually exclusive")
    if tool_prompt is not None and not isinstance(tool_prompt, str):
        raise SchemaError("tool_prompt: invalid type, expected a string")
    options = []
    for name in allowed:
        args = _NO_TOOL_ARGS if name == NO_TOOL else functions[name]
        options.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": args},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolPlan(tools=list(tools), allowed=allowed, prompt=tool_prompt or DEFAULT_TOOL_PROMPT, schema=schema)


def with_tool_prompt(messages: list[dict[str, Any]], plan: ToolPlan, template_uses_tools: bool) -> list[dict[str, Any]]:
    """TGI's prompting: the tool prompt (and the tools themselves, when the template does not render them)
    appended to the last message's text."""
    if not messages:
        return messages
    extra = "\n---\n" + ("" if template_uses_tools else json.dumps(plan.tools) + "\n") + plan.prompt
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, list):
        last["content"] = [*content, {"type": "text", "text": extra}]
    else:
        last["content"] = (content or "") + extra
    return [*messages[:-1], last]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolAnswer:
    """The model's constrained output, read back: a call, or text (`no_tool`, or output cut by length)."""

    name: str | None
    arguments: str | None  # JSON text
    content: str | None


def read_answer(text: str) -> ToolAnswer:
    try:
        obj = json.loads(text)
        name, args = obj["name"], obj["arguments"]
    except (ValueError, KeyError, TypeError):  # cut short (finish_reason length): hand back what there is
        return ToolAnswer(None, None, text)
    if name == NO_TOOL:
        return ToolAnswer(None, None, args.get("content", "") if isinstance(args, dict) else "")
    return ToolAnswer(name, json.dumps(args, ensure_ascii=False), None)


def message_json(answer: ToolAnswer, call_id: str) -> dict[str, Any]:
    if answer.name is None:
        return {"role": "assistant", "content": answer.content}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": answer.name, "arguments": answer.arguments}}
        ],
    }


class ToolCallStream:
    """Turns the streamed text of a tool-call answer into OpenAI deltas.

    Text is held until `{"name":"<tool>","arguments":` is complete; then one delta names the call (id, name,
    arguments ""), and later deltas carry argument fragments that concatenate to the arguments (the final
    `}` closes the outer object and is not sent). A `no_tool` answer is sent as content when it ends.
    """

    _HEAD = '{"name":'
    _ARGS = ',"arguments":'

    def __init__(self) -> None:
        self.call_id = new_call_id()
        self.text = ""
        self.name: str | None = None
        self.sent = 0  # characters of `text` already sent as argument fragments

    def feed(self, piece: str, last: bool) -> dict[str, Any] | None:
        """The delta for one more piece of text (None: nothing to send yet)."""
        self.text += piece
        if self.name is None:
            at = self.text.find(self._ARGS)
            if at < 0 or not self.text.startswith(self._HEAD):
                return self._end_as_text() if last else None
            try:
                self.name = json.loads(self.text[len(self._HEAD):at])
            except ValueError:
                return self._end_as_text() if last else None
            self.sent = at + len(self._ARGS)
            if self.name == NO_TOOL:
                return None if not last else self._end_as_text()
            head = {"index": 0, "id": self.call_id, "type": "function",
                    "function": {"name": self.name, "arguments": ""}}
            fragment = self._fragment(last)
            if fragment:
                head["function"]["arguments"] = fragment
            return {"role": "assistant", "content": None, "tool_calls": [head]}
        if self.name == NO_TOOL:
            return self._end_as_text() if last else None
        fragment = self._fragment(last)
        if not fragment:
            return None
        return {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}

    def _fragment(self, last: bool) -> str:
        """Unsent argument text, holding back the final character (the outer `}`) until the end."""
        end = len(self.text) - 1
        if last:
            end = len(self.text) - 1 if self.text.endswith("}") and self._complete() else len(self.text)
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _complete(self) -> bool:
        try:
            json.loads(self.text)
        except ValueError:
            return False
        return True

    def _end_as_text(self) -> dict[str, Any]:
        return {"role": "assistant", "content": read_answer(self.text).content or ""}
