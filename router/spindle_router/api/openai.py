"""OpenAI-compatible routes as TGI serves them: /v1/chat/completions, /v1/completions, /chat_tokenize.

TGI's mapping kept: temperature exactly 0 -> greedy, anything else or absent -> sampling; presence_penalty
-> repetition_penalty = presence_penalty + 2; `id` is ""; `eos_token` becomes `stop` except in streamed
completions; streams end with `data: [DONE]`; errors inside a stream are
`{"error": {"message", "type", "http_status_code"}}` events (TGI always says 422; we give the real status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from spindle_router.api import schemas
from spindle_router.api.context import AppState, json_response, read_json, state
from spindle_router.api.streaming import DONE_FRAME, open_accepted_sse, pump, sse_frame
from spindle_router.chat_template import TemplateError
from spindle_router.infer import InferError, StreamItem, Timings
from spindle_router.validation import Fields, GenerateParameters, SchemaError

_MISSING = object()


def _finish_reason(reason: str) -> str:
    return "stop" if reason == "eos_token" else reason


def _stream_error(e: InferError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.error_type, "http_status_code": e.status}}


def _sampling_fields(f: Fields, max_tokens: int | None) -> GenerateParameters:
    temperature = f.float("temperature")
    presence = f.float("presence_penalty")
    greedy = temperature == 0.0
    stop = f.str_list("stop", null_ok=True)
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=f.float("top_p"),
        frequency_penalty=f.float("frequency_penalty"),
        repetition_penalty=presence + 2.0 if presence is not None else f.float("repetition_penalty"),
        max_new_tokens=max_tokens,
        stop=tuple(stop or ()),
        seed=f.int("seed", hi=2**64 - 1),
        details=True,
    )


# --------------------------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    params: GenerateParameters
    logprobs: bool
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None


def _parse_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise SchemaError("messages: invalid type, expected a sequence")
    if not raw:
        raise SchemaError("messages: must hold at least one message")
    for i, m in enumerate(raw):
        f = Fields(m, f"messages[{i}]")
        f.str("role", optional=False)
        content = f.raw("content")
        if content is None:
            if f.raw("tool_calls") is None:
                raise SchemaError(
                    f"messages[{i}]: data did not match any variant of untagged enum MessageBody"
                )
        elif isinstance(content, list):
            for j, chunk in enumerate(content):
                c = Fields(chunk, f"messages[{i}].content[{j}]")
                kind = c.str("type", optional=False)
                if kind == "text":
                    c.str("text", optional=False)
                elif kind == "image_url":
                    Fields(c.required("image_url"), f"messages[{i}].content[{j}].image_url").str(
                        "url", optional=False
                    )
                else:
                    raise SchemaError(f"messages[{i}].content[{j}].type: unknown variant `{kind}`")
        elif not isinstance(content, str):
            raise SchemaError(f"messages[{i}].content: invalid type, expected a string or a sequence")
    return raw


def parse_chat_request(body: Any) -> ChatRequest:
    f = Fields(body)
    messages = _parse_messages(f.required("messages"))
    max_tokens = f.int("max_tokens")
    if max_tokens is None:
        max_tokens = f.int("max_completion_tokens")
    params = _sampling_fields(f, max_tokens)
    logprobs = bool(f.bool("logprobs", None))
    top_logprobs = f.int("top_logprobs")
    grammar = f.raw("response_format")
    params = replace(params, top_n_tokens=top_logprobs if logprobs else None, grammar=grammar)
    options = f.raw("stream_options")
    include_usage = bool(
        options is not None and Fields(options, "stream_options").bool("include_usage", None)
    )
    tools = f.raw("tools")
    if tools is not None and not isinstance(tools, list):
        raise SchemaError("tools: invalid type, expected a sequence")
    tool_choice = f.raw("tool_choice")
    if tools and tool_choice != "none":
        if grammar is not None:
            raise InferError(422, "tool_error", "Tool error: Grammar and tools are mutually exclusive")
        # Tool calls need grammar-constrained decoding, which the shard contract does not carry.
        raise InferError(422, "tool_error", "Tool error: tool calling is not supported by this server")
    return ChatRequest(
        messages=messages,
        params=params,
        logprobs=logprobs,
        stream=bool(f.bool("stream", False)),
        include_usage=include_usage,
        tools=None,
    )


def _render(st: AppState, chat: ChatRequest) -> str:
    if st.chat_template is None:
        raise InferError(422, "template_error", "Template error: the model has no chat template")
    try:
        return st.chat_template.render(chat.messages, tools=chat.tools)
    except TemplateError as e:
        st.metrics.request_count.inc()
        st.metrics.request_failure.labels(err="template").inc()
        raise InferError(422, "template_error", f"Template error: {e}", "template") from e


def _logprobs_json(tokens: list, top_tokens: list[list]) -> dict[str, Any]:
    content = []
    for i, t in enumerate(tokens):
        top = top_tokens[i] if i < len(top_tokens) else []
        content.append(
            {
                "token": t.text,
                "logprob": schemas._logprob(t.logprob),
                "top_logprobs": [{"token": a.text, "logprob": schemas._logprob(a.logprob)} for a in top],
            }
        )
    return {"content": content}


def _base(st: AppState, obj: str) -> dict[str, Any]:
    return {
        "object": obj,
        "id": "",
        "created": int(time.time()),
        "model": st.model_id,
        "system_fingerprint": st.system_fingerprint,
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    chat = parse_chat_request(await read_json(request))
    prompt = _render(st, chat)
    if chat.stream:
        return await _chat_stream(request, st, chat, prompt)
    gen = await st.infer.generate(prompt, chat.params, add_special_tokens=False)
    r = gen.best
    prompt_tokens, completion_tokens = r.valid.input_length, r.end.generated_tokens
    body = {
        **_base(st, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.generated_text},
                "logprobs": _logprobs_json(r.tokens, r.top_tokens) if chat.logprobs else None,
                "finish_reason": _finish_reason(r.end.finish_reason),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return json_response(body, headers=schemas.result_headers(r, st.compute_type))


async def _chat_stream(
    request: web.Request, st: AppState, chat: ChatRequest, prompt: str
) -> web.StreamResponse:
    items = st.infer.generate_stream(prompt, chat.params, add_special_tokens=False)
    resp = await open_accepted_sse(request, schemas.stream_headers(st.compute_type, len(prompt)), [items])
    usage: dict[str, int] = {}

    def encode(item: StreamItem) -> dict[str, Any]:
        finish = None
        if item.end is not None:
            finish = _finish_reason(item.end.finish_reason)
            n_in, n_out = item.valid.input_length, item.end.generated_tokens
            usage.update(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)
        return {
            **_base(st, "chat.completion.chunk"),
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "" if item.token.special else item.token.text},
                    "logprobs": _logprobs_json([item.token], [item.top_tokens]) if chat.logprobs else None,
                    "finish_reason": finish,
                }
            ],
            "usage": None,
        }

    if not await pump(resp, items, encode, _stream_error):
        return resp
    try:
        if chat.include_usage and usage:
            await resp.write(sse_frame({**_base(st, "chat.completion.chunk"), "choices": [], "usage": usage}))
        await resp.write(DONE_FRAME)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


async def chat_tokenize(request: web.Request) -> web.Response:
    st = state(request)
    chat = parse_chat_request(await read_json(request))
    st.metrics.request_count.inc()
    prompt = _render(st, chat)
    spans = await st.tokenizer.encode_spans(prompt, add_special_tokens=False)
    return json_response(
        {
            "tokenize_response": [
                {"id": s.id, "text": s.text, "start": s.start, "stop": s.stop} for s in spans
            ],
            "templated_text": prompt,
        }
    )


# --------------------------------------------------------------------------------------- completions


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    params: GenerateParameters
    stream: bool


def parse_completion_request(body: Any, max_client_batch_size: int) -> CompletionRequest:
    f = Fields(body)
    prompt = f.required("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SchemaError("prompt: expected a string or a non-empty sequence of strings")
    params = _sampling_fields(f, f.int("max_tokens"))
    stream = bool(f.bool("stream", False))
    if f.raw("suffix") is not None:
        raise InferError(
            422,
            "suffix not supported",
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        )
    if len(prompts) > max_client_batch_size:
        raise InferError(
            422,
            "batch size exceeded",
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}",
        )
    return CompletionRequest(prompts=prompts, params=params, stream=stream)


async def completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    req = parse_completion_request(await read_json(request), st.limits.max_client_batch_size)
    if req.stream:
        return await _completions_stream(request, st, req)

    async def one(i: int, prompt: str) -> tuple[int, Any]:
        return i, await st.infer.generate(prompt, req.params)

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(req.prompts)]
    choices, results = [], []
    try:
        for next_done in asyncio.as_completed(tasks):  # completion order, as TGI
            i, gen = await next_done
            r = gen.best
            results.append(r)
            choices.append(
                {
                    "index": i,
                    "text": r.generated_text,
                    "logprobs": None,
                    "finish_reason": _finish_reason(r.end.finish_reason),
                }
            )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    n_in = sum(r.valid.input_length for r in results)
    n_out = sum(r.end.generated_tokens for r in results)
    body = {
        **_base(st, "text_completion"),
        "choices": choices,
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
    }
    total = Timings(*(sum(getattr(r.timings, k) for r in results) for k in Timings.__dataclass_fields__))
    headers = schemas.timing_headers(total, n_in, n_out, st.compute_type, sum(len(p) for p in req.prompts))
    del headers["x-compute-time"]  # TGI sums the per-prompt headers and omits this one
    return json_response(body, headers=headers)


async def _merge(streams: list[AsyncIterator[StreamItem]]) -> AsyncIterator[tuple[int, StreamItem]]:
    """Items of all streams as they come, tagged with their stream's index; the first error ends all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(i: int, s: AsyncIterator[StreamItem]) -> None:
        try:
            async for item in s:
                await queue.put((i, item))
        except BaseException as e:  # delivered to the consumer, which stops everything
            await queue.put((i, e))
        finally:
            await s.aclose()  # a stream parked at a yield is cancelled here
            await queue.put((i, _MISSING))

    tasks = [asyncio.ensure_future(drain(i, s)) for i, s in enumerate(streams)]
    live = len(tasks)
    try:
        while live:
            i, item = await queue.get()
            if item is _MISSING:
                live -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    continue
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _completions_stream(
    request: web.Request, st: AppState, req: CompletionRequest
) -> web.StreamResponse:
    streams = [st.infer.generate_stream(p, req.params) for p in req.prompts]
    headers = schemas.stream_headers(st.compute_type, sum(len(p) for p in req.prompts))
    resp = await open_accepted_sse(request, headers, streams)

    def encode(tagged: tuple[int, StreamItem]) -> dict[str, Any]:
        i, item = tagged
        text = "" if item.token.special else item.token.text
        if item.end is None:
            return {
                "object": "text_completion",
                "id": "",
                "created": int(time.time()),
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": ""}],
                "model": st.model_id,
                "system_fingerprint": st.system_fingerprint,
            }
        n_in, n_out = item.valid.input_length, item.end.generated_tokens
        return {
            **_base(st, "text_completion"),
            # Quirk kept from TGI: streamed completions do not rename eos_token to stop.
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": item.end.finish_reason}
            ],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    if not await pump(resp, _merge(streams), encode, _stream_error):
        return resp
    try:
        await resp.write(DONE_FRAME)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp
