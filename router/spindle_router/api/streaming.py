"""Server-sent events: `data: <json>\\n\\n` frames, keep-alive comments, and the client-gone path.

Each event is exactly one `data:` line and a blank line (no `event:`/`id:` lines), as TGI (axum) writes them.
While no event is ready for `KEEPALIVE_S`, a comment line `:` goes out, so proxies keep the connection.
When the client goes away, the next write fails, or, while no event comes (queued, a long prefill), the
connection is seen closed within DISCONNECT_POLL_S; the event source is then closed, which cancels the
backend request and frees its KV blocks.

A client that stops reading without closing: the scheduler cancels its request once its events back up
(scheduler.loop.MAX_BUFFERED_EVENTS), and a write that cannot go out for SEND_TIMEOUT_S (nginx's
send_timeout) closes the connection, so the handler and its admission permit do not wait on it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web

from spindle_router.api.context import dumps
from spindle_router.errors import ApiError
from spindle_router.infer import Accepted

T = TypeVar("T")
log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
DISCONNECT_POLL_S = 0.2  # how often a stream waiting for its next event looks whether its client is still there
SEND_TIMEOUT_S = 60.0  # a write the client does not take for this long closes the connection
# The kernel's send buffer of a stream: fixed instead of autotuned (up to 4 MiB on Linux), so a client that
# does not read backs up into the stream's bounded event buffer within a few hundred events. A token stream
# needs little: 64 KiB in flight is 100 tokens/s at a 1 s round trip.
STREAM_SNDBUF_BYTES = 64 * 1024
DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b":\n\n"


def sse_frame(obj: Any) -> bytes:
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


class SseResponse(web.StreamResponse):
    """A streamed response that knows its request, to tell whether the client is still connected."""

    def __init__(self, request: web.Request, **kw: Any) -> None:
        super().__init__(**kw)
        self.request = request

    @property
    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """As StreamResponse.write; when the socket is already backed up (the client is not reading), the
        write may wait SEND_TIMEOUT_S at most, then the connection is closed (ConnectionResetError)."""
        transport = self.request.transport
        if transport is None or transport.get_write_buffer_size() == 0:
            await super().write(data)  # the common case: no timer
            return
        try:
            await asyncio.wait_for(super().write(data), SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("closing a stream whose client took nothing for %.0fs", SEND_TIMEOUT_S)
            transport.abort()
            raise ConnectionResetError("the client stopped reading") from None


async def open_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    resp = SseResponse(
        request,
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        },
    )
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
    await resp.prepare(request)
    return resp


async def accepted(streams: list[AsyncIterator[Any]]) -> list[AsyncIterator[Any]]:
    """Run each of Infer.generate_stream's iterators up to its Accepted item, so that what fails before it
    (validation, 429) propagates and the route answers a 4xx JSON body before any byte of the stream; the
    iterators, positioned after Accepted. On a failure every iterator is closed (its request cancelled)."""
    try:
        for items in streams:
            first = await items.__anext__()
            if not isinstance(first, Accepted):
                raise RuntimeError(f"a generation stream began with {type(first).__name__}, not Accepted")
    except BaseException:
        for items in streams:
            await items.aclose()  # type: ignore[attr-defined]
        raise
    return streams


async def open_accepted_sse(
    request: web.Request, headers: dict[str, str], streams: list[AsyncIterator[Any]]
) -> web.StreamResponse:
    """`accepted(streams)`, then the SSE response; the streams are closed when it cannot be opened."""
    await accepted(streams)
    try:
        return await open_sse(request, headers)
    except BaseException:
        for items in streams:
            await items.aclose()  # type: ignore[attr-defined]
        raise


async def with_keepalive(
    source: AsyncIterator[T], interval: float, client_gone: Callable[[], bool] = lambda: False
) -> AsyncIterator[T | None]:
    """Items of `source`, with None whenever `interval` seconds pass without one; ConnectionResetError when
    `client_gone()` while waiting. Closing this closes `source` (cancelling a pending read first)."""
    it = source.__aiter__()
    pending: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    last_out = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=min(interval, DISCONNECT_POLL_S))
            if not done:
                if client_gone():
                    raise ConnectionResetError("the client went away")
                if loop.time() - last_out >= interval:
                    last_out = loop.time()
                    yield None
                continue
            last_out = loop.time()
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


async def pump(
    resp: web.StreamResponse,
    source: AsyncIterator[T],
    encode: Callable[[T], Any],
    on_error: Callable[[ApiError], Any],
    interval: float = KEEPALIVE_S,
) -> bool:
    """Write `encode(item)` for each item of `source`; an ApiError becomes one `on_error` event.
    Returns False when the client went away (the source is closed then, cancelling the request)."""
    def client_gone() -> bool:
        return isinstance(resp, SseResponse) and resp.client_gone

    events = with_keepalive(source, interval, client_gone)
    try:
        async for item in events:
            if item is None:
                await resp.write(KEEPALIVE_FRAME)
                continue
            frame = encode(item)
            if frame is not None:
                await resp.write(sse_frame(frame))
    except ApiError as e:
        try:
            await resp.write(sse_frame(on_error(e)))
        except ConnectionError:
            return False
    except ConnectionError:
        return False
    finally:
        await events.aclose()
    return True
