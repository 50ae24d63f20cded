"""The aiohttp application: the route table, auth, CORS and the one place errors become JSON."""

from __future__ import annotations

import hmac
import logging
import uuid

from aiohttp import web

from spindle_router import telemetry
from spindle_router.api import docs, openai, routes
from spindle_router.api.context import STATE, AppState, error_response, json_response, read_json
from spindle_router.api.openapi import Route, openapi_document
from spindle_router.chat_template import ChatTemplate, TemplateError
from spindle_router.config import LimitsConfig, RouterConfig
from spindle_router.errors import ApiError, SchemaError
from spindle_router.infer import Infer
from spindle_router.logging import REQUEST_ID
from spindle_router.metrics import Metrics
from spindle_router.scheduler.backend import Backend
from spindle_router.tokenizer import RouterTokenizer
from spindle_router.validation import Validator

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def route_table() -> list[Route]:
    r, oa = routes, openai
    generate = {"tag": "TGI", "protected": True, "body": "GenerateRequest"}
    return [
        Route(method="POST", path="/", handler=r.compat_generate, streams=True, **generate,
              summary="Generate (TGI compat: JSON array, or SSE with stream)"),
        Route(method="POST", path="/generate", handler=r.generate, summary="Generate tokens", **generate),
        Route(method="POST", path="/generate_stream", handler=r.generate_stream, streams=True, **generate,
              summary="Generate a stream of tokens (SSE)"),
        Route(method="POST", path="/v1/chat/completions", handler=oa.chat_completions, tag="OpenAI",
              protected=True, body="ChatRequest", streams=True, summary="OpenAI chat completions"),
        Route(method="POST", path="/v1/completions", handler=oa.completions, tag="OpenAI", protected=True,
              body="CompletionRequest", streams=True, summary="OpenAI completions"),
        Route(method="POST", path="/invocations", handler=_invocations, streams=True, **generate,
              summary="SageMaker: generate, chat or completions by body shape"),
        Route(method="POST", path="/tokenize", handler=r.tokenize, summary="Tokenize inputs", **generate),
        Route(method="POST", path="/chat_tokenize", handler=oa.chat_tokenize, tag="TGI", protected=True,
              body="ChatRequest", summary="Apply the chat template and tokenize"),
        Route(method="GET", path="/", handler=r.health, tag="TGI", summary="Health check"),
        Route(method="GET", path="/health", handler=r.health, tag="TGI", summary="Health check"),
        Route(method="GET", path="/ping", handler=r.health, tag="TGI", summary="Health check (SageMaker)"),
        Route(method="GET", path="/info", handler=r.info, tag="TGI", summary="Server information"),
        Route(method="GET", path="/metrics", handler=r.metrics, tag="TGI", summary="Prometheus metrics"),
        Route(method="GET", path="/v1/models", handler=r.models, tag="OpenAI", summary="OpenAI model list"),
        Route(method="GET", path="/openapi.json", handler=_openapi, tag="TGI", summary="This OpenAPI document"),
        Route(method="GET", path="/api-doc/openapi.json", handler=_openapi, tag="TGI",
              summary="This OpenAPI document (TGI's path)"),
        Route(method="GET", path="/docs", handler=docs.docs_page, tag="TGI",
              summary="Interactive documentation of this API (Swagger UI, served offline)"),
        Route(method="GET", path="/docs/{name}", handler=docs.docs_asset, tag="TGI",
              summary="A Swagger UI asset of /docs (served by the router itself, no CDN)"),
    ]


async def _invocations(request: web.Request) -> web.StreamResponse:
    """SageMaker: dispatch by body shape, as TGI does (compat generate, then chat, then completions)."""
    body = await read_json(request)  # aiohttp keeps the body: the handler reads it again
    if isinstance(body, dict) and "inputs" in body:
        return await routes.compat_generate(request)
    if isinstance(body, dict) and "messages" in body:
        return await openai.chat_completions(request)
    if isinstance(body, dict) and "prompt" in body:
        return await openai.completions(request)
    raise SchemaError("body: expected a generate (inputs), chat (messages) or completions (prompt) request")


