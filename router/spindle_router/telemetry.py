"""OpenTelemetry tracing for the router: OTLP/gRPC export, W3C context in and out.

Spans of a request (`setup_tracing` installs the exporter when an endpoint is configured; without one
the API's no-op tracer makes every call here free):

    POST /generate                 (server span; parent = the client's `traceparent`, if any)
      ├─ validation
      ├─ queue                     (recorded after the fact from the scheduler's timestamps)
      └─ inference
           └─ shard spans          (each shard's Prefill/Decode/Filter, parented over gRPC metadata)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from spindle_router.config import TelemetryConfig

log = logging.getLogger(__name__)
TRACER_NAME = "spindle.router"


def setup_tracing(config: TelemetryConfig) -> TracerProvider | None:
    """Export spans over OTLP/gRPC when `otlp_endpoint` is set; returns the provider to shut down."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": config.otlp_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s as %s", config.otlp_endpoint, config.otlp_service_name)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from HTTP headers (W3C `traceparent` / `tracestate`)."""
    return extract(dict(headers))


def carrier(ctx: otel_context.Context | None = None) -> tuple[tuple[str, str], ...]:
    """W3C headers for `ctx` (default: the current context), as gRPC metadata pairs."""
    headers: dict[str, str] = {}
    inject(headers, context=ctx)
    return tuple(headers.items())


def record_span(
    name: str, start_ns: int, end_ns: int, parent: otel_context.Context | None, attributes: Mapping | None = None
) -> None:
    """A span for a phase whose bounds are known only afterwards (queue time, inference time)."""
    span = tracer().start_span(name, context=parent, start_time=start_ns, attributes=dict(attributes or {}))
    span.end(end_time=end_ns)


def first_carrier(carriers: Iterable[tuple[tuple[str, str], ...]]) -> tuple[tuple[str, str], ...]:
    """The first non-empty trace carrier: a batch RPC is parented to its oldest traced request."""
    for c in carriers:
        if c:
            return c
    return ()
