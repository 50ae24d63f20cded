"""The one place errors become gRPC status codes. The shard logs the error and keeps serving.

    InvalidArgumentError  -> INVALID_ARGUMENT   (checked before any state changed)
    NotReadyError         -> FAILED_PRECONDITION
    anything else         -> INTERNAL, with the exception's message
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from spindle_server.engine.errors import InvalidArgumentError, NotReadyError

log = logging.getLogger("spindle_server.interceptor")

_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary handler: exceptions -> status + message; optionally one trace span per RPC."""

    def __init__(self, rank: int, tracing: bool = False) -> None:
        self.rank = rank
        self.tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = handler_call_details.invocation_metadata
        rank, tracing = self.rank, self.tracing

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if not tracing:
                    return await inner(request, context)
                from spindle_server.tracing import rpc_span

                with rpc_span(method, metadata, rank):
                    return await inner(request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
                code = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                else:
                    log.warning("%s rejected (%s): %s", method, code.name, exc)
                message = str(exc) or type(exc).__name__
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
