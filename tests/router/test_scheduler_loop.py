"""Scheduler + ShardClient + a real `spindle-server serve` process on a tiny model.

The KV cache is made tiny so that requests must wait for blocks, get preempted and resumed, and evict
prefix-cache blocks; chunked prefill is forced by a small token budget. Greedy outputs must still equal
transformers token for token, and every block must come back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
from spindle_proto import generate_pb2 as pb
from spindle_router.config import SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.batcher import StepCost
from spindle_router.scheduler.loop import Scheduler
from spindle_router.scheduler.request import (
    EndEvent,
    ErrorEvent,
    PrefillEvent,
    SamplingParams,
    StoppingParams,
    TokenEvent,
    ValidRequest,
)
from spindle_router.shards import ShardClient

from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model, reference_greedy
from tests.server.shard_harness import ShardGroup

pytestmark = pytest.mark.slow

BLOCK = 16
BYTES_PER_BLOCK = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head dim x float32
NUM_BLOCKS = 12  # 11 usable: 176 KV tokens for requests that want up to ~50 each


class Shard:
    def __init__(self, tmp) -> None:
        self.path = make_tiny_model(tmp / "llama", TinyModelSpec(arch="llama", seed=21))
        self.reference, _ = load_reference(self.path)
        self.group = ShardGroup(self.path, kv_cache_bytes=NUM_BLOCKS * BYTES_PER_BLOCK)
        self.uds = [f"{self.group.prefix}-0"]
        self._refs: dict[tuple[int, ...], list[int]] = {}

    def ref(self, prompt: tuple[int, ...], n: int) -> list[int]:
        if (*prompt, -n) not in self._refs:
            self._refs[(*prompt, -n)] = reference_greedy(self.reference, list(prompt), n)
        return self._refs[(*prompt, -n)]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    s = Shard(tmp_path_factory.mktemp("sched"))
    yield s
    s.group.close()


def greedy(prompt: list[int], max_new: int) -> ValidRequest:
    return ValidRequest(
        input_ids=tuple(prompt), sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True),
    )


def prompt(n: int, seed: int, stem: list[int] | None = None) -> list[int]:
    """n token ids: BOS, then `stem` (shared with other prompts), then ids depending on `seed`."""
    body = [(11 * i + 29 * seed) % 480 + 3 for i in range(n)]
    return ([1] + (stem or []) + body)[:n]


async def started(shard: Shard, config: SchedulerConfig) -> tuple[Scheduler, ShardClient, Metrics]:
    client = await ShardClient.connect(shard.uds, timeout_s=60)
    await client.clear_cache()
    warm = await client.warmup(max_input_tokens=48, max_prefill_tokens=config.max_batch_prefill_tokens,
                               max_total_tokens=64, max_batch_size=0)
    assert warm.num_blocks == NUM_BLOCKS
    assert warm.forward_base_ns > 0 and warm.forward_token_ns >= 0
    info = await client.info()
    metrics = Metrics()
    step_cost = StepCost(warm.forward_base_ns, warm.forward_token_ns, context_ns=warm.forward_context_ns)
    scheduler = Scheduler(client, config, warm.num_blocks, info.block_size, metrics, step_cost)
    scheduler.start()
    return scheduler, client, metrics


async def collect(stream) -> tuple[list[int], object]:
    tokens, last = [], None
    async for event in stream:
        if isinstance(event, (TokenEvent, EndEvent)):
            tokens.append(event.token.id)
        last = event
    return tokens, last


async def wait_idle(scheduler: Scheduler) -> None:
    for _ in range(200):
        if not scheduler.running and not scheduler.waiting and scheduler._inbox.empty() and scheduler._flight is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("scheduler did not go idle")


@pytest.mark.parametrize("overlap", [False, True], ids=["overlap-off", "overlap-on"])
def test_concurrent_requests_under_kv_pressure_equal_the_reference(shard: Shard, overlap: bool) -> None:
    """Chunked prefill, prefix-cache hits and evictions, preemption: greedy tokens equal transformers' with
    the steps overlapped or not (so the two equal each other), and every block comes back."""
    stem = [(5 * i) % 400 + 7 for i in range(40)]  # shared by several prompts: prefix-cache hits
    cases = [
        (prompt(37, 0, stem), 14), (prompt(45, 1, stem), 10), (prompt(5, 2), 16), (prompt(33, 3), 12),
        (prompt(44, 4, stem), 12), (prompt(17, 5), 20), (prompt(2, 6), 9), (prompt(48, 7, stem), 15),
    ]
    expected = [shard.ref(tuple(p), n) for p, n in cases]

    async def main():
        config = SchedulerConfig(max_batch_prefill_tokens=32, max_batch_total_tokens=None, prefix_caching=True,
                                 overlap_steps=overlap)
        scheduler, client, metrics = await started(shard, config)
        evict = scheduler.blocks.cache.evict

        def counting_evict(num_blocks: int) -> int:
            freed = evict(num_blocks)
            evicted.append(freed)
            return freed

        scheduler.blocks.cache.evict = counting_evict
        try:
            streams = []
            for p, n in cases:
                streams.append(scheduler.submit(greedy(p, n)))
                await asyncio.sleep(0)  # arrivals spread over the first steps
            results = await asyncio.gather(*(collect(s) for s in streams))
            # Second round: the stem is cached now (unless evicted), and the same answers come back.
            again = await asyncio.gather(*(collect(scheduler.submit(greedy(p, n))) for p, n in cases[:4]))
            await wait_idle(scheduler)
            scheduler.check_integrity()
            return results, again, metrics
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    evicted: list[int] = []
    results, again, metrics = asyncio.run(main())
    assert sum(evicted) > 0, "the prefix cache was meant to be evicted for room"
    for (tokens, end), want in zip(results, expected):
        assert isinstance(end, EndEvent), end
        assert tokens == want
        assert end.generated_tokens == len(want) and end.finish_reason == "length"
    for (tokens, end), want in zip(again, expected[:4]):
        assert isinstance(end, EndEvent) and tokens == want
    value = metrics.registry.get_sample_value
    assert value("spindle_preemptions_total") > 0, "the KV cache was meant to be too small for everyone"
    assert value("spindle_prefix_cache_hit_tokens_total") > 0
    assert value("spindle_kv_blocks_used") == 0
    assert value("tgi_batch_current_size") == 0 and value("tgi_queue_size") == 0
    assert value("tgi_batch_concat_total", {"reason": "chunking"}) > 0
    assert value("tgi_batch_inference_success_total", {"method": "decode"}) > 0
    assert value("spindle_kv_blocks_total") == NUM_BLOCKS


@pytest.mark.parametrize("overlap", [False, True], ids=["overlap-off", "overlap-on"])
def test_cancel_frees_blocks_at_once_and_others_continue(shard: Shard, overlap: bool) -> None:
    long_prompt, other_prompt = prompt(30, 11), prompt(20, 12)

    async def main():
        scheduler, client, metrics = await started(shard, SchedulerConfig(max_batch_prefill_tokens=64,
                                                                          prefix_caching=False,
                                                                          overlap_steps=overlap))
        try:
            doomed = scheduler.submit(greedy(long_prompt, 40))
            other = scheduler.submit(greedy(other_prompt, 12))
            seen = 0
            async for _event in doomed:
                seen += 1
                if seen == 3:
                    doomed.cancel()
                    break
            doomed.cancel()  # twice is harmless
            result = await collect(other)
            await wait_idle(scheduler)
            scheduler.check_integrity()
            return result, metrics, scheduler
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    (tokens, end), metrics, scheduler = asyncio.run(main())
    assert isinstance(end, EndEvent) and tokens == shard.ref(tuple(other_prompt), 12)
    assert metrics.registry.get_sample_value("spindle_kv_blocks_used") == 0
    # The cancelled request left the shard with the next step (no call of its own).
    assert metrics.registry.get_sample_value("tgi_batch_filter_duration_count", {"method": "decode"}) >= 1
    assert scheduler.blocks.allocator.num_free_blocks == NUM_BLOCKS - 1


@pytest.mark.parametrize("overlap", [False, True], ids=["overlap-off", "overlap-on"])
def test_stop_token_ends_a_request_early_with_overlap_or_not(shard: Shard, overlap: bool) -> None:
    """A request that stops on a token (not on length) is still in the step sent after the one that stopped
    it when steps overlap: that step's token for it reaches nobody, the others are unaffected."""
    prompts = [prompt(9, 50), prompt(26, 51), prompt(14, 52)]
    full = [shard.ref(tuple(p), 12) for p in prompts]
    stop_at = 4
    stopper = full[0][stop_at]  # the first request stops on its 5th token (or earlier, if it repeats)
    expected_first = full[0][: full[0].index(stopper) + 1]

    async def main():
        config = SchedulerConfig(max_batch_prefill_tokens=16, overlap_steps=overlap)  # the 26 tokens: 2 chunks
        scheduler, client, metrics = await started(shard, config)
        try:
            first = scheduler.submit(ValidRequest(
                input_ids=tuple(prompts[0]), sampling=SamplingParams(),
                stopping=StoppingParams(max_new_tokens=12, ignore_eos_token=True, stop_token_ids=(stopper,))))
            others = [scheduler.submit(greedy(p, 12)) for p in prompts[1:]]
            results = await asyncio.gather(collect(first), *(collect(s) for s in others))
            await wait_idle(scheduler)
            scheduler.check_integrity()
            assert scheduler.blocks.num_request_blocks(scheduler.running) == 0
            return results
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    (tokens, end), *rest = asyncio.run(main())
    assert isinstance(end, EndEvent) and end.finish_reason == "eos_token" and tokens == expected_first
    assert end.generated_tokens == len(expected_first) < 12
    for (tokens, end), want in zip(rest, full[1:]):
        assert isinstance(end, EndEvent) and tokens == want


