"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /chat_tokenize.

TGI's mapping kept: temperature exactly 0 -> greedy, anything else or absent -> sampling; `id` is "";
`eos_token` becomes `stop` except in streamed completions; streams end with `data: [DONE]`; errors inside a
stream are `{"error": {"message", "type", "http_status_code"}}` events (TGI always says 422; we give the real
status). Beyond TGI, nothing OpenAI defines is ignored: `n` fans out (one generation per choice, like
best_of; the scheduler prefills the shared prompt once and the copies take it from the prefix cache),
presence_penalty is OpenAI's additive penalty, `logit_bias` is `{token_id: bias}`, `stop` a string or a
list, completions `logprobs`/`echo`/`stream_options`; and vLLM's `min_p`, `min_tokens`, `ignore_eos`,
`stop_token_ids`. `model` is not checked (clients always send one; there is one model).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from spindle_router.api import schemas, tools
from spindle_router.api.context import AppState, json_response, read_json, state
from spindle_router.api.streaming import DONE_FRAME, open_accepted_sse, pump, sse_frame
from spindle_router.chat_template import TemplateError
from spindle_router.errors import ApiError, SchemaError, ValidationError
from spindle_router.infer import GenerationResult, StreamItem, Timings
from spindle_router.scheduler.request import Token
from spindle_router.validation import Fields, GenerateParameters

_MISSING = object()


def _finish_reason(reason: str) -> str:
    return "stop" if reason == "eos_token" else reason


def _stream_error(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.error_type, "http_status_code": e.status}}


def _stop(f: Fields) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of strings."""
    if isinstance(f.raw("stop"), str):
        return (f.raw("stop"),)
    return tuple(f.str_list("stop", null_ok=True) or ())


def _logit_bias(f: Fields) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"<token id>": bias}` map, as (id, bias) pairs (ranges are checked in validation)."""
    raw = f.raw("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise SchemaError("logit_bias: invalid type, expected a map from token id to bias")
    out = []
    for key, bias in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise SchemaError(f"logit_bias: key `{key}` is not a token id") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise SchemaError(f"logit_bias.{key}: invalid type, expected a number")
        out.append((token_id, float(bias)))
    return tuple(sorted(out))


def _token_ids(f: Fields, key: str) -> tuple[int, ...]:
    raw = f.raw(key)
    if raw is None:
        return ()
    if not isinstance(raw, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in raw):
        raise SchemaError(f"{key}: invalid type, expected a sequence of token ids")
    return tuple(raw)


def _sampling_fields(f: Fields, max_tokens: int | None) -> GenerateParameters:
    """What chat and completions share: sampling, penalties, stopping."""
    temperature = f.float("temperature")
    greedy = temperature == 0.0
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=f.float("top_p"),
        frequency_penalty=f.float("frequency_penalty"),
        presence_penalty=f.float("presence_penalty"),
        repetition_penalty=f.float("repetition_penalty"),  # TGI's, an extension here
        max_new_tokens=max_tokens,
        stop=_stop(f),
        seed=f.int("seed", hi=2**64 - 1),
        details=True,
        min_p=f.float("min_p"),
        logit_bias=_logit_bias(f),
        min_tokens=f.int("min_tokens"),
        ignore_eos=bool(f.bool("ignore_eos", None)),
        stop_token_ids=_token_ids(f, "stop_token_ids"),
    )


def _include_usage(f: Fields) -> bool:
    options = f.raw("stream_options")
    return bool(options is not None and Fields(options, "stream_options").bool("include_usage", None))


def _check_n(n: int, st: AppState) -> None:
    limit = st.limits.max_best_of
    if not 1 <= n <= limit:
        raise ValidationError(f"`n` must be > 0 and <= {limit}. Given: {n}")


def _check_alternatives(name: str, value: int | None, st: AppState) -> None:
    """top_logprobs / logprobs in OpenAI's own words (they become top_n_tokens)."""
    limit = st.limits.max_top_n_tokens
    if value is not None and value > limit:
        raise ValidationError(f"`{name}` must be >= 0 and <= {limit}. Given: {value}")


