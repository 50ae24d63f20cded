"""OpenTelemetry spans for the RPCs a shard serves, parented by the router's W3C context in gRPC metadata."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)
TRACER_NAME = "spindle.server"


def setup_tracing(otlp_endpoint: str | None, service_name: str, rank: int):
    """Export spans over OTLP/gRPC when an endpoint is given; returns the provider (or None)."""
    if not otlp_endpoint:
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": f"{service_name}.shard", "spindle.rank": rank})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", otlp_endpoint)
    return provider


@contextlib.contextmanager
def rpc_span(method: str, metadata: Sequence[tuple[str, str | bytes]] | None, rank: int) -> Iterator[None]:
    """A server span named after the RPC, child of the caller's context when it sent one."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        method, context=extract(carrier), kind=trace.SpanKind.SERVER, attributes={"spindle.rank": rank}
    ):
        yield
