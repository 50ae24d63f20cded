"""A real OTLP/gRPC trace receiver for tests, built on opentelemetry-proto's service definitions."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.cond = threading.Condition()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        received = []
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value for a in resource_spans.resource.attributes}
            service = attrs["service.name"].string_value if "service.name" in attrs else ""
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: a.value for a in span.attributes},
                        )
                    )
        with self.cond:
            self.spans.extend(received)
            self.cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Listens on 127.0.0.1:<port>; `endpoint` is what --otlp-endpoint takes."""

    def __init__(self) -> None:
        self._collector = _Collector()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._collector, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)

    def spans(self) -> list[ReceivedSpan]:
        with self._collector.cond:
            return list(self._collector.spans)

    def wait_for(self, predicate, timeout_s: float) -> list[ReceivedSpan]:
        """Block until predicate(spans) holds (exporters batch: spans arrive a few seconds late)."""
        deadline = time.monotonic() + timeout_s
        with self._collector.cond:
            while not predicate(self._collector.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._collector.cond.wait(remaining)
            return list(self._collector.spans)