def test_shard_failure_errors_every_running_request_and_marks_unhealthy(shard: Shard) -> None:
    async def main():
        scheduler, client, _ = await started(shard, SchedulerConfig(max_batch_prefill_tokens=64))
        streams = [scheduler.submit(greedy(prompt(10 + k, 20 + k), 30)) for k in range(3)]
        first = await streams[0].__aiter__().__anext__()
        assert isinstance(first, TokenEvent)
        await client.close()  # every later call fails as if the shard had gone
        ends = [(await collect(s))[1] for s in streams]
        healthy_before = scheduler.is_healthy
        health = await scheduler.health_check()
        await scheduler.stop(drain_timeout_s=1)
        scheduler.check_integrity()
        return ends, healthy_before, health, scheduler

    ends, healthy_before, health, scheduler = asyncio.run(main())
    assert all(isinstance(e, ErrorEvent) and "shard" in e.message for e in ends), ends
    assert not healthy_before and not health
    assert scheduler.blocks.num_request_blocks(scheduler.running) == 0
    shard.group.call("ClearCache", pb.ClearCacheRequest())  # the batch the closed client left behind


def test_stop_drains_then_refuses_and_oversized_requests_are_refused(shard: Shard) -> None:
    async def main():
        scheduler, client, _ = await started(shard, SchedulerConfig(max_batch_prefill_tokens=64))
        try:
            too_big = await collect(scheduler.submit(greedy(prompt(40, 30), NUM_BLOCKS * BLOCK)))
            running = scheduler.submit(greedy(prompt(12, 31), 6))
            await scheduler.stop(drain_timeout_s=60)  # waits for it
            done = await collect(running)
            refused = await collect(scheduler.submit(greedy(prompt(12, 31), 6)))
            return too_big, done, refused
        finally:
            await client.close()

    too_big, done, refused = asyncio.run(main())
    assert isinstance(too_big[1], ErrorEvent) and "KV blocks" in too_big[1].message
    assert isinstance(done[1], EndEvent) and done[0] == shard.ref(tuple(prompt(12, 31)), 6)
    assert isinstance(refused[1], ErrorEvent) and "shutting down" in refused[1].message
    assert math.isfinite(done[1].started_at - done[1].queued_at)