async def _openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(route_table()))


def _auth_middleware(api_key: str | None, protected: set[tuple[str, str]]):
    expected = f"Bearer {api_key}".lower().encode() if api_key else None

    @web.middleware
    async def auth(request: web.Request, handler):
        if expected is not None and (request.method, request.path) in protected:
            given = request.headers.get("Authorization", "").lower().encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):  # constant time: the key does not leak by timing
                return error_response(request.path, 401, "unauthorized", "Unauthorized")
        return await handler(request)

    return auth


def _cors_middleware(origins: tuple[str, ...]):
    @web.middleware
    async def cors(request: web.Request, handler):
        origin = request.headers.get("Origin")
        allowed = origin is not None and (not origins or origin in origins)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            resp: web.StreamResponse = web.Response(status=200 if allowed else 403)
            if allowed:
                resp.headers["Access-Control-Allow-Methods"] = "GET, POST"
                resp.headers["Access-Control-Allow-Headers"] = "content-type, authorization"
        else:
            resp = await handler(request)
        if allowed and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = "*" if not origins else origin
        return resp

    return cors


_REQUEST_ID = web.RequestKey("spindle_request_id", str)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to a request with an id (JSON or SSE) carries it."""
    if _REQUEST_ID in request:
        response.headers["x-request-id"] = request[_REQUEST_ID]


@web.middleware
async def _request_context(request: web.Request, handler):
    """A request id on every log line of a generation request (the client's `x-request-id`, else a new
    one, echoed in the response), and its trace span: child of the client's `traceparent`."""
    if request.method != "POST":  # probes and scrapes: no log lines, no spans
        return await handler(request)
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    request[_REQUEST_ID] = request_id
    token = REQUEST_ID.set(request_id)
    try:
        with telemetry.server_span(
            f"{request.method} {request.path}", request.headers, **{"http.method": request.method,
                                                                     "http.route": request.path}
        ) as span:
            resp = await handler(request)
            if span is not None:
                span.set_attribute("http.status_code", resp.status)
            return resp
    finally:
        REQUEST_ID.reset(token)


@web.middleware
async def _errors(request: web.Request, handler):
    path = request.path
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(path, e.status, e.error_type, e.message)
    except TemplateError as e:
        return error_response(path, 422, "template_error", f"Template error: {e}")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(path, e.status, _STATUS_TYPES.get(e.status, "http_error"), e.reason)
    except ConnectionError:
        raise  # the client is gone; nothing to answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, path)
        return error_response(path, 500, "internal", "Internal server error")


def build_app(
    *,
    config: RouterConfig,
    limits: LimitsConfig,
    backend: Backend,
    tokenizer: RouterTokenizer,
    chat_template: ChatTemplate | None,
    metrics: Metrics,
    model_id: str,
    compute_type: str = "gpu+optimized",
    model_dtype: str | None = None,
    model_device_type: str | None = None,
) -> web.Application:
    """The HTTP API over `backend`. `limits` must have max_input_tokens/max_total_tokens resolved
    (after warmup). `compute_type` is the x-compute-type header (TGI: env COMPUTE_TYPE); `model_dtype`
    and `model_device_type` are what the shards report, for /info."""
    infer = Infer(backend, Validator(limits, tokenizer), metrics, limits)
    table = route_table()
    protected = {(r.method, r.path) for r in table if r.protected}
    app = web.Application(
        client_max_size=limits.payload_limit,
        middlewares=[
            _cors_middleware(config.http.cors_allow_origin),
            _request_context,
            _errors,
            _auth_middleware(config.http.api_key, protected),
        ],
    )
    app.on_response_prepare.append(_echo_request_id)
    app[STATE] = AppState(
        config=config,
        limits=limits,
        infer=infer,
        tokenizer=tokenizer,
        chat_template=chat_template,
        metrics=metrics,
        model_id=model_id,
        compute_type=compute_type,
        model_dtype=model_dtype,
        model_device_type=model_device_type,
    )
    for r in table:
        app.router.add_route(r.method, r.path, r.handler)
    return app
