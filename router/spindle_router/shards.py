"""gRPC client of the shards: the same call to every rank at once, all must succeed, rank 0's answer kept.

Ranks are tensor-parallel slices of one model: each call runs collectives across all of them, so every
rank must receive it (a call to a subset would hang the others). Their answers are identical by
construction; rank 0's is returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from spindle_proto import generate_pb2 as pb
from spindle_proto import generate_pb2_grpc

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
)
HEALTH_TIMEOUT_S = 10.0


class ShardError(RuntimeError):
    """A shard call failed: "Server error: <details>" or "Could not connect to shard <path>: <details>"."""


@dataclass(frozen=True)
class ShardInfo:
    model_type: str
    dtype: str
    device_type: str
    block_size: int
    world_size: int
    attention_impl: str
    vocab_size: int
    max_position_embeddings: int
    support_chunking: bool
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class WarmupResult:
    num_blocks: int  # KV blocks every rank holds (the smallest rank's count)
    forward_base_ns: int  # a one-token forward, on the slowest rank
    forward_token_ns: int  # each further prefill token, on the slowest rank


Metadata = Sequence[tuple[str, str]]  # sent with a call: W3C trace context, when the caller traces


class ShardClient:
    def __init__(self, uds_paths: Sequence[str], channels: Sequence[grpc.aio.Channel]) -> None:
        self.uds_paths = tuple(uds_paths)
        self._channels = list(channels)
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(c) for c in channels]
        self._closed = False

    @classmethod
    async def connect(cls, uds_paths: Sequence[str], timeout_s: float) -> ShardClient:
        """Open a channel per rank and wait until every rank answers Health, or raise ShardError at timeout."""
        if not uds_paths:
            raise ValueError("no shard socket given")
        channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in uds_paths]
        client = cls(uds_paths, channels)
        deadline = time.monotonic() + timeout_s
        try:
            for path, stub in zip(uds_paths, client._stubs):
                while True:
                    left = deadline - time.monotonic()
                    try:
                        await stub.Health(pb.HealthRequest(), timeout=max(left, 0.01), wait_for_ready=True)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if time.monotonic() >= deadline:
                            raise ShardError(
                                f"Could not connect to shard {path} within {timeout_s:.0f}s: {exc.details()}"
                            ) from None
                        await asyncio.sleep(0.05)
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def _call(self, method: str, request: Any, timeout_s: float | None = None, metadata: Metadata = ()) -> Any:
        """`method` on every rank concurrently; rank 0's response, or ShardError if any rank failed."""
        return (await self._call_all(method, request, timeout_s, metadata))[0]

    async def _call_all(
        self, method: str, request: Any, timeout_s: float | None = None, metadata: Metadata = ()
    ) -> list[Any]:
        if self._closed:
            raise ShardError("Could not connect to shard: the client is closed")
        md = tuple(metadata) or None
        calls = [getattr(stub, method)(request, timeout=timeout_s, metadata=md) for stub in self._stubs]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for path, result in zip(self.uds_paths, results):
            if isinstance(result, BaseException):
                raise _shard_error(path, result) from None
        return results

    async def info(self) -> ShardInfo:
        r = await self._call("Info", pb.InfoRequest())
        return ShardInfo(
            model_type=r.model_type,
            dtype=r.dtype,
            device_type=r.device_type,
            block_size=r.block_size,
            world_size=r.world_size,
            attention_impl=r.attention_impl,
            vocab_size=r.vocab_size,
            max_position_embeddings=r.max_position_embeddings,
            support_chunking=r.support_chunking,
            eos_token_ids=tuple(r.eos_token_ids),
        )

    async def health(self) -> None:
        await self._call("Health", pb.HealthRequest(), timeout_s=HEALTH_TIMEOUT_S)

    async def warmup(
        self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int, max_batch_size: int = 0
    ) -> WarmupResult:
        """Size every rank's KV cache and measure the step cost."""
        request = pb.WarmupRequest(
            max_input_tokens=max_input_tokens,
            max_prefill_tokens=max_prefill_tokens,
            max_total_tokens=max_total_tokens,
            max_batch_size=max_batch_size,
        )
        answers = await self._call_all("Warmup", request)
        return WarmupResult(
            num_blocks=min(r.num_blocks for r in answers),
            forward_base_ns=max(r.forward_base_ns for r in answers),
            forward_token_ns=max(r.forward_token_ns for r in answers),
        )

    async def prefill(
        self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None,
        updates: Sequence[pb.RequestUpdate] = (), metadata: Metadata = (),
    ) -> pb.PrefillResponse:
        request = pb.PrefillRequest(batch=batch, updates=list(updates))
        if cached_batch is not None:
            request.cached_batch.CopyFrom(cached_batch)
        return await self._call("Prefill", request, metadata=metadata)

    async def decode(
        self, batches: Sequence[pb.CachedBatch], updates: Sequence[pb.RequestUpdate] = (), metadata: Metadata = ()
    ) -> pb.DecodeResponse:
        request = pb.DecodeRequest(batches=list(batches), updates=list(updates))
        return await self._call("Decode", request, metadata=metadata)

    async def filter_batch(
        self, batch_id: int, request_ids: Sequence[int], metadata: Metadata = ()
    ) -> pb.CachedBatch | None:
        """Keep only `request_ids` of the batch; None when none is kept (the shards forgot it)."""
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=list(request_ids))
        r = await self._call("FilterBatch", request, metadata=metadata)
        return r.batch if r.HasField("batch") else None

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._call("ClearCache", request)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)


def _shard_error(path: str, exc: BaseException) -> ShardError:
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return ShardError(f"Could not connect to shard {path}: {exc.details()}")
        return ShardError(f"Server error: {exc.details()}")
    if isinstance(exc, asyncio.CancelledError):
        return ShardError(f"Could not connect to shard {path}: the call was cancelled")
    return ShardError(f"Could not connect to shard {path}: {exc}")
