"""The route table, and the OpenAPI 3 document generated from it (served at /openapi.json)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from spindle_router.api.context import VERSION

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    protected: bool  # behind --api-key
    body: str | None = None  # request schema name
    streams: bool = False  # may answer text/event-stream


_SCHEMAS: dict[str, Any] = {
    "GenerateParameters": {
        "type": "object",
        "properties": {
            **{
                k: {"type": "integer", "nullable": True, "minimum": 0}
                for k in ("best_of", "max_new_tokens", "truncate", "seed", "top_n_tokens", "top_k")
            },
            **{
                k: {"type": "number", "nullable": True}
                for k in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p")
            },
            **{
                k: {"type": "boolean", "default": False}
                for k in ("do_sample", "watermark", "details", "decoder_input_details")
            },
            "return_full_text": {"type": "boolean", "nullable": True},
            "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "grammar": {"type": "object", "nullable": True},
            "adapter_id": {"type": "string", "nullable": True},
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
            "model": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object"}, "minItems": 1},
            "max_tokens": {"type": "integer", "nullable": True},
            "temperature": {"type": "number", "nullable": True},
            "top_p": {"type": "number", "nullable": True},
            "stop": {"type": "array", "items": {"type": "string"}, "nullable": True},
            "seed": {"type": "integer", "nullable": True},
            "logprobs": {"type": "boolean", "nullable": True},
            "top_logprobs": {"type": "integer", "nullable": True},
            "stream": {"type": "boolean", "default": False},
            "stream_options": {"type": "object", "nullable": True},
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "max_tokens": {"type": "integer", "nullable": True},
            "temperature": {"type": "number", "nullable": True},
            "stream": {"type": "boolean", "default": False},
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
