"""The infer layer: admission, validation, and one loop over a backend stream (`_stream`): streamed routes
forward its items, `generate` collects them into a result (as TGI does).

Every generation takes a permit before it is validated (TGI: `try_acquire`, never waits): with
`max_concurrent_requests` permits out the request fails at once with 429. A best_of request takes one
permit per sequence. Metrics of the `tgi_request_*` family are recorded here, once per generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from spindle_router import telemetry
from spindle_router.config import LimitsConfig
from spindle_router.errors import ApiError, ValidationError
from spindle_router.metrics import Metrics
from spindle_router.scheduler.backend import Backend
from spindle_router.scheduler.request import EndEvent, ErrorEvent, PrefillEvent, Token, TokenEvent
from spindle_router.validation import GenerateParameters, Validator, ValidGenerate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    """Seconds, from the handler's start: validation = queued - start, queue = started - queued,
    inference = end - started (TGI's definitions)."""

    validation_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass
class GenerationResult:
    valid: ValidGenerate
    end: EndEvent
    timings: Timings
    prefill: list[Token] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)  # every generated token, the last included
    top_tokens: list[list[Token]] = field(default_factory=list)

    @property
    def generated_text(self) -> str:
        """The answer's text; the prompt prepended when return_full_text."""
        prefix = self.valid.inputs if self.valid.return_full_text else ""
        return prefix + self.end.generated_text

    @property
    def mean_logprob(self) -> float:
        known = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(known) / len(known) if known else float("-inf")


@dataclass(frozen=True)
class Generation:
    """A non-streamed answer: the best sequence and, for best_of > 1, the others."""

    best: GenerationResult
    others: list[GenerationResult]


@dataclass(frozen=True)
class Accepted:
    """The first item of `generate_stream`: the request passed validation and admission and is queued.
    Whatever the stream raises before it is the client's error, which the routes answer as a 4xx JSON body
    before any byte of the stream (api.streaming.accepted)."""


@dataclass(frozen=True)
class StreamItem:
    """One streamed token; `end` and `generated_text` are set on the last one only."""

    index: int  # 1-based
    token: Token
    top_tokens: list[Token]
    valid: ValidGenerate
    end: EndEvent | None = None
    generated_text: str | None = None
    prefill: tuple[Token, ...] = ()  # on the first item, when prompt logprobs were asked for
    timings: Timings | None = None  # on the last item


class _Permits:
    def __init__(self, infer: Infer, n: int) -> None:
        self.infer, self.n = infer, n

    def __enter__(self) -> _Permits:
        if self.infer.in_flight + self.n > self.infer.limits.max_concurrent_requests:
            raise ApiError.overloaded()
        self.infer.in_flight += self.n
        return self

    def __exit__(self, *exc: object) -> None:
        self.infer.in_flight -= self.n


def _timings(start: float, end: EndEvent, now: float) -> Timings:
    queued = max(end.queued_at, start)
    started = max(end.started_at, queued)
    return Timings(queued - start, started - queued, now - started, now - start)


async def collect(items: AsyncIterator[StreamItem]) -> GenerationResult:
    """A whole sequence from its stream items (the last one carries the end and the timings)."""
    prefill: list[Token] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []
    async with contextlib.aclosing(items):  # type: ignore[type-var]
        async for item in items:
            prefill.extend(item.prefill)
            tokens.append(item.token)
            top_tokens.append(item.top_tokens)
            if item.end is not None:
                assert item.timings is not None
                if item.valid.request.top_n_tokens == 0:
                    top_tokens = []
                return GenerationResult(item.valid, item.end, item.timings, prefill, tokens, top_tokens)
    raise ApiError.incomplete(streaming=False)


class Infer:
    def __init__(
        self, backend: Backend, validator: Validator, metrics: Metrics, limits: LimitsConfig
    ) -> None:
        self.backend = backend
        self.validator = validator
        self.metrics = metrics
        self.limits = limits
        self.in_flight = 0  # permits held; only touched on the event loop

    def _failed(self, e: BaseException) -> None:
        if isinstance(e, ApiError) and e.metric:
            self.metrics.request_failure.labels(err=e.metric).inc()
            log.warning("request failed (%s): %s", e.error_type, e.message)
        elif isinstance(e, (asyncio.CancelledError, GeneratorExit, ConnectionError)):
            self.metrics.request_failure.labels(err="dropped").inc()
            log.info("request dropped: the client went away")

    def _succeeded(self, result: GenerationResult) -> None:
        m, t = self.metrics, result.timings
        log.info(
            "Success", extra={
                "total_time_ms": round(t.total_s * 1e3, 3), "validation_time_ms": round(t.validation_s * 1e3, 3),
                "queue_time_ms": round(t.queue_s * 1e3, 3), "inference_time_ms": round(t.inference_s * 1e3, 3),
                "input_tokens": result.valid.input_length, "generated_tokens": result.end.generated_tokens,
                "finish_reason": result.end.finish_reason, "seed": result.end.seed,
            },
        )
        m.request_success.inc()
        m.request_duration.observe(t.total_s)
        m.request_validation_duration.observe(t.validation_s)
        m.request_queue_duration.observe(t.queue_s)
        m.request_inference_duration.observe(t.inference_s)
        if result.end.generated_tokens > 0:
            m.request_mean_time_per_token_duration.observe(t.inference_s / result.end.generated_tokens)
        m.request_generated_tokens.observe(result.end.generated_tokens)

    async def _validate(self, inputs: str, params: GenerateParameters, **kw: bool) -> ValidGenerate:
        with telemetry.span("validation"):
            valid = await self.validator.validate(inputs, params, **kw)
        self.metrics.request_input_length.observe(valid.input_length)
        self.metrics.request_max_new_tokens.observe(valid.request.stopping.max_new_tokens)
        return valid

    async def generate(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        default_return_full_text: bool = False,
    ) -> Generation:
        """Run one request to the end: its best_of sequences concurrently, each collected from `_stream`.
        Raises ApiError."""
        start = time.monotonic()
        self.metrics.request_count.inc()
        try:
            best_of = self.validator.check_best_of(params)
            with _Permits(self, best_of):
                valid = await self._validate(
                    inputs,
                    params,
                    add_special_tokens=add_special_tokens,
                    default_return_full_text=default_return_full_text,
                )
                if best_of == 1:  # in this task: a cancellation is accounted before it propagates
                    results = [await collect(self._stream(valid, start, streaming=False))]
                else:
                    seeded = [valid.with_seed(random.getrandbits(64)) for _ in range(best_of)]
                    results = await _gather_all([collect(self._stream(v, start, streaming=False)) for v in seeded])
        except BaseException as e:
            self._failed(e)
            raise
        best = max(results, key=lambda r: r.mean_logprob)
        self._succeeded(best)
        return Generation(best=best, others=[r for r in results if r is not best])

    async def generate_stream(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        default_return_full_text: bool = False,
        allow_prompt_logprobs: bool = False,
    ) -> AsyncIterator[Accepted | StreamItem]:
        """Accepted once the request is valid and admitted, then tokens as they come (with
        `allow_prompt_logprobs`, the first token item carries the prompt's tokens when decoder_input_details
        asks for them; TGI's streaming route refuses that). Raises ApiError: before Accepted the route answers
        it as a 4xx JSON body, after it as an in-stream error event. Closing the iterator early (client gone)
        cancels the backend request."""
        start = time.monotonic()
        self.metrics.request_count.inc()
        done = False  # the final item went out: a late close is no failure
        try:
            if params.best_of is not None and params.best_of != 1:
                raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
            if params.decoder_input_details and not allow_prompt_logprobs:
                raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
            with _Permits(self, 1):
                valid = await self._validate(
                    inputs,
                    params,
                    add_special_tokens=add_special_tokens,
                    default_return_full_text=default_return_full_text,
                )
                yield Accepted()
                async for item in self._stream(valid, start):
                    if item.end is not None:
                        assert item.timings is not None
                        self._succeeded(GenerationResult(valid, item.end, item.timings))
                        done = True
                    yield item
        except BaseException as e:
            if not done:
                self._failed(e)
            raise

    def _submit(self, valid: ValidGenerate):  # type: ignore[no-untyped-def]
        """Hand the request to the backend; its queue and inference spans when tracing."""
        trace = telemetry.RequestTrace.start()
        request = valid.request if trace is None else dataclasses.replace(valid.request, trace=trace)
        return self.backend.submit(request), trace

    async def _stream(self, valid: ValidGenerate, start: float, streaming: bool = True) -> AsyncIterator[StreamItem]:
        """The one loop over a backend stream: an item per generated token, the last with the end."""
        stream, trace = self._submit(valid)
        finished = False
        index = 0
        prefill: tuple[Token, ...] = ()
        keep_top = valid.request.top_n_tokens > 0
        try:
            async for event in stream:
                if isinstance(event, PrefillEvent):
                    prefill = tuple(event.tokens)
                elif isinstance(event, TokenEvent):
                    index += 1
                    top = list(event.top_tokens) if keep_top else []
                    yield StreamItem(index, event.token, top, valid, prefill=prefill)
                    prefill = ()
                elif isinstance(event, EndEvent):
                    finished = True
                    index += 1
                    prefix = valid.inputs if valid.return_full_text else ""
                    item = StreamItem(
                        index,
                        event.token,
                        list(event.top_tokens) if keep_top else [],
                        valid,
                        end=event,
                        generated_text=prefix + event.generated_text,
                        prefill=prefill,
                        timings=_timings(start, event, time.monotonic()),
                    )
                    if trace is not None:
                        trace.finish()  # the answer is complete, whatever the client does next
                    yield item
                    return
                elif isinstance(event, ErrorEvent):
                    finished = True
                    raise ApiError.generation(event.message)
            finished = True
            raise ApiError.incomplete(streaming)
        finally:
            if not finished:  # cancelled (client gone, sibling best_of failed): free the request's blocks
                stream.cancel()
            if trace is not None:
                trace.finish(error=sys.exc_info()[1])


async def _gather_all(coros: list) -> list[GenerationResult]:
    """Run all; on the first failure cancel the rest (their streams get cancelled) and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
