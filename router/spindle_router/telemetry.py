"""OpenTelemetry tracing for the router: OTLP/gRPC export, W3C context in and out.

Spans of a request (`setup_tracing` installs the exporter when an endpoint is configured; without one
`enabled()` is False and nothing here is called on the request path):

    POST /generate                 (server span; parent = the client's `traceparent`, if any)
      ├─ validation
      ├─ queue                     (submit -> first scheduled into a shard batch)
      └─ inference                 (first scheduled -> last event)
           └─ Step on every rank, parented over gRPC metadata

A batch RPC serves many requests but has one parent: the oldest traced request it carries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from spindle_router.config import TelemetryConfig

log = logging.getLogger(__name__)
TRACER_NAME = "spindle.router"
Carrier = tuple[tuple[str, str], ...]

_enabled = False


def setup_tracing(config: TelemetryConfig) -> TracerProvider | None:
    """Export spans over OTLP/gRPC when `otlp_endpoint` is set; returns the provider to shut down."""
    global _enabled
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": config.otlp_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("exporting traces to %s as %s", config.otlp_endpoint, config.otlp_service_name)
    return provider


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from HTTP headers (W3C `traceparent` / `tracestate`)."""
    return extract({k.lower(): v for k, v in headers.items()})


def carrier(ctx: otel_context.Context | None = None) -> Carrier:
    """W3C headers for `ctx` (default: the current context), as gRPC metadata pairs."""
    headers: dict[str, str] = {}
    inject(headers, context=ctx)
    return tuple(headers.items())


def span(name: str, **attributes: object) -> AbstractContextManager:
    """A child span of the current one for a phase run inline (validation); free when tracing is off."""
    if not _enabled:
        return nullcontext()
    return tracer().start_as_current_span(name, attributes=attributes)


@contextmanager
def server_span(name: str, headers: Mapping[str, str], **attributes: object) -> Iterator[trace.Span | None]:
    """The root span of an HTTP request, child of the client's `traceparent` when it sent one."""
    if not _enabled:
        yield None
        return
    with tracer().start_as_current_span(
        name, context=context_from_headers(headers), kind=trace.SpanKind.SERVER, attributes=attributes
    ) as s:
        yield s


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a sampled span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class RequestTrace:
    """The queue and inference spans of one backend request (scheduler.request.TraceHook).

    Created at submit under the current span; the scheduler asks for `carrier()` each time it sends the
    request to the shards, and the first ask is the moment it left the queue."""

    def __init__(self) -> None:
        self._parent = otel_context.get_current()
        self._queue: trace.Span | None = tracer().start_span("queue", context=self._parent)
        self._inference: trace.Span | None = None
        self._carrier: Carrier = ()

    @classmethod
    def start(cls) -> RequestTrace | None:
        return cls() if _enabled else None

    def carrier(self) -> Carrier:
        if self._inference is None:
            self._end_queue()
            self._inference = tracer().start_span("inference", context=self._parent)
            self._carrier = carrier(trace.set_span_in_context(self._inference))
        return self._carrier

    def finish(self, error: BaseException | None = None) -> None:
        """End whatever is open; `error` marks the open span failed."""
        for s in (self._queue, self._inference):
            if s is not None and s.is_recording():
                if error is not None:
                    s.set_status(trace.Status(trace.StatusCode.ERROR, repr(error)))
                s.end()

    def _end_queue(self) -> None:
        if self._queue is not None and self._queue.is_recording():
            self._queue.end()
