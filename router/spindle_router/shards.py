"""gRPC client of the shards: the same call to every rank at once, all must succeed, rank 0's answer kept.

Ranks are tensor-parallel slices of one model: each call runs collectives across all of them, so every
rank must receive it (a call to a subset would hang the others). Only rank 0 answers a Step with
generations (the others sample the same tokens but neither detokenize nor report); rank 0's answer is
returned.

Every call has a deadline (`CallDeadlines`, applied in `_call_all`, the one place every RPC goes through):
a shard that is alive but does not answer (SIGSTOP, a deadlock, a hung GPU) would otherwise hold every
open stream forever. The deadline follows the work: the step cost the shards measure at Warmup times the
tokens of the call, times a margin, never under a floor; `--shard-timeout` replaces it. Past it the call
fails with ShardStalled, which the router treats as fatal (/health 503, open requests fail, exit 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from spindle_proto import generate_pb2 as pb
from spindle_proto import generate_pb2_grpc

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
)
DEADLINE_FLOOR_S = 30.0  # no call gets less: a busy host, a first-time kernel compile, a GC pause
DEADLINE_MARGIN = 10.0  # x the call's estimated cost
STARTUP_DEADLINE_S = 600.0  # Info and Warmup: no step cost known yet, and warmup compiles and captures graphs
PROBE_DEADLINE_S = 10.0  # Health: /health must answer while a client still waits for it
_STARTUP_METHODS = frozenset({"Info", "Warmup"})
_PROBE_METHODS = frozenset({"Health"})


class ShardError(RuntimeError):
    """A shard call failed: "Server error: <details>" or "Could not connect to shard <path>: <details>"."""


class ShardStalled(ShardError):
    """A shard did not answer within the call's deadline: alive (or not) but not working. Fatal."""


@dataclass(frozen=True)
class CallDeadlines:
    """Seconds a shard call may take before the shard counts as stalled.

    startup calls (Info, Warmup)   max(startup_s, override_s)
    probes (Health)                 override_s when given, else probe_s
    every other call                override_s when given, else
                                    max(floor_s, margin x (base_ns + (work_tokens - 1) x token_ns))
    base_ns / token_ns are the step cost the shards measured at Warmup (0 until then: the floor applies).
    """

    override_s: float | None = None  # --shard-timeout
    floor_s: float = DEADLINE_FLOOR_S
    margin: float = DEADLINE_MARGIN
    startup_s: float = STARTUP_DEADLINE_S
    probe_s: float = PROBE_DEADLINE_S
    base_ns: int = 0
    token_ns: int = 0

    def __post_init__(self) -> None:
        if self.override_s is not None and not self.override_s > 0:
            raise ValueError(f"the shard timeout must be > 0, got {self.override_s}")

    def for_call(self, method: str, work_tokens: int) -> float:
        if method in _STARTUP_METHODS:
            return max(self.startup_s, self.override_s or 0.0)
        if self.override_s is not None:
            return self.override_s
        if method in _PROBE_METHODS:
            return self.probe_s
        estimate_s = (self.base_ns + max(0, work_tokens - 1) * self.token_ns) / 1e9
        return max(self.floor_s, self.margin * estimate_s)


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
    forward_context_ns: float = 0.0  # each (prefill token, earlier position) pair, on the slowest rank


Metadata = Sequence[tuple[str, str]]  # sent with a call: W3C trace context, when the caller traces


class ShardClient:
    def __init__(self, uds_paths: Sequence[str], channels: Sequence[grpc.aio.Channel],
                 deadlines: CallDeadlines | None = None) -> None:
        self.uds_paths = tuple(uds_paths)
        self.deadlines = deadlines or CallDeadlines()  # the step cost joins at warmup
        self._channels = list(channels)
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(c) for c in channels]
        self._closed = False

    @classmethod
    async def connect(cls, uds_paths: Sequence[str], timeout_s: float,
                      deadlines: CallDeadlines | None = None) -> ShardClient:
        """Open a channel per rank and wait until every rank answers Health, or raise ShardError at timeout."""
        if not uds_paths:
            raise ValueError("no shard socket given")
        channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in uds_paths]
        client = cls(uds_paths, channels, deadlines)
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

    async def _call(self, method: str, request: Any, metadata: Metadata = (), work_tokens: int = 0) -> Any:
        """`method` on every rank concurrently; rank 0's response, or ShardError if any rank failed."""
        return (await self._call_all(method, request, metadata, work_tokens))[0]

    async def _call_all(self, method: str, request: Any, metadata: Metadata = (), work_tokens: int = 0) -> list[Any]:
        """Every RPC goes through here, under its deadline (a new RPC gets one without asking), which scales
        with `work_tokens`, the tokens the call's forward computes (0: no forward)."""
        if self._closed:
            raise ShardError("Could not connect to shard: the client is closed")
        md = tuple(metadata) or None
        timeout_s = self.deadlines.for_call(method, work_tokens)
        calls = [getattr(stub, method)(request, timeout=timeout_s, metadata=md) for stub in self._stubs]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for path, result in zip(self.uds_paths, results):
            if isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ShardStalled(
                    f"Shard stalled: {path} did not answer {method} within {timeout_s:.1f}s "
                    "(stopped, deadlocked or a hung device)"
                ) from None
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
        await self._call("Health", pb.HealthRequest())

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
        result = WarmupResult(
            num_blocks=min(r.num_blocks for r in answers),
            forward_base_ns=max(r.forward_base_ns for r in answers),
            forward_token_ns=max(r.forward_token_ns for r in answers),
            forward_context_ns=max(r.forward_context_ns for r in answers),
        )
        # From now on each call's deadline follows its work.
        self.deadlines = replace(self.deadlines, base_ns=result.forward_base_ns, token_ns=result.forward_token_ns)
        return result

    async def step(
        self, requests: Sequence[pb.Request] = (), updates: Sequence[pb.RequestUpdate] = (),
        dropped_ids: Sequence[int] = (), *, num_requests: int, work_tokens: int, seq: int = 0,
        metadata: Metadata = (),
    ) -> pb.StepResponse:
        """One forward: drop `dropped_ids`, apply `updates`, admit `requests`, advance the `num_requests`
        requests left; `work_tokens` (the tokens it computes) sizes the deadline; `seq` numbers the steps (the
        shards refuse one out of order). Rank 0's generations."""
        request = pb.StepRequest(dropped_ids=list(dropped_ids), updates=list(updates), requests=list(requests),
                                 num_requests=num_requests, seq=seq)
        return await self._call("Step", request, metadata=metadata, work_tokens=work_tokens)

    async def clear_cache(self) -> None:
        """Every rank forgets every request it holds."""
        await self._call("ClearCache", pb.ClearCacheRequest())
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
