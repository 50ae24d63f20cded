"""Errors a bad call raises. The interceptor maps each class to one gRPC status; anything else is INTERNAL.

Every check that can raise these runs before any state changes, so a rejected call changes nothing.
"""

from __future__ import annotations


class BatchNotFoundError(LookupError):
    """The call names a batch the shard does not hold (NOT_FOUND)."""

    def __init__(self, batch_id: int) -> None:
        super().__init__(f"Batch ID {batch_id} not found in cache.")
        self.batch_id = batch_id


class InvalidArgumentError(ValueError):
    """The call is malformed: bad parameters, blocks out of range, empty batch, duplicate ids (INVALID_ARGUMENT)."""


class NotReadyError(RuntimeError):
    """The call needs state the shard does not have yet, e.g. a KV cache before Warmup (FAILED_PRECONDITION)."""