def _copies(params: GenerateParameters, n: int) -> list[GenerateParameters]:
    """One parameter set per choice. A given seed becomes seed, seed+1, ...: choices differ, reproducibly."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % 2**64) for i in range(n)]


async def _generate_all(
    st: AppState, jobs: list[tuple[str, GenerateParameters]], **kw: Any
) -> list[tuple[int, GenerationResult]]:
    """Run every (prompt, params) job concurrently; (job index, result) in completion order (as TGI). The
    first failure cancels the rest."""

    async def one(i: int, prompt: str, params: GenerateParameters) -> tuple[int, GenerationResult]:
        return i, (await st.infer.generate(prompt, params, **kw)).best

    tasks = [asyncio.ensure_future(one(i, p, params)) for i, (p, params) in enumerate(jobs)]
    out = []
    try:
        for next_done in asyncio.as_completed(tasks):
            out.append(await next_done)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _base(st: AppState, obj: str) -> dict[str, Any]:
    return {
        "object": obj,
        "id": "",
        "created": int(time.time()),
        "model": st.model_id,
        "system_fingerprint": st.system_fingerprint,
    }


# --------------------------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    params: GenerateParameters
    logprobs: bool
    stream: bool
    include_usage: bool
    tools: tools.ToolPlan | None  # None: no tool calling (none given, or tool_choice "none")
    n: int = 1


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
    if top_logprobs and not logprobs:
        raise ValidationError("`top_logprobs` requires `logprobs` to be true")
    grammar = f.raw("response_format")
    params = replace(params, top_n_tokens=top_logprobs if logprobs else None, grammar=grammar)
    plan = tools.plan_tools(f.raw("tools"), f.raw("tool_choice"), f.raw("tool_prompt"), grammar)
    if plan is not None:
        params = replace(params, grammar=plan.grammar)
    n = f.int("n")
    return ChatRequest(
        messages=messages,
        params=params,
        logprobs=logprobs,
        stream=bool(f.bool("stream", False)),
        include_usage=_include_usage(f),
        tools=plan,
        n=1 if n is None else n,
    )


def _render(st: AppState, chat: ChatRequest) -> str:
    if st.chat_template is None:
        raise ApiError(422, "template_error", "Template error: the model has no chat template")
    messages, tool_list = chat.messages, None
    if chat.tools is not None:
        tool_list = chat.tools.tools
        messages = tools.with_tool_prompt(messages, chat.tools, st.chat_template.uses_tools)
    try:
        return st.chat_template.render(messages, tools=tool_list)
    except TemplateError as e:
        st.metrics.request_count.inc()
        st.metrics.request_failure.labels(err="template").inc()
        raise ApiError(422, "template_error", f"Template error: {e}", "template") from e


def _logprobs_json(tokens: list[Token], top_tokens: list[list[Token]]) -> dict[str, Any]:
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    chat = parse_chat_request(await read_json(request))
    _check_n(chat.n, st)
    _check_alternatives("top_logprobs", chat.params.top_n_tokens, st)
    prompt = _render(st, chat)
    if chat.stream:
        return await _chat_stream(request, st, chat, prompt)
    jobs = [(prompt, p) for p in _copies(chat.params, chat.n)]
    results = sorted(await _generate_all(st, jobs, add_special_tokens=False), key=lambda x: x[0])
    choices = []
    for i, r in results:
        message: dict[str, Any] = {"role": "assistant", "content": r.generated_text}
        finish = _finish_reason(r.end.finish_reason)
        if chat.tools is not None:
            answer = tools.read_answer(r.generated_text)
            message = tools.message_json(answer, tools.new_call_id())
            if answer.name is not None:
                finish = "tool_calls"
        choices.append({
            "index": i,
            "message": message,
            "logprobs": _logprobs_json(r.tokens, r.top_tokens) if chat.logprobs else None,
            "finish_reason": finish,
        })
    first = results[0][1]
    prompt_tokens = first.valid.input_length  # one prompt, however many choices
    body = {
        **_base(st, "chat.completion"),
        "choices": choices,
        "usage": _usage(prompt_tokens, sum(r.end.generated_tokens for _, r in results)),
    }
    return json_response(body, headers=schemas.result_headers(first, st.compute_type))


async def _chat_stream(
    request: web.Request, st: AppState, chat: ChatRequest, prompt: str
) -> web.StreamResponse:
    streams = [st.infer.generate_stream(prompt, p, add_special_tokens=False) for p in _copies(chat.params, chat.n)]
    resp = await open_accepted_sse(request, schemas.stream_headers(st.compute_type, len(prompt)), streams)
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    calls = {i: tools.ToolCallStream() for i in range(chat.n)} if chat.tools is not None else None

    def encode(tagged: tuple[int, StreamItem]) -> dict[str, Any] | None:
        i, item = tagged
        finish = None
        text = "" if item.token.special else item.token.text
        delta: dict[str, Any] | None = {"role": "assistant", "content": text}
        if calls is not None:
            delta = calls[i].feed(text, last=item.end is not None)
        if item.end is not None:
            finish = _finish_reason(item.end.finish_reason)
            if calls is not None and calls[i].name not in (None, tools.NO_TOOL) and finish != "length":
                finish = "tool_calls"
            prompt_tokens[:] = [item.valid.input_length]
            completion_tokens.append(item.end.generated_tokens)
        elif delta is None:
            return None  # held back until the tool call's name is known
        return {
            **_base(st, "chat.completion.chunk"),
            "choices": [
                {
                    "index": i,
                    "delta": delta if delta is not None else {},
                    "logprobs": _logprobs_json([item.token], [item.top_tokens]) if chat.logprobs else None,
                    "finish_reason": finish,
                }
            ],
            "usage": None,
        }

    if not await pump(resp, _merge(streams), encode, _stream_error):
        return resp
    try:
        if chat.include_usage and prompt_tokens:
            usage = _usage(prompt_tokens[0], sum(completion_tokens))
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
    n: int = 1
    logprobs: int | None = None  # alternatives per token in the legacy logprobs object; None: no logprobs
    echo: bool = False
    include_usage: bool = False


def parse_completion_request(body: Any, max_client_batch_size: int) -> CompletionRequest:
    f = Fields(body)
    prompt = f.required("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SchemaError("prompt: expected a string or a non-empty sequence of strings")
    params = _sampling_fields(f, f.int("max_tokens"))
    stream = bool(f.bool("stream", False))
    logprobs = f.int("logprobs")
    echo = bool(f.bool("echo", None))
    if f.raw("suffix") is not None:
        raise ApiError(
            422,
            "suffix not supported",
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        )
    if len(prompts) > max_client_batch_size:
        raise ApiError(
            422,
            "batch size exceeded",
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}",
        )
    if logprobs is not None:
        # echo with logprobs reports the prompt's tokens too: their logprobs come from the prefill.
        params = replace(params, top_n_tokens=logprobs, decoder_input_details=echo)
    n = f.int("n")
    return CompletionRequest(prompts=prompts, params=params, stream=stream, n=1 if n is None else n,
                             logprobs=logprobs, echo=echo, include_usage=_include_usage(f))


def _completion_logprobs(
    tokens: list[Token], top_tokens: list[list[Token]], text_offset: int
) -> dict[str, Any]:
    """The legacy completions logprobs object; `text_offset` is where the first token's text starts."""
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [schemas._logprob(t.logprob) for t in tokens],
        "top_logprobs": [
            {a.text: schemas._logprob(a.logprob) for a in (top_tokens[i] if i < len(top_tokens) else [])}
            for i in range(len(tokens))
        ],
        "text_offset": offsets,
    }


