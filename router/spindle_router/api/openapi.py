"""The route table, and the OpenAPI 3 document generated from it (served at /openapi.json)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from spindle_router.api.context import VERSION

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, kw_only=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    protected: bool = False  # behind --api-key
    body: str | None = None  # request schema name
    streams: bool = False  # may answer text/event-stream


def _nullable(kind: str, **kw: Any) -> dict[str, Any]:
    return {"type": kind, "nullable": True, **kw}


_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "nullable": True,
         "description": "stop sequences: a string or a list (at most --max-stop-sequences)"}
_STREAM_OPTIONS = {"type": "object", "nullable": True,
                   "properties": {"include_usage": {"type": "boolean", "nullable": True}},
                   "description": "include_usage: a last chunk with no choices carries the usage of all"}

# What chat and completions share (api/openai.py `_sampling_fields`, `_include_usage`, `n`).
_OPENAI_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "description": "not checked: the server serves one model"},
    "temperature": _nullable("number", minimum=0, description="0: greedy; absent or > 0: sampling"),
    "top_p": _nullable("number", exclusiveMinimum=True, minimum=0, exclusiveMaximum=True, maximum=1),
    "frequency_penalty": _nullable("number", minimum=-2, maximum=2,
                                   description="subtracted once per occurrence of a token in prompt + output"),
    "presence_penalty": _nullable("number", minimum=-2, maximum=2,
                                  description="subtracted once from every token present in prompt + output"),
    "repetition_penalty": _nullable("number", exclusiveMinimum=True, minimum=0, description="TGI's (extension)"),
    "logit_bias": {"type": "object", "nullable": True, "additionalProperties": {"type": "number", "minimum": -100,
                   "maximum": 100}, "description": "token id (as a string) -> bias added to its logit"},
    "seed": _nullable("integer", minimum=0, description="with n > 1, choice i uses seed + i"),
    "stop": _STOP,
    "n": _nullable("integer", minimum=1, description="choices to generate (at most --max-best-of)"),
    "stream": {"type": "boolean", "default": False},
    "stream_options": _STREAM_OPTIONS,
    "min_p": _nullable("number", minimum=0, maximum=1, description="vLLM: drop tokens below min_p x the best's "
                       "probability"),
    "min_tokens": _nullable("integer", minimum=0, description="vLLM: no EOS / stop before this many tokens"),
    "ignore_eos": _nullable("boolean", description="vLLM: generate past EOS (stop_token_ids still stop)"),
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "nullable": True,
                       "description": "vLLM: finish on any of these token ids"},
}

_SCHEMAS: dict[str, Any] = {
    "GenerateParameters": {
        "type": "object",
        "properties": {
            **{
                k: _nullable("integer", minimum=0)
                for k in ("best_of", "max_new_tokens", "truncate", "seed", "top_n_tokens", "top_k")
            },
            **{
                k: _nullable("number")
                for k in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p")
            },
            **{
                k: {"type": "boolean", "default": False}
                for k in ("do_sample", "watermark", "details", "decoder_input_details")
            },
            "return_full_text": _nullable("boolean"),
            "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "grammar": {"allOf": [{"$ref": "#/components/schemas/Grammar"}], "nullable": True},
            "adapter_id": _nullable("string", description="no adapters are loaded: any value is 422"),
        },
    },
    "Grammar": {
        "type": "object",
        "description": "Constrains the generated text (see the README). TGI's shapes; response_format also takes "
        "OpenAI's {type: json_schema, json_schema: {name, schema, strict}}, {type: json_object} and {type: text}.",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["json", "json_object", "json_schema", "regex", "lark", "text"]},
            "value": {"description": "json/json_object: a JSON Schema (object or JSON string); json_schema: "
                      "{name, schema}; regex: a regular expression the whole output matches; lark: a context-free "
                      "grammar in llguidance's Lark dialect"},
            "json_schema": {"type": "object", "description": "OpenAI's json_schema: {name, schema, strict}"},
        },
    },
    "Tool": {
        "type": "object",
        "required": ["function"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
                },
            },
        },
    },
    "GenerateRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/GenerateParameters"},
            "stream": {"type": "boolean", "default": False},
        },
    },
    "ChatRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
                "role": {"type": "string"},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
                            "nullable": True},
                "tool_calls": {"type": "array", "items": {"type": "object"}, "nullable": True}}},
                "minItems": 1},
            "max_tokens": _nullable("integer", minimum=0),
            "max_completion_tokens": _nullable("integer", minimum=0, description="used when max_tokens is absent"),
            **_OPENAI_SAMPLING,
            "logprobs": _nullable("boolean"),
            "top_logprobs": _nullable("integer", minimum=0, description="at most --max-top-n-tokens"),
            "response_format": {"allOf": [{"$ref": "#/components/schemas/Grammar"}], "nullable": True},
            "tools": {"type": "array", "items": {"$ref": "#/components/schemas/Tool"}, "nullable": True},
            "tool_choice": {
                "nullable": True,
                "oneOf": [
                    {"type": "string", "description": "auto | none | required | a tool's name"},
                    {"type": "object", "description": "{type: function, function: {name}}"},
                ],
            },
            "tool_prompt": _nullable("string", description="appended to the last message when tools are used"),
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                       "description": "one prompt or up to --max-client-batch-size"},
            "max_tokens": _nullable("integer", minimum=0),
            **_OPENAI_SAMPLING,
            "logprobs": _nullable("integer", minimum=0, description="alternatives per token in the logprobs object"),
            "echo": _nullable("boolean", description="the prompt starts the text (with logprobs: its tokens too)"),
            "suffix": _nullable("string", description="not supported: 422"),
        },
    },
    "ErrorResponse": {
        "type": "object",
        "required": ["error", "error_type"],
        "properties": {
            # OpenAI routes nest the message: {"error": {"message", "type", "param", "code"}, "error_type"}
            "error": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            "error_type": {"type": "string"},
        },
    },
}


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_') or 'root'}",
            "responses": {
                "200": {"description": "OK"},
                "4XX": {
                    "description": "Error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                },
            },
        }
        if r.streams:
            op["responses"]["200"]["content"] = {"application/json": {}, "text/event-stream": {}}
        if r.body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{r.body}"}}},
            }
        if r.protected:
            op["security"] = [{"bearer": []}, {}]
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", r.path)
        ]
        if not op["parameters"]:
            del op["parameters"]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Spindle", "version": VERSION, "description": "TGI- and OpenAI-compatible API"},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