def test_seeded_sampling_survives_preemption_and_details_are_mapped(shard: Shard) -> None:
    """Sampled requests preempted and resumed stream exactly the tokens they stream alone (the shard
    replays generated_ids into the sampler's step); prompt log-probs and top tokens reach the events."""
    cases = [(prompt(30 + 3 * k, 40 + k), 18) for k in range(6)]

    def sampled(p: list[int], n: int) -> ValidRequest:
        return ValidRequest(
            input_ids=tuple(p), sampling=SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=1234),
            stopping=StoppingParams(max_new_tokens=n, ignore_eos_token=True), top_n_tokens=2,
            prefill_logprobs=True,
        )

    async def main():
        scheduler, client, metrics = await started(shard, SchedulerConfig(max_batch_prefill_tokens=32))
        try:
            alone = [await collect_events(scheduler.submit(sampled(p, n))) for p, n in cases]  # one at a time
            assert metrics.registry.get_sample_value("spindle_preemptions_total") == 0
            together = await asyncio.gather(*(collect_events(scheduler.submit(sampled(p, n))) for p, n in cases))
            await wait_idle(scheduler)
            scheduler.check_integrity()
            return alone, together, metrics
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    alone, together, metrics = asyncio.run(main())
    assert metrics.registry.get_sample_value("spindle_preemptions_total") > 0
    for (p, n), a, t in zip(cases, alone, together):
        ids = [e.token.id for e in a if isinstance(e, (TokenEvent, EndEvent))]
        assert len(ids) == n and ids == [e.token.id for e in t if isinstance(e, (TokenEvent, EndEvent))]
        assert isinstance(a[-1], EndEvent) and a[-1].seed == 1234
        prefill = [e for e in t if isinstance(e, PrefillEvent)]
        assert len(prefill) == 1 and t[0] is prefill[0]  # once, first, even for a request that was resumed
        assert [tok.id for tok in prefill[0].tokens] == p and prefill[0].tokens[0].logprob is None
        assert all(tok.logprob is not None and tok.logprob <= 0 for tok in prefill[0].tokens[1:])
        assert all(len(e.top_tokens) == 2 for e in t[1:])


