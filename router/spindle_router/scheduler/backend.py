"""The interface the HTTP layer sees of the scheduler (implemented by scheduler.loop.Scheduler)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from spindle_router.scheduler.request import Event, ValidRequest


class RequestStream(Protocol):
    """Events of one request, ending with an EndEvent or an ErrorEvent."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None:
        """The client went away: the request leaves the batch and its KV blocks are freed at once."""


class Backend(Protocol):
    def submit(self, request: ValidRequest) -> RequestStream:
        """Queue a validated request. Admission limits (429) are the HTTP layer's job, not this one's."""

    @property
    def is_healthy(self) -> bool:
        """False once a shard failed; /health answers 503."""

    async def health_check(self) -> bool:
        """Ask every shard (Health RPC); False when any fails."""
