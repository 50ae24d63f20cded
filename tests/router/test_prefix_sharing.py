"""In-flight prefix sharing against a real shard engine (served in process over gRPC, so the test reads the
prompt tokens the shard itself computed): a request whose prefix another request is still prefilling
computes only its own suffix, streams the tokens it streams alone, and a leader that is cancelled half-way
leaves what it computed to its waiter. Greedy tokens equal transformers'; every block comes back."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
from spindle_router.config import SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.batcher import StepCost
from spindle_router.scheduler.loop import Scheduler
from spindle_router.scheduler.request import (
    EndEvent,
    SamplingParams,
    StoppingParams,
    TokenEvent,
    ValidRequest,
)
from spindle_router.shards import ShardClient

from tests.helpers.engine_driver import make_engine
from tests.helpers.inprocess_shard import serving
from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model, reference_greedy

pytestmark = pytest.mark.slow

BLOCK = 16
STEM = [1] + [(7 * i) % 400 + 5 for i in range(63)]  # BOS + 63: four full blocks


class Model:
    def __init__(self, tmp) -> None:
        path = make_tiny_model(tmp / "llama", TinyModelSpec(arch="llama", seed=23))
        self.reference, _ = load_reference(path)
        self.engine = make_engine(path, None, max_total_tokens=256, block_size=BLOCK)

    def ref(self, prompt: list[int], n: int) -> list[int]:
        return reference_greedy(self.reference, prompt, n)

    @property
    def computed(self) -> int:
        """Prompt tokens the shard's forwards computed so far."""
        return self.engine.runner.num_prompt_tokens_computed


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Model(tmp_path_factory.mktemp("prefix"))


def greedy(prompt: list[int], max_new: int) -> ValidRequest:
    return ValidRequest(input_ids=tuple(prompt), sampling=SamplingParams(),
                        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True))


def own(n: int, seed: int) -> list[int]:
    return [(13 * i + 31 * seed) % 450 + 20 for i in range(n)]


async def collect(stream) -> tuple[list[int], object]:
    tokens, last = [], None
    async for event in stream:
        if isinstance(event, (TokenEvent, EndEvent)):
            tokens.append(event.token.id)
        last = event
    return tokens, last


async def run(model: Model, config: SchedulerConfig, body) -> tuple[object, Metrics, Scheduler]:  # type: ignore[no-untyped-def]
    """Serve the engine, start a scheduler on it and await body(scheduler); then check every block is back."""
    socket_dir = tempfile.mkdtemp(prefix="spx-")
    async with serving(model.engine, os.path.join(socket_dir, "shard-0")) as path:
        client = await ShardClient.connect([path], timeout_s=30)
        try:
            warm = await client.warmup(max_input_tokens=200, max_prefill_tokens=config.max_batch_prefill_tokens,
                                       max_total_tokens=256)
            assert warm.forward_context_ns >= 0
            info = await client.info()
            metrics = Metrics()
            cost = StepCost(warm.forward_base_ns, warm.forward_token_ns, context_ns=warm.forward_context_ns)
            scheduler = Scheduler(client, config, warm.num_blocks, info.block_size, metrics, cost)
            scheduler.start()
            try:
                result = await body(scheduler)
                for _ in range(200):
                    if not scheduler.running and not scheduler.waiting:
                        break
                    await asyncio.sleep(0.01)
                scheduler.check_integrity()
            finally:
                await scheduler.stop(drain_timeout_s=5)
        finally:
            await client.close()
    return result, metrics, scheduler


def test_a_request_sharing_a_prefix_still_being_prefilled_computes_only_its_suffix(model: Model) -> None:
    leader, follower = STEM + own(40, 1), STEM + own(12, 2)

    async def together(scheduler: Scheduler):  # type: ignore[no-untyped-def]
        before = model.computed
        streams = [scheduler.submit(greedy(leader, 6)), scheduler.submit(greedy(follower, 6))]  # one step
        results = await asyncio.gather(*(collect(s) for s in streams))
        return results, model.computed - before

    async def alone(scheduler: Scheduler):  # type: ignore[no-untyped-def]
        return await collect(scheduler.submit(greedy(follower, 6)))

    # A 32-token budget: the leader prefills its 104 tokens over four steps, the follower queued behind it.
    (results, computed), metrics, scheduler = asyncio.run(
        run(model, SchedulerConfig(max_batch_prefill_tokens=32, prefix_caching=True), together))
    (alone_tokens, _), _, _ = asyncio.run(
        run(model, SchedulerConfig(max_batch_prefill_tokens=32, prefix_caching=False), alone))
    assert [tokens for tokens, _ in results] == [model.ref(leader, 6), model.ref(follower, 6)]
    assert results[1][0] == alone_tokens
    # Counted by the shard: the leader's 104 prompt tokens and the follower's 12; the stem once, not twice.
    assert computed == len(leader) + 12
    value = metrics.registry.get_sample_value
    assert value("spindle_prefix_cache_hit_tokens_total") == 64
    assert value("spindle_kv_blocks_used") == 0
    alloc = scheduler.blocks.allocator
    assert alloc.num_free_blocks + scheduler.blocks.num_cached_blocks == alloc.num_usable_blocks


def test_a_leader_cancelled_mid_prefill_leaves_what_it_computed_to_its_waiter(model: Model) -> None:
    leader, follower = STEM + own(60, 3), STEM + own(12, 4)

    async def body(scheduler: Scheduler):  # type: ignore[no-untyped-def]
        before = model.computed
        lead = scheduler.submit(greedy(leader, 20))
        wait = scheduler.submit(greedy(follower, 6))
        # Cancel the leader once it has computed two blocks of the stem, well before its prompt is done.
        while True:
            sr = next((s for s in scheduler.running if s.id == lead.request_id), None)
            if sr is not None and sr.computed_tokens >= 2 * BLOCK:
                break
            await asyncio.sleep(0.001)
        lead.cancel()
        tokens, end = await collect(wait)
        return sr, tokens, end, model.computed - before

    (sr, tokens, end, computed), metrics, scheduler = asyncio.run(
        run(model, SchedulerConfig(max_batch_prefill_tokens=16, prefix_caching=True), body))
    assert isinstance(end, EndEvent) and tokens == model.ref(follower, 6)
    assert sr.computed_tokens < len(leader)  # it left half-way
    hits = metrics.registry.get_sample_value("spindle_prefix_cache_hit_tokens_total")
    assert 2 * BLOCK <= hits <= 64 and hits % BLOCK == 0  # the waiter took over the blocks the leader computed
    # Counted by the shard: what the leader computed before it left, then only what the waiter lacked.
    assert computed == sr.computed_tokens + len(follower) - hits
    assert metrics.registry.get_sample_value("spindle_kv_blocks_used") == 0
    alloc = scheduler.blocks.allocator
    assert alloc.num_free_blocks + scheduler.blocks.num_cached_blocks == alloc.num_usable_blocks