async def collect_events(stream) -> list:
    return [e async for e in stream]


def test_requests_sharing_a_prefix_in_prefill_compute_it_once(shard: Shard) -> None:
    stem = [(7 * i) % 400 + 5 for i in range(47)]  # BOS + 47: three full blocks shared by all three prompts
    cases = [(prompt(58, s, stem), 6) for s in range(3)]
    expected = [shard.ref(tuple(p), n) for p, n in cases]

    async def main():
        config = SchedulerConfig(max_batch_prefill_tokens=16, prefix_caching=True)  # the stem spans 3 steps
        scheduler, client, metrics = await started(shard, config)
        try:
            streams = [scheduler.submit(greedy(p, n)) for p, n in cases]  # all queued before the first step
            results = await asyncio.gather(*(collect(s) for s in streams))
            await wait_idle(scheduler)
            scheduler.check_integrity()
            return results, metrics
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    results, metrics = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    value = metrics.registry.get_sample_value
    # The second and third waited for the first's stem instead of prefilling it beside it: 2 x 48 cached.
    assert value("spindle_prefix_cache_hit_tokens_total") == 2 * 48
    assert value("spindle_kv_blocks_used") == 0


def test_a_reader_that_falls_behind_is_cancelled_and_its_blocks_freed(shard: Shard, monkeypatch) -> None:
    """A stream whose events nobody reads holds at most MAX_BUFFERED_EVENTS; past it the request is cancelled,
    the backlog replaced by one error event, its blocks freed; a stream read as it comes is unaffected."""
    from spindle_router.scheduler import loop

    monkeypatch.setattr(loop, "MAX_BUFFERED_EVENTS", 4)
    unread_prompt, read_prompt = prompt(12, 31), prompt(14, 32)

    async def main():
        scheduler, client, metrics = await started(shard, SchedulerConfig(max_batch_prefill_tokens=64,
                                                                          prefix_caching=False))
        try:
            unread = scheduler.submit(greedy(unread_prompt, 30))
            result = await collect(scheduler.submit(greedy(read_prompt, 30)))  # runs beside it, read at once
            await wait_idle(scheduler)
            scheduler.check_integrity()
            backlog = [e async for e in unread]
            return result, backlog, metrics
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    (tokens, end), backlog, metrics = asyncio.run(main())
    assert isinstance(end, EndEvent) and tokens == shard.ref(tuple(read_prompt), 30)
    assert len(backlog) == 1 and isinstance(backlog[0], ErrorEvent)
    assert "read too slowly" in backlog[0].message
    assert metrics.registry.get_sample_value("spindle_kv_blocks_used") == 0


