"""Errors a bad call raises. The interceptor maps each class to one gRPC status; anything else is INTERNAL.

Every check that can raise these runs before any state changes, so a rejected call changes nothing.
"""

from __future__ import annotations


class InvalidArgumentError(ValueError):
    """The call is malformed: bad parameters, blocks out of range, unknown or duplicate request ids, an
    empty step (INVALID_ARGUMENT)."""


class NotReadyError(RuntimeError):
    """The call needs state the shard does not have yet, e.g. a KV cache before Warmup (FAILED_PRECONDITION)."""
