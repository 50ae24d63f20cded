"""Server-sent events: `data: <json>\\n\\n` frames, keep-alive comments, and the client-gone path.

Each event is exactly one `data:` line and a blank line (no `event:`/`id:` lines), as TGI (axum) writes them.
While no event is ready for `KEEPALIVE_S`, a comment line `:` goes out, so proxies keep the connection and a
vanished client is noticed even during a long prefill. When the client goes away, the write fails (or the
handler is cancelled); the event source is then closed, which cancels the backend request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web

from spindle_router.api.context import dumps
from spindle_router.errors import ApiError

T = TypeVar("T")

KEEPALIVE_S = 15.0
DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b":\n\n"


def sse_frame(obj: Any) -> bytes:
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


async def open_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        },
    )
    await resp.prepare(request)
    return resp


async def with_keepalive(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """Items of `source`, with None whenever `interval` seconds pass without one. Closing this closes
    `source` (cancelling a pending read first)."""
    it = source.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
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
    events = with_keepalive(source, interval)
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