def test_equal_chunks_inside_one_block_are_each_sent(shard: Shard) -> None:
    # Budget 5 with block 16: the prompt goes in chunks of 5, the second and third inside the first block
    # (no new blocks). The shard forgets a chunk after each step, so every chunk must be sent again; an
    # unsent one made the shard compute the whole rest of the prompt while the router counted 5.
    cases = [(prompt(23, 8), 6), (prompt(14, 9), 5)]
    expected = [shard.ref(tuple(p), n) for p, n in cases]

    async def main():
        config = SchedulerConfig(max_batch_prefill_tokens=5, prefix_caching=False)
        scheduler, client, metrics = await started(shard, config)
        try:
            results = [await collect(scheduler.submit(greedy(p, n))) for p, n in cases]
            await wait_idle(scheduler)
            scheduler.check_integrity()
            return results
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected


def test_chunks_beside_decode_rows_teach_the_chunk_price(shard: Shard, monkeypatch) -> None:
    """A prompt arriving while another request decodes is chunked beside it; each such step reports its one
    decode row and its chunk's probe price, and the price the budget uses moves off the probes' own."""
    seen: list[tuple[int, float]] = []
    observe = StepCost.observe_mixed_step

    def recording(self, decodes, probe_ns, forward_ns, weight=0.2):
        seen.append((decodes, probe_ns))
        return observe(self, decodes, probe_ns, forward_ns, weight)

    monkeypatch.setattr(StepCost, "observe_mixed_step", recording)
    first, second = (prompt(5, 0), 24), (prompt(48, 1), 4)
    expected = [shard.ref(tuple(p), n) for p, n in (first, second)]

    async def main():
        config = SchedulerConfig(max_batch_prefill_tokens=16, prefix_caching=False)
        scheduler, client, _ = await started(shard, config)
        # The tiny model's probes find tokens (nearly) free: price one at a tenth of a one-token step, so that
        # chunks beside the decode row are capped (a few tokens each) and priced.
        base = scheduler.limits.step_cost.base_ns
        scheduler.limits = dataclasses.replace(scheduler.limits, step_cost=StepCost(base, base // 10))
        try:
            events = aiter(scheduler.submit(greedy(*first)))
            head = await anext(events)  # decoding from here on
            rest = asyncio.ensure_future(collect(events))
            results = [await collect(scheduler.submit(greedy(*second))), await rest]
            await wait_idle(scheduler)
            return head, results, scheduler.limits.step_cost
        finally:
            await scheduler.stop(drain_timeout_s=5)
            await client.close()

    head, (late, early), cost = asyncio.run(main())
    assert [head.token.id] + early[0] == expected[0] and late[0] == expected[1]
    assert seen and all(decodes == 1 and probe_ns > 0 for decodes, probe_ns in seen)
    assert cost.chunk_scale != 1.0
