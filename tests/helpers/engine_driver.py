"""An in-process shard engine (no gRPC) and a small driver that plays the router for it.

The driver gives each request the blocks of its whole life up front, from block 1 on (block 0 is the
block padding rows of a CUDA-graph batch read, so it is never a request's), then sends Step calls
(dropping finished requests in the next one, as the router does) and records every generated token with
its log-prob.
"""

from __future__ import annotations

import math
from pathlib import Path

import tokenizers
import torch
from spindle_kernels import ops_for, triton_ops
from spindle_proto import generate_pb2 as pb
from spindle_server.distributed import Distributed
from spindle_server.engine.batch import StepCall, request_from_proto
from spindle_server.engine.cuda_graphs import DecodeGraphSettings
from spindle_server.engine.shard import CacheSettings, ShardEngine, WarmupSpec
from spindle_server.models.registry import load_model, read_model_config


def make_engine(
    path: Path,
    graphs: DecodeGraphSettings | None,
    *,
    max_total_tokens: int = 256,
    block_size: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    kv_cache_bytes: int = 4 << 20,
    attention_impl: str | None = None,
    use_triton: bool = False,
    max_prefill_tokens: int | None = None,  # None: twice max_total_tokens
) -> ShardEngine:
    """A warmed-up single-rank engine whose KV cache gets `kv_cache_bytes` (CPU and CUDA).

    `attention_impl` overrides the name the engine is told; `use_triton` takes the Triton kernels whatever the
    device (on CPU only under TRITON_INTERPRET=1).
    """
    dev = torch.device(device)
    dist = Distributed(rank=0, world_size=1, group=None)
    ops = triton_ops() if use_triton else ops_for(dev, block_size=block_size)
    model = load_model(path, dtype, dev, dist, ops)
    tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    # On CUDA too the cache gets exactly kv_cache_bytes (a cap there, far below what the device has free).
    settings = CacheSettings(block_size=block_size, kv_cache_bytes=kv_cache_bytes)
    engine = ShardEngine(model, read_model_config(path), tokenizer, dist, dev, dtype, attention_impl or ops.name,
                         settings, graphs)
    engine.warmup(WarmupSpec(max_input_tokens=max_total_tokens - 1, max_prefill_tokens=max_prefill_tokens or 2 * max_total_tokens,
                             max_total_tokens=max_total_tokens))
    return engine


class Driver:
    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.block_size = engine.settings.block_size
        self.next_block = 1
        self.live: list[int] = []  # unfinished requests, in admission order: what the next step computes
        self.to_drop: list[int] = []  # held by the engine, dropped by the next step (finished or dropped)
        self.out: dict[int, list[tuple[int, float]]] = {}  # request id -> (token, logprob) per step

    def request(self, rid: int, prompt_len: int, max_new_tokens: int, extra_blocks: int = 0) -> pb.Request:
        n = math.ceil((prompt_len + max_new_tokens) / self.block_size) + extra_blocks
        blocks = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        ids = [1] + [(37 * rid + 11 * i) % 400 + 3 for i in range(prompt_len - 1)]
        return pb.Request(
            id=rid, input_ids=ids, blocks=blocks,
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                     repetition_penalty=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens, ignore_eos_token=True),
        )

    def prefill(self, *requests: pb.Request) -> None:
        """Admit `requests` after the running ones, which advance in the same forward (a mixed step)."""
        ctx = self.engine.batch_context()
        self._step(tuple(request_from_proto(r, ctx) for r in requests))

    def decode(self) -> None:
        assert self.live
        self._step(())

    def drop(self, rid: int) -> None:
        """`rid` leaves with the next step (a cancellation)."""
        self.live.remove(rid)
        self.to_drop.append(rid)

    def _step(self, new: tuple) -> None:  # type: ignore[type-arg]
        self.live += [r.id for r in new]
        outcome = self.engine.step(StepCall(dropped_ids=tuple(self.to_drop), requests=new,
                                            num_requests=len(self.live)))
        self.to_drop = []
        for g in outcome.generations:
            self.out.setdefault(g.request_id, []).extend(zip(g.tokens.ids, g.tokens.logprobs))
            if g.generated_text is not None:
                self.drop(g.request_id)

    @property
    def is_running(self) -> bool:
        return bool(self.live)

    @property
    def batch_size(self) -> int:
        return len(self.live)


def replays(engine: ShardEngine) -> dict[int, int]:
    """Decode steps each graph size served so far."""
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    return dict(graphs.replays)
