"""The infer layer: admission, validation, one backend stream consumed into a result or a token stream.

Every generation takes a permit before it is validated (TGI: `try_acquire`, never waits): with
`max_concurrent_requests` permits out the request fails at once with 429. A best_of request takes one
permit per sequence. Metrics of the `tgi_request_*` family are recorded here, once per generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from spindle_router import telemetry
from spindle_router.config import LimitsConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.backend import Backend
from spindle_router.scheduler.request import EndEvent, ErrorEvent, PrefillEvent, Token, TokenEvent
from spindle_router.validation import GenerateParameters, ValidationError, Validator, ValidGenerate

log = logging.getLogger(__name__)


class InferError(Exception):
    """A failure with TGI's HTTP status, `error_type` and message."""

    def __init__(self, status: int, error_type: str, message: str, metric: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.metric = metric  # label of tgi_request_failure, when the failure counts as one

    @classmethod
    def validation(cls, e: ValidationError) -> InferError:
        return cls(422, "validation", str(e), "validation")

    @classmethod
    def overloaded(cls) -> InferError:
        return cls(429, "overloaded", "Model is overloaded", "overloaded")

    @classmethod
    def generation(cls, detail: str) -> InferError:
        return cls(424, "generation", f"Request failed during generation: {detail}", "generation")

    @classmethod
    def incomplete(cls, streaming: bool) -> InferError:
        if streaming:
            return cls(500, "incomplete_generation_stream", "Incomplete generation stream", "incomplete")
        return cls(500, "incomplete_generation", "Incomplete generation", "incomplete")


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


class _Permits:
    def __init__(self, infer: Infer, n: int) -> None:
        self.infer, self.n = infer, n

    def __enter__(self) -> _Permits:
        if self.infer.in_flight + self.n > self.infer.limits.max_concurrent_requests:
            raise InferError.overloaded()
        self.infer.in_flight += self.n
        return self

    def __exit__(self, *exc: object) -> None:
        self.infer.in_flight -= self.n


def _timings(start: float, end: EndEvent, now: float) -> Timings:
    queued = max(end.queued_at, start)
    started = max(end.started_at, queued)
    return Timings(queued - start, started - queued, now - started, now - start)


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
        if isinstance(e, InferError) and e.metric:
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
        try:
            with telemetry.span("validation"):
                valid = await self.validator.validate(inputs, params, **kw)
        except ValidationError as e:
            raise InferError.validation(e) from e
        self.metrics.request_input_length.observe(valid.input_length)
        self.metrics.request_max_new_tokens.observe(valid.request.stopping.max_new_tokens)
        return valid

    def _check_best_of(self, best_of: int) -> None:
        max_best_of = self.limits.max_best_of
        if best_of > 1 and max_best_of == 1:
            raise InferError.validation(ValidationError("`best_of` != 1 is not allowed for this endpoint"))
        if best_of > max_best_of:
            raise InferError.validation(
                ValidationError(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
            )

    async def generate(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        default_return_full_text: bool = False,
    ) -> Generation:
        """Run one request to the end (best_of sequences concurrently). Raises InferError."""
        start = time.monotonic()
        self.metrics.request_count.inc()
        try:
            best_of = params.best_of or 1
            self._check_best_of(best_of)
            with _Permits(self, best_of):
                valid = await self._validate(
                    inputs,
                    params,
                    add_special_tokens=add_special_tokens,
                    default_return_full_text=default_return_full_text,
                )
                if best_of == 1:
                    results = [await self._run(valid, start)]
                else:
                    results = await _gather_all(
                        [self._run(valid.with_seed(random.getrandbits(64)), start) for _ in range(best_of)]
                    )
        except BaseException as e:
            self._failed(e)
            raise
        best = max(results, key=lambda r: r.mean_logprob)
        self._succeeded(best)
        return Generation(best=best, others=[r for r in results if r is not best])

    def _submit(self, valid: ValidGenerate):  # type: ignore[no-untyped-def]
        """Hand the request to the backend; its queue and inference spans when tracing."""
        trace = telemetry.RequestTrace.start()
        request = valid.request if trace is None else dataclasses.replace(valid.request, trace=trace)
        return self.backend.submit(request), trace

    async def _run(self, valid: ValidGenerate, start: float) -> GenerationResult:
        stream, trace = self._submit(valid)
        finished = False
        prefill: list[Token] = []
        tokens: list[Token] = []
        top_tokens: list[list[Token]] = []
        try:
            async for event in stream:
                if isinstance(event, PrefillEvent):
                    prefill = list(event.tokens)
                elif isinstance(event, TokenEvent):
                    tokens.append(event.token)
                    top_tokens.append(list(event.top_tokens))
                elif isinstance(event, EndEvent):
                    finished = True
                    tokens.append(event.token)
                    top_tokens.append(list(event.top_tokens))
                    timings = _timings(start, event, time.monotonic())
                    if valid.request.top_n_tokens == 0:
                        top_tokens = []
                    return GenerationResult(valid, event, timings, prefill, tokens, top_tokens)
                elif isinstance(event, ErrorEvent):
                    finished = True
                    raise InferError.generation(event.message)
            finished = True
            raise InferError.incomplete(streaming=False)
        finally:
            if not finished:  # cancelled (client gone, sibling best_of failed): free the request's blocks
                stream.cancel()
            if trace is not None:
                trace.finish(error=sys.exc_info()[1])

    async def generate_stream(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        default_return_full_text: bool = False,
    ) -> AsyncIterator[Accepted | StreamItem]:
        """Accepted once the request is valid and admitted, then tokens as they come. Raises InferError: before
        Accepted the route answers it as a 4xx, after it as an in-stream error event.
        Closing the iterator early (client gone) cancels the backend request."""
        start = time.monotonic()
        self.metrics.request_count.inc()
        done = False  # the final item went out: a late close is no failure
        try:
            if params.best_of is not None and params.best_of != 1:
                raise InferError.validation(
                    ValidationError("`best_of` != 1 is not supported when streaming tokens")
                )
            if params.decoder_input_details:
                raise InferError.validation(
                    ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
                )
            with _Permits(self, 1):
                valid = await self._validate(
                    inputs,
                    params,
                    add_special_tokens=add_special_tokens,
                    default_return_full_text=default_return_full_text,
                )
                yield Accepted()
                async for item in self._stream(valid, start):
                    done = item.end is not None
                    yield item
        except BaseException as e:
            if not done:
                self._failed(e)
            raise

    async def _stream(self, valid: ValidGenerate, start: float) -> AsyncIterator[StreamItem]:
        stream, trace = self._submit(valid)
        finished = False
        index = 0
        keep_top = valid.request.top_n_tokens > 0
        try:
            async for event in stream:
                if isinstance(event, TokenEvent):
                    index += 1
                    yield StreamItem(index, event.token, list(event.top_tokens) if keep_top else [], valid)
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
                    )
                    timings = _timings(start, event, time.monotonic())
                    self._succeeded(GenerationResult(valid, event, timings))
                    if trace is not None:
                        trace.finish()  # the answer is complete, whatever the client does next
                    yield item
                    return
                elif isinstance(event, ErrorEvent):
                    finished = True
                    raise InferError.generation(event.message)
            finished = True
            raise InferError.incomplete(streaming=True)
        finally:
            if not finished:
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
