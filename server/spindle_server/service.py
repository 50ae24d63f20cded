"""gRPC servicer: proto -> domain, one engine call, domain -> proto. Errors are the interceptor's job.

Engine calls run one at a time on the engine's own thread (`engine_thread`), so the event loop keeps
answering Health while a forward runs and the collectives of consecutive calls never interleave. One
thread, always the same: the OpenMP pool torch's CPU kernels run on belongs to the thread that calls
them, and the default executor's rotating workers each grew a pool whose idle threads spun against the
next call's (served decode steps took 1.5-1.8x their in-process time on 2 cores); on CUDA, the
current device is per thread and is set once, here.

Steps run in the order the router numbered them (`seq`). gRPC does not promise that two calls sent back to
back start in that order (with overlapped steps the router sends step N + 1 before N's answer), and two ranks
that ran N and N + 1 in different orders would wait for each other at a collective forever. So a step that
arrives early waits, holding no engine time, until the step before it has run; if that step has not even
arrived within `order_grace_s`, it never will, and the engine refuses the early one as out of order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import torch
from spindle_proto import generate_pb2, generate_pb2_grpc

from spindle_server.engine.batch import RequestUpdate, StepCall, request_from_proto
from spindle_server.engine.shard import ShardEngine, StepOutcome, WarmupSpec

T = TypeVar("T")


def engine_thread(device: torch.device | None = None) -> ThreadPoolExecutor:
    """The one thread every engine call runs on (CUDA: with `device` current)."""

    def init() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="spindle-engine", initializer=init)


class ShardService(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(
        self, engine: ShardEngine, executor: ThreadPoolExecutor | None = None, order_grace_s: float = 2.0
    ) -> None:
        self.engine = engine
        self._executor = executor or engine_thread(engine.device)
        self._lock = asyncio.Lock()
        self._ran = asyncio.Condition(self._lock)  # notified after every engine call
        self._arrived: set[int] = set()  # seqs of the steps received and not finished
        self.order_grace_s = order_grace_s

    async def _serial(self, fn: Callable[[], T], seq: int = 0) -> T:
        async with self._ran:
            if seq:
                await self._wait_turn(seq)
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            finally:
                self._ran.notify_all()

    async def _wait_turn(self, seq: int) -> None:
        """Wait (lock held on return) until step `seq - 1` has run, or for as long as it keeps not arriving."""
        while seq > self.engine.last_seq + 1:
            try:
                await asyncio.wait_for(self._ran.wait(), self.order_grace_s)
            except TimeoutError:
                if seq - 1 not in self._arrived and seq > self.engine.last_seq + 1:
                    return  # it is not coming: the engine refuses this step as out of order

    async def Info(self, request: generate_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        info = self.engine.info()
        return generate_pb2.InfoResponse(
            model_type=info.model_type,
            dtype=info.dtype,
            device_type=info.device_type,
            block_size=info.block_size,
            world_size=info.world_size,
            attention_impl=info.attention_impl,
            vocab_size=info.vocab_size,
            max_position_embeddings=info.max_position_embeddings,
            support_chunking=info.support_chunking,
            eos_token_ids=list(info.eos_token_ids),
        )

    async def Health(self, request: generate_pb2.HealthRequest, context: grpc.aio.ServicerContext):
        await asyncio.to_thread(self.engine.health)
        return generate_pb2.HealthResponse()

    async def Warmup(self, request: generate_pb2.WarmupRequest, context: grpc.aio.ServicerContext):
        spec = WarmupSpec(
            max_input_tokens=request.max_input_tokens,
            max_prefill_tokens=request.max_prefill_tokens,
            max_total_tokens=request.max_total_tokens,
            max_batch_size=request.max_batch_size,
        )
        result = await self._serial(lambda: self.engine.warmup(spec))
        return generate_pb2.WarmupResponse(
            num_blocks=result.num_blocks,
            block_size=result.block_size,
            max_supported_total_tokens=result.max_supported_total_tokens,
            forward_base_ns=result.forward_base_ns,
            forward_token_ns=result.forward_token_ns,
            forward_context_ns=result.forward_context_ns,
        )

    async def Step(self, request: generate_pb2.StepRequest, context: grpc.aio.ServicerContext):
        def call() -> StepOutcome:
            ctx = self.engine.batch_context()
            return self.engine.step(StepCall(
                dropped_ids=tuple(request.dropped_ids),
                updates=tuple(RequestUpdate.from_proto(u) for u in request.updates),
                requests=tuple(request_from_proto(r, ctx) for r in request.requests),
                num_requests=request.num_requests,
                seq=request.seq,
            ))

        self._arrived.add(request.seq)
        try:
            outcome = await self._serial(call, request.seq)
        finally:
            self._arrived.discard(request.seq)
        return generate_pb2.StepResponse(
            generations=[g.to_proto() for g in outcome.generations],
            forward_ns=outcome.forward_ns,
            decode_ns=outcome.decode_ns,
            total_ns=outcome.total_ns,
            prepare_ns=outcome.prepare_ns,
            grammar_compile_ns=outcome.grammar_compile_ns,
            grammar_mask_ns=outcome.grammar_mask_ns,
        )

    async def ClearCache(self, request: generate_pb2.ClearCacheRequest, context: grpc.aio.ServicerContext):
        await self._serial(self.engine.clear)
        return generate_pb2.ClearCacheResponse()
