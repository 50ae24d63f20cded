"""TGI's native routes: thin handlers over `Infer` (body -> parameters -> result -> JSON or SSE)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from spindle_router.api import schemas
from spindle_router.api.context import VERSION, json_response, read_json, state
from spindle_router.api.streaming import open_accepted_sse, pump
from spindle_router.errors import ApiError, ValidationError
from spindle_router.infer import StreamItem
from spindle_router.validation import GenerateRequest, parse_generate_request


async def _answer(request: web.Request, req: GenerateRequest, *, as_list: bool) -> web.Response:
    st = state(request)
    gen = await st.infer.generate(req.inputs, req.parameters, default_return_full_text=as_list)
    body = schemas.generate_response(gen)
    return json_response(
        [body] if as_list else body, headers=schemas.result_headers(gen.best, st.compute_type)
    )


async def _stream(request: web.Request, req: GenerateRequest, *, compat: bool) -> web.StreamResponse:
    st = state(request)
    details = req.parameters.details
    items = st.infer.generate_stream(req.inputs, req.parameters, default_return_full_text=compat)
    resp = await open_accepted_sse(request, schemas.stream_headers(st.compute_type, len(req.inputs)), [items])

    def encode(item: StreamItem) -> dict:
        return schemas.stream_event(item, details)

    def on_error(e: ApiError) -> dict:
        return {"error": e.message, "error_type": e.error_type}

    if await pump(resp, items, encode, on_error):
        await resp.write_eof()
    return resp


async def generate(request: web.Request) -> web.Response:
    req = parse_generate_request(await read_json(request))
    return await _answer(request, req, as_list=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    req = parse_generate_request(await read_json(request))
    return await _stream(request, req, compat=False)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: a one-element JSON array, or the /generate_stream SSE with `"stream": true`.
    return_full_text defaults to true here (TGI, for models without a Hub pipeline tag)."""
    req = parse_generate_request(await read_json(request))
    if req.stream:
        return await _stream(request, req, compat=True)
    return await _answer(request, req, as_list=True)


async def tokenize(request: web.Request) -> web.Response:
    req = parse_generate_request(await read_json(request))
    try:
        spans = await state(request).tokenizer.encode_spans(req.inputs, add_special_tokens=True)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise ValidationError(f"tokenizer error {e}") from e
    return json_response([{"id": s.id, "text": s.text, "start": s.start, "stop": s.stop} for s in spans])


async def health(request: web.Request) -> web.Response:
    try:
        healthy = await state(request).infer.backend.health_check()
    except Exception:
        healthy = False
    if healthy:
        return web.Response(status=200)
    return json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)


async def info(request: web.Request) -> web.Response:
    st = state(request)
    lim = st.limits
    return json_response(
        {
            "model_id": st.model_id,
            "model_sha": None,
            "model_dtype": st.model_dtype,
            "model_device_type": st.model_device_type,
            "model_pipeline_tag": None,
            "max_concurrent_requests": lim.max_concurrent_requests,
            "max_best_of": lim.max_best_of,
            "max_stop_sequences": lim.max_stop_sequences,
            "max_input_tokens": lim.max_input_tokens,
            "max_total_tokens": lim.max_total_tokens,
            "validation_workers": lim.validation_workers,
            "max_client_batch_size": lim.max_client_batch_size,
            "router": "spindle-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    body = state(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.Response:
    model_id = state(request).model_id
    return json_response(
        {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}
    )
