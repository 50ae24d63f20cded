"""ShardClient over real `spindle-server serve` processes: one call to every rank, errors as ShardError."""

from __future__ import annotations

import asyncio

import pytest
from spindle_proto import generate_pb2 as pb
from spindle_router.config import SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.loop import Scheduler
from spindle_router.scheduler.request import (
    EndEvent,
    SamplingParams,
    StoppingParams,
    TokenEvent,
    ValidRequest,
)
from spindle_router.shards import ShardClient, ShardError

from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model, reference_greedy
from tests.server.shard_harness import ShardGroup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("shards") / "qwen2", TinyModelSpec(arch="qwen2", seed=5))
    group = ShardGroup(path, world_size=2)
    yield path, [f"{group.prefix}-{r}" for r in range(2)]
    group.close()


def test_connect_to_a_missing_socket_times_out_with_a_clear_error(tmp_path) -> None:
    async def main():
        with pytest.raises(ShardError, match="Could not connect to shard .*missing-0"):
            await ShardClient.connect([str(tmp_path / "missing-0")], timeout_s=0.5)

    asyncio.run(main())


def test_info_warmup_and_bad_calls_on_every_rank(two_ranks) -> None:
    _, uds = two_ranks

    async def main():
        client = await ShardClient.connect(uds, timeout_s=60)
        try:
            assert client.world_size == 2
            info = await client.info()
            assert (info.model_type, info.world_size, info.dtype, info.device_type) == ("qwen2", 2, "float32", "cpu")
            assert info.block_size == 16 and info.support_chunking and info.eos_token_ids
            num_blocks = (await client.warmup(max_input_tokens=63, max_prefill_tokens=64, max_total_tokens=64)).num_blocks
            assert num_blocks >= 4
            await client.health()
            params = pb.NextTokenChooserParameters(temperature=1, top_p=1, typical_p=1, repetition_penalty=1)

            def new(rid: int, blocks: list[int]) -> pb.Request:
                return pb.Request(id=rid, input_ids=[1, 5, 9], parameters=params, blocks=blocks,
                                  stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=5))

            with pytest.raises(ShardError, match=r"^Server error: .*empty step"):
                await client.step(num_requests=0, work_tokens=0)
            with pytest.raises(ShardError, match=r"^Server error: .*block"):
                await client.step([new(1, [num_blocks + 5])], num_requests=1, work_tokens=3)
            # A good step on both ranks: rank 0 answers the generation, rank 1 samples it too but answers none.
            answers = await client._call_all("Step", pb.StepRequest(requests=[new(3, [1])], num_requests=1), (), 3)
            assert [g.request_id for g in answers[0].generations] == [3]
            assert not answers[1].generations and answers[1].forward_ns > 0
            response = await client.step(num_requests=1, work_tokens=1)  # request 3 decodes on every rank
            assert [g.request_id for g in response.generations] == [3]
            with pytest.raises(ShardError, match=r"^Server error: .*request 3 is already held"):
                await client.step([new(3, [2])], num_requests=2, work_tokens=3)
            # Dropped on both ranks: a step naming it is refused everywhere.
            await client.step([new(4, [2])], dropped_ids=[3], num_requests=1, work_tokens=3)
            with pytest.raises(ShardError, match=r"^Server error: .*request 3, which the shard does not hold"):
                await client.step(dropped_ids=[3], num_requests=1, work_tokens=1)
            await client.clear_cache()
        finally:
            await client.close()
        with pytest.raises(ShardError, match="closed"):
            await client.health()

    asyncio.run(main())


def test_scheduler_over_two_ranks_equals_the_reference(two_ranks) -> None:
    path, uds = two_ranks
    model, _ = load_reference(path)
    prompts = [[1] + [(13 * i + k) % 400 + 3 for i in range(n)] for k, n in enumerate((5, 40, 21))]

    async def main():
        client = await ShardClient.connect(uds, timeout_s=60)
        num_blocks = (await client.warmup(max_input_tokens=63, max_prefill_tokens=24, max_total_tokens=64)).num_blocks
        scheduler = Scheduler(client, SchedulerConfig(max_batch_prefill_tokens=24), num_blocks, 16, Metrics())
        scheduler.start()
        try:
            streams = [scheduler.submit(ValidRequest(
                input_ids=tuple(p), sampling=SamplingParams(),
                stopping=StoppingParams(max_new_tokens=6, ignore_eos_token=True))) for p in prompts]
            out = []
            for s in streams:
                events = [e async for e in s]
                assert isinstance(events[-1], EndEvent)
                out.append([e.token.id for e in events if isinstance(e, (TokenEvent, EndEvent))])
            return out
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    got = asyncio.run(main())
    assert got == [reference_greedy(model, p, 6) for p in prompts]


def test_ranks_run_steps_in_seq_order_whichever_arrives_first(two_ranks) -> None:
    """With overlapped steps the router sends step N + 1 before N's answer, and gRPC may start them in either
    order on each rank. Here rank 0 receives every pair reversed and rank 1 in order: a rank that ran them in
    arrival order would wait at a collective for the other forever, or compute different tokens."""
    path, uds = two_ranks
    model, _ = load_reference(path)
    prompt = [1] + [(7 * i) % 300 + 3 for i in range(23)]  # 24 tokens: three chunks of 8, then a decode
    params = pb.NextTokenChooserParameters(temperature=1, top_p=1, typical_p=1, repetition_penalty=1)
    steps = [
        pb.StepRequest(requests=[pb.Request(
            id=1, input_ids=prompt, parameters=params, blocks=[0], chunk_len=8,
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2, ignore_eos_token=True))],
            num_requests=1),
        pb.StepRequest(updates=[pb.RequestUpdate(request_id=1, chunk_len=8)], num_requests=1),
        pb.StepRequest(updates=[pb.RequestUpdate(request_id=1, blocks=[1], chunk_len=8)], num_requests=1),
        pb.StepRequest(updates=[pb.RequestUpdate(request_id=1)], num_requests=1),
    ]
    for seq, step in enumerate(steps, start=1):
        step.seq = seq

    async def main():
        client = await ShardClient.connect(uds, timeout_s=60)
        await client.warmup(max_input_tokens=63, max_prefill_tokens=64, max_total_tokens=64)
        await client.clear_cache()  # a cleared shard expects step 1 next
        stubs = client._stubs
        try:
            answers: list[pb.StepResponse] = []
            for first, second in (steps[0:2], steps[2:4]):
                late = asyncio.Event()

                async def call(rank: int, step: pb.StepRequest, after: asyncio.Event | None = None):
                    if after is not None:
                        await asyncio.sleep(0.3)  # well after the other has reached the shard
                        after.set()
                    return await stubs[rank].Step(step, timeout=60)

                rank0 = [call(0, second), call(0, first, after=late)]  # reversed
                rank1 = [call(1, first), call(1, second)]
                out = await asyncio.gather(*rank0, *rank1)
                assert late.is_set()
                answers += [out[1], out[0]]  # rank 0's answers, in seq order
                assert not out[2].generations and not out[3].generations
            return [t for a in answers for g in a.generations for t in g.tokens.ids]
        finally:
            await client.clear_cache()
            await client.close()

    assert asyncio.run(main()) == reference_greedy(model, prompt, 2)