def _completion_choice(req: CompletionRequest, index: int, prompt: str, r: GenerationResult) -> dict[str, Any]:
    logprobs = None
    if req.logprobs is not None:
        tokens, top = list(r.tokens), list(r.top_tokens) or [[] for _ in r.tokens]
        if req.echo:  # the prompt's own tokens first (no alternatives: the prefill reports none)
            tokens, top = list(r.prefill) + tokens, [[] for _ in r.prefill] + top
        logprobs = _completion_logprobs(tokens, top, 0 if req.echo else len(prompt))
    return {
        "index": index,
        "text": (prompt if req.echo else "") + r.generated_text,
        "logprobs": logprobs,
        "finish_reason": _finish_reason(r.end.finish_reason),
    }


def _completion_jobs(req: CompletionRequest) -> list[tuple[str, GenerateParameters]]:
    """Choice index = prompt index x n + copy (OpenAI's order)."""
    return [(prompt, params) for prompt in req.prompts for params in _copies(req.params, req.n)]


async def completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    req = parse_completion_request(await read_json(request), st.limits.max_client_batch_size)
    _check_n(req.n, st)
    _check_alternatives("logprobs", req.logprobs, st)
    if req.stream:
        return await _completions_stream(request, st, req)
    jobs = _completion_jobs(req)
    results = await _generate_all(st, jobs)  # completion order, as TGI
    choices = [_completion_choice(req, i, jobs[i][0], r) for i, r in results]
    by_prompt = {i // req.n: r for i, r in results}  # a prompt's tokens count once, whatever n
    n_in = sum(r.valid.input_length for r in by_prompt.values())
    n_out = sum(r.end.generated_tokens for _, r in results)
    body = {**_base(st, "text_completion"), "choices": choices, "usage": _usage(n_in, n_out)}
    rs = [r for _, r in results]
    total = Timings(*(sum(getattr(r.timings, k) for r in rs) for k in Timings.__dataclass_fields__))
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
    jobs = _completion_jobs(req)
    streams = [st.infer.generate_stream(p, params, allow_prompt_logprobs=True) for p, params in jobs]
    headers = schemas.stream_headers(st.compute_type, sum(len(p) for p in req.prompts))
    resp = await open_accepted_sse(request, headers, streams)
    offsets = [0 if req.echo else len(p) for p, _ in jobs]  # text offset of each choice's next token
    prompt_tokens: dict[int, int] = {}
    completion_tokens: list[int] = []

    def encode(tagged: tuple[int, StreamItem]) -> dict[str, Any]:
        i, item = tagged
        text = "" if item.token.special else item.token.text
        if req.echo and item.index == 1:
            text = jobs[i][0] + text
        logprobs = None
        if req.logprobs is not None:
            tokens = [*item.prefill, item.token]  # echo: the prompt's tokens come with the first one
            top = [*([] for _ in item.prefill), item.top_tokens]
            logprobs = _completion_logprobs(tokens, top, offsets[i])
            offsets[i] += sum(len(t.text) for t in tokens)
        if item.end is None:
            return {
                "object": "text_completion",
                "id": "",
                "created": int(time.time()),
                "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": ""}],
                "model": st.model_id,
                "system_fingerprint": st.system_fingerprint,
            }
        n_in, n_out = item.valid.input_length, item.end.generated_tokens
        prompt_tokens[i // req.n] = n_in
        completion_tokens.append(n_out)
        return {
            **_base(st, "text_completion"),
            # Quirk kept from TGI: streamed completions do not rename eos_token to stop.
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": item.end.finish_reason}],
            # TGI puts each choice's usage on its last chunk; with include_usage OpenAI's final chunk has it.
            "usage": None if req.include_usage else _usage(n_in, n_out),
        }

    if not await pump(resp, _merge(streams), encode, _stream_error):
        return resp
    try:
        if req.include_usage:
            usage = _usage(sum(prompt_tokens.values()), sum(completion_tokens))
            await resp.write(sse_frame({**_base(st, "text_completion"), "choices": [], "usage": usage}))
        await resp.write(DONE_FRAME)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp
