"""A shard engine served over gRPC inside the test process.

The real `ShardService` and error interceptor on a unix socket: a router-side test drives it exactly as it
drives a shard process (`ShardClient.connect([path])`), and can still read what the engine itself counted,
e.g. `engine.runner.num_prompt_tokens_computed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from spindle_proto import generate_pb2_grpc
from spindle_server.engine.shard import ShardEngine
from spindle_server.interceptor import ErrorInterceptor
from spindle_server.service import ShardService, engine_thread


@asynccontextmanager
async def serving(engine: ShardEngine, socket_path: str) -> AsyncIterator[str]:
    """Serve `engine` on unix://`socket_path` until the block exits; yields the path."""
    executor = engine_thread(engine.device)
    server = grpc.aio.server(interceptors=[ErrorInterceptor(rank=0)])
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(ShardService(engine, executor), server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        yield socket_path
    finally:
        await server.stop(grace=None)
        executor.shutdown(wait=True)
