"""What every handler shares: the app state, JSON body reading and JSON error responses.

Errors are always JSON. TGI routes answer `{"error": msg, "error_type": type}`. OpenAI routes answer the
OpenAI shape `{"error": {"message", "type", "param", "code"}}` and keep TGI's top-level `error_type`, so both
the `openai` SDK (reads `error.message`) and TGI-aware clients (dispatch on `error_type`) understand them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from spindle_router.chat_template import ChatTemplate
from spindle_router.config import LimitsConfig, RouterConfig
from spindle_router.errors import ApiError
from spindle_router.infer import Infer
from spindle_router.metrics import Metrics
from spindle_router.tokenizer import RouterTokenizer

try:  # the installed distribution's version (the editable install may see the package as a namespace)
    VERSION = version("spindle-router")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    VERSION = "0.0.0"

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class AppState:
    config: RouterConfig
    limits: LimitsConfig  # max_input_tokens / max_total_tokens resolved
    infer: Infer
    tokenizer: RouterTokenizer
    chat_template: ChatTemplate | None
    metrics: Metrics
    model_id: str
    compute_type: str
    model_dtype: str | None = None  # as the shards report it (the resolved --dtype)
    model_device_type: str | None = None

    @property
    def system_fingerprint(self) -> str:
        return f"{VERSION}-native"


STATE: web.AppKey[AppState] = web.AppKey("spindle_state", AppState)


def state(request: web.Request) -> AppState:
    return request.app[STATE]


def error_body(path: str, status: int, error_type: str, message: str) -> dict[str, Any]:
    if path in OPENAI_PATHS:
        return {
            "error": {"message": message, "type": error_type, "param": None, "code": status},
            "error_type": error_type,
        }
    return {"error": message, "error_type": error_type}


def error_response(path: str, status: int, error_type: str, message: str) -> web.Response:
    return json_response(error_body(path, status, error_type, message), status=status)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(obj), status=status, headers=headers, content_type="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    """The body as JSON: 415 unless Content-Type is JSON, 413 over payload_limit, 400 when malformed."""
    ctype = request.content_type
    if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
        raise ApiError(
            415, "unsupported_media_type", "Expected request with `Content-Type: application/json`"
        )
    limit = state(request).limits.payload_limit
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"Request body is larger than the limit of {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(
            413, "payload_too_large", f"Request body is larger than the limit of {limit} bytes"
        ) from e
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, "invalid_json", f"Failed to parse the request body as JSON: {e}") from e
