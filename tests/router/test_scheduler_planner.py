"""The step planner on synthetic queues: budgets, FIFO, chunk sizes, on-demand blocks, preemption."""

from __future__ import annotations

import random
from collections import deque

import pytest
from spindle_router.scheduler.batcher import (
    MAX_CHUNK_SCALE,
    MIN_CHUNK_SCALE,
    StepCost,
    StepLimits,
    StepPlan,
    plan_step,
)
from spindle_router.scheduler.block_manager import BlockManager
from spindle_router.scheduler.request import SamplingParams, ScheduledRequest, StoppingParams, ValidRequest

BS = 4


def req(rid: int, prompt: list[int] | int, max_new: int = 4) -> ScheduledRequest:
    ids = tuple(prompt) if isinstance(prompt, list) else tuple(range(100 + rid * 1000, 100 + rid * 1000 + prompt))
    vr = ValidRequest(input_ids=ids, sampling=SamplingParams(), stopping=StoppingParams(max_new_tokens=max_new))
    return ScheduledRequest(id=rid, request=vr, queued_at=0.0)


def finish_step(plan: StepPlan, running: list[ScheduledRequest], blocks: BlockManager) -> list[ScheduledRequest]:
    """Play the shard: advance counters; a step reaching the end of the context samples a token."""
    done = []
    for sr in plan.running + plan.admitted:
        sr.computed_tokens += sr.scheduled_tokens
        sr.scheduled_tokens = 0
        blocks.cache_prompt(sr)
        if sr.computed_tokens == sr.context_len:
            sr.generated_ids.append(sr.id % 7 + sr.num_generated)
            if sr.num_generated == sr.request.stopping.max_new_tokens:
                done.append(sr)
    for sr in done:
        running.remove(sr)
        blocks.release(sr)
    return done


def test_chunked_prefill_rides_with_decodes() -> None:
    blocks = BlockManager(64, BS, prefix_caching=False)
    running: list[ScheduledRequest] = []
    waiting = deque([req(0, 5), req(1, 30), req(2, 3)])
    limits = StepLimits(max_prefill_tokens=12)
    plan = plan_step(running, waiting, blocks, limits)
    assert [(s.id, s.scheduled_tokens) for s in plan.admitted] == [(0, 5), (1, 7)]  # 1 is cut to the budget
    assert list(waiting) == [waiting[0]] and waiting[0].id == 2  # FIFO: 2 waits behind 1's chunking
    assert [len(s.blocks) for s in plan.admitted] == [2, 2]
    finish_step(plan, running, blocks)
    plan = plan_step(running, waiting, blocks, limits)
    # 0 decodes (1 token); 1 continues its prompt with what is left: 11; nothing left for 2.
    assert [(s.id, s.scheduled_tokens) for s in plan.running] == [(0, 1), (1, 11)]
    assert plan.admitted == [] and plan.num_tokens == 12
    assert plan.new_blocks == {1: [blocks_of(running, 1)[2], blocks_of(running, 1)[3], blocks_of(running, 1)[4]]}
    finish_step(plan, running, blocks)
    plan = plan_step(running, waiting, blocks, limits)
    assert [(s.id, s.scheduled_tokens) for s in plan.running] == [(0, 1), (1, 11)]
    assert [(s.id, s.scheduled_tokens) for s in plan.admitted] == []
    finish_step(plan, running, blocks)
    plan = plan_step(running, waiting, blocks, limits)
    assert [(s.id, s.scheduled_tokens) for s in plan.running] == [(0, 1), (1, 1)]  # 1's prompt completed
    assert [(s.id, s.scheduled_tokens) for s in plan.admitted] == [(2, 3)]
    blocks.check_integrity(running)


def blocks_of(running: list[ScheduledRequest], rid: int) -> list[int]:
    return next(s.blocks for s in running if s.id == rid)


def test_batch_size_and_capacity_budgets_stop_admission_in_order() -> None:
    blocks = BlockManager(64, BS, prefix_caching=False)
    running: list[ScheduledRequest] = []
    waiting = deque([req(i, 4, max_new=4) for i in range(5)])
    plan = plan_step(running, waiting, blocks, StepLimits(max_prefill_tokens=100, max_batch_size=2))
    assert [s.id for s in plan.admitted] == [0, 1]
    running2: list[ScheduledRequest] = []
    waiting2 = deque([req(i, 4, max_new=4) for i in range(5)])
    plan = plan_step(running2, waiting2, BlockManager(64, BS), StepLimits(100, max_total_tokens=10))
    assert [s.id for s in plan.admitted] == [0, 1]  # held 4 + prompt 4 <= 10 < held 8 + prompt 4
    # A request larger than the capacity budget still runs alone (or it never would).
    plan = plan_step([], deque([req(9, 30, max_new=4)]), BlockManager(64, BS), StepLimits(100, max_total_tokens=20))
    assert [s.id for s in plan.admitted] == [9]


def test_prefix_hit_skips_cached_blocks_and_full_hit_leaves_one_block() -> None:
    blocks = BlockManager(64, BS)
    running: list[ScheduledRequest] = []
    limits = StepLimits(100)
    first = req(0, list(range(10)), max_new=1)
    plan = plan_step(running, deque([first]), blocks, limits)
    finish_step(plan, running, blocks)
    assert running == [] and blocks.num_cached_blocks == 2
    again = req(1, list(range(10)) + [50, 51], max_new=1)
    plan = plan_step(running, deque([again]), blocks, limits)
    assert again.cached_tokens == 8 and again.scheduled_tokens == 4
    finish_step(plan, running, blocks)
    exact = req(2, list(range(8)), max_new=1)  # the whole prompt is cached: one block is given back
    plan = plan_step(running, deque([exact]), blocks, limits)
    assert exact.cached_tokens == 4 and exact.scheduled_tokens == 4
    logprobs = ScheduledRequest(id=3, request=ValidRequest(
        input_ids=tuple(range(10)), sampling=SamplingParams(), stopping=StoppingParams(1), prefill_logprobs=True),
        queued_at=0.0)
    plan = plan_step(running, deque([logprobs]), blocks, limits)
    assert logprobs.cached_tokens == 0 and logprobs.scheduled_tokens == 10
    blocks.check_integrity(running)


def test_preemption_picks_the_most_recent_and_requeues_it_at_the_front() -> None:
    blocks = BlockManager(7, BS, prefix_caching=False)  # 6 usable blocks
    running: list[ScheduledRequest] = []
    a, b, c = req(0, 8, max_new=12), req(1, 8, max_new=12), req(2, 4, max_new=12)
    waiting = deque([a, b, c])
    limits = StepLimits(100)
    plan = plan_step(running, waiting, blocks, limits)
    assert [s.id for s in plan.admitted] == [0, 1, 2]  # 2 + 2 + 1 of 6 blocks
    finish_step(plan, running, blocks)
    # Next step: a and b cross a block boundary (position 8), one block is free: a gets it, b preempts c.
    plan = plan_step(running, waiting, blocks, limits)
    blocks.check_integrity(running)
    assert plan.preempted == [c] and list(waiting) == [c] and [s.id for s in plan.running] == [0, 1]
    assert len(plan.new_blocks[0]) == 1 and len(plan.new_blocks[1]) == 1
    assert c.blocks == [] and c.computed_tokens == 0 and c.generated_ids == [2 % 7]  # resent as generated_ids
    assert plan.admitted == []  # a step that preempted admits nobody
    finish_step(plan, running, blocks)
    # c comes back first when room returns, recomputing prompt + what it generated.
    while c not in running:
        plan = plan_step(running, waiting, blocks, limits)
        finish_step(plan, running, blocks)
    assert c.resumed_len == 1 and c.generated_ids[0] == 2


@pytest.mark.parametrize("seed", range(12))
def test_randomized_budgets_fifo_and_accounting(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(12, 40)
    blocks = BlockManager(num_blocks, BS, prefix_caching=rng.random() < 0.7)
    limits = StepLimits(
        max_prefill_tokens=rng.randint(4, 40),
        max_total_tokens=rng.choice([None, 60, 120]),
        max_batch_size=rng.choice([None, 2, 5]),
    )
    stems = [[rng.randint(0, 3) for _ in range(24)] for _ in range(2)]
    capacity = (num_blocks - 1) * BS
    pending = []
    for i in range(30):
        max_new = rng.randint(1, 10)
        n = rng.randint(1, min(30, capacity - max_new))
        prompt = (rng.choice(stems) + [rng.randint(0, 3) for _ in range(30)])[:n]
        pending.append(req(i, prompt, max_new=max_new))
    waiting: deque[ScheduledRequest] = deque()
    running: list[ScheduledRequest] = []
    finished: list[ScheduledRequest] = []
    first_admission: list[int] = []
    steps = 0
    while pending or waiting or running:
        for _ in range(rng.randint(0, 3)):
            if pending:
                waiting.append(pending.pop(0))
        before = [s.id for s in running]
        plan = plan_step(running, waiting, blocks, limits)
        steps += 1
        assert steps < 5000, "no progress"
        blocks.check_integrity(running)
        # Budgets.
        assert plan.num_tokens <= limits.max_prefill_tokens
        if limits.max_batch_size:
            assert len(running) <= limits.max_batch_size
        if limits.max_total_tokens and plan.admitted and (plan.running or len(plan.admitted) > 1):
            held = sum(len(s.blocks) for s in plan.running + plan.admitted[:-1]) * BS
            assert held + plan.admitted[-1].prompt_len <= limits.max_total_tokens
        for s in plan.running + plan.admitted:
            assert 1 <= s.scheduled_tokens <= s.remaining_tokens
            assert len(s.blocks) * BS >= s.computed_tokens + s.scheduled_tokens  # covered
            assert len(s.blocks) == -(-(s.computed_tokens + s.scheduled_tokens) // BS)  # and no more (on demand)
            assert s.cached_tokens % BS == 0 and s.cached_tokens < s.context_len
        # Preemption takes the youngest; the preempted go to the front in their admission order.
        if plan.preempted:
            kept = [s.id for s in plan.running]
            assert kept == before[: len(kept)]
            assert [s.id for s in plan.preempted] == before[len(kept):][::-1]
            assert [s.id for s in list(waiting)[: len(plan.preempted)]] == before[len(kept):]
            assert not plan.admitted
        # FIFO: first admissions happen in submission order.
        for s in plan.admitted:
            if s.id not in first_admission:
                first_admission.append(s.id)
        assert running == plan.running + plan.admitted
        finished += finish_step(plan, running, blocks)
        blocks.check_integrity(running)
    assert first_admission == sorted(first_admission)
    assert sorted(s.id for s in finished) == list(range(30))
    for s in finished:
        assert s.generated_ids == [s.id % 7 + k for k in range(s.request.stopping.max_new_tokens)]
    assert blocks.num_request_blocks(running) == 0
    assert blocks.allocator.num_free_blocks + blocks.num_cached_blocks == blocks.allocator.num_usable_blocks


def test_step_cost_budget_follows_the_slowdown() -> None:
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000)  # 30 ms + 1 ms per further token
    # Four decodes take 33 ms alone; 1.5x is 49.5 ms: 16.5 ms for prefill tokens, 16 of them.
    assert cost.decode_only_ns(4) == 33_000_000
    assert cost.max_chunk(start=0, limit=1000, spare_ns=0.5 * cost.decode_only_ns(4)) == 16
    assert cost.max_chunk(start=5000, limit=1000, spare_ns=16.5e6) == 16  # no context term: position is free
    assert cost.max_chunk(0, 10, spare_ns=0) == 0  # no slowdown: room for the decodes only
    assert StepCost(30, 0).max_chunk(0, 2**30, spare_ns=0) == 2**30  # no per-token cost measured: no limit


def test_a_chunk_costs_its_tokens_and_the_context_they_attend() -> None:
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000, context_ns=500)
    # 100 tokens from position 0: 100 x 1 ms (their attention among themselves is in the token price).
    assert cost.chunk_ns(100, 0) == 100_000_000
    # The same 100 tokens after 2000 positions also attend to those: 200,000 pairs more.
    assert cost.chunk_ns(100, 2000) == cost.chunk_ns(100, 0) + 500 * 100 * 2000
    assert cost.chunk_ns(0, 2000) == 0 and cost.chunk_ns(1, 0) == 1_000_000
    spare = 50e6
    early, late = cost.max_chunk(0, 10_000, spare), cost.max_chunk(4000, 10_000, spare)
    assert cost.chunk_ns(early, 0) <= spare < cost.chunk_ns(early + 1, 0)  # the longest that fits
    assert cost.chunk_ns(late, 4000) <= spare < cost.chunk_ns(late + 1, 4000)
    assert early == 50 and late == 16  # 1 ms + 2 ms of context per token at position 4000
    assert cost.max_chunk(4000, 10, spare) == 10  # capped by what is asked


def test_long_prompt_chunks_shrink_as_its_context_grows_and_every_step_keeps_the_pace() -> None:
    """With a context term, each step beside decodes stays within the slowdown at every position (the old
    position-free price let late chunks run over), and the early chunks are as large as before."""
    slowdown = 2.0
    flat = StepCost(base_ns=30_000_000, token_ns=100_000)
    deep = StepCost(base_ns=30_000_000, token_ns=100_000, context_ns=50)  # a token at 2000 costs 2x one at 0
    chunks: dict[float, list[tuple[int, int]]] = {}
    for cost in (flat, deep):
        blocks = BlockManager(1024, BS, prefix_caching=False)
        limits = StepLimits(max_prefill_tokens=4096, step_cost=cost, max_decode_slowdown=slowdown)
        running: list[ScheduledRequest] = []
        waiting = deque([req(i, 3, max_new=10_000) for i in range(16)])
        finish_step(plan_step(running, waiting, blocks, limits), running, blocks)  # 16 decoding
        long = req(99, 2000, max_new=1)
        waiting.append(long)
        chunks[cost.context_ns] = []
        while long.computed_tokens < long.prompt_len:
            plan = plan_step(running, waiting, blocks, limits)
            if long in plan.running + plan.admitted:
                chunks[cost.context_ns].append((long.computed_tokens, long.scheduled_tokens))
                # The true (deep) cost of this step's prefill stays within the slowdown when priced by it.
                if cost is deep:
                    assert deep.chunk_ns(long.scheduled_tokens, long.computed_tokens) <= (
                        (slowdown - 1) * deep.decode_only_ns(16))
            finish_step(plan, running, blocks)
    sizes = [n for _, n in chunks[50]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1.6 * sizes[-2]  # shrink with the context
    assert sizes[0] >= 0.9 * chunks[0][0][1]  # the first chunk is about what the flat price gives
    # The flat price would have run the late chunks over: its chunk at the end costs well past the slowdown.
    start, n = chunks[0][-2]
    assert deep.chunk_ns(n, start) > 1.5 * (slowdown - 1) * deep.decode_only_ns(16)


def test_stall_free_budget_chunks_a_long_prompt_beside_decodes() -> None:
    blocks = BlockManager(256, BS, prefix_caching=False)
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000)
    limits = StepLimits(max_prefill_tokens=512, step_cost=cost, max_decode_slowdown=1.5)
    running: list[ScheduledRequest] = []
    waiting = deque([req(i, 3, max_new=50) for i in range(4)])
    plan = plan_step(running, waiting, blocks, limits)
    assert plan.num_tokens == 12  # nothing decodes yet: the prompts take what they need
    finish_step(plan, running, blocks)
    waiting.append(req(9, 400))
    for _ in range(3):  # four decodes: each step carries at most 20 tokens, so 16 of the long prompt
        plan = plan_step(running, waiting, blocks, limits)
        assert plan.num_tokens == 20
        assert [sr.scheduled_tokens for sr in plan.running + plan.admitted if sr.id == 9] == [16]
        finish_step(plan, running, blocks)
    for sr in running:  # the decodes finish: the prompt gets the whole budget again
        if sr.id != 9:
            sr.generated_ids.extend([1] * (sr.request.stopping.max_new_tokens - sr.num_generated - 1))
            sr.computed_tokens = sr.context_len
    finish_step(StepPlan(), running, blocks)
    running[:] = [sr for sr in running if sr.id == 9]
    plan = plan_step(running, waiting, blocks, limits)
    assert plan.num_tokens == 400 - 48


def test_without_a_step_cost_every_step_may_fill_the_budget() -> None:
    blocks = BlockManager(256, BS, prefix_caching=False)
    limits = StepLimits(max_prefill_tokens=100, max_decode_slowdown=1.5)  # no cost measured
    running: list[ScheduledRequest] = []
    waiting = deque([req(0, 3, max_new=50)])
    finish_step(plan_step(running, waiting, blocks, limits), running, blocks)
    waiting.append(req(1, 400))
    assert plan_step(running, waiting, blocks, limits).num_tokens == 100


def test_a_prefix_being_prefilled_is_waited_for_not_computed_twice() -> None:
    blocks = BlockManager(64, BS, prefix_caching=True)
    limits = StepLimits(max_prefill_tokens=12)
    shared = list(range(500, 540))  # 10 full blocks
    running: list[ScheduledRequest] = []
    waiting = deque([req(0, shared + [1, 2]), req(1, shared + [3, 4, 5]), req(2, [7] * 6)])
    computed_by: dict[int, int] = {}
    while waiting or running:
        plan = plan_step(running, waiting, blocks, limits)
        for sr in plan.running + plan.admitted:
            computed_by[sr.id] = computed_by.get(sr.id, 0) + sr.scheduled_tokens
        if 0 in {sr.id for sr in running} and running[0].computed_tokens < 40:
            assert [sr.id for sr in plan.admitted] in ([0], [])  # 1 (and 2 behind it, FIFO) wait for 0's prefix
        finish_step(plan, running, blocks)
        blocks.check_integrity(running + list(waiting))
    # 0 computed its 42 prompt tokens + 3 decodes; 1 only its 3-token suffix + 3 decodes (40 came cached).
    assert computed_by[0] == 42 + 3
    assert computed_by[1] == 3 + 3
    assert computed_by[2] == 6 + 3


def test_a_waiter_starts_once_its_shared_blocks_are_computed_not_the_whole_prompt() -> None:
    blocks = BlockManager(64, BS)
    stem = list(range(500, 520))  # 5 full blocks
    leader, waiter = req(0, stem + [1] * 24, max_new=2), req(1, stem + [2, 2], max_new=2)
    running: list[ScheduledRequest] = []
    waiting = deque([leader, waiter])
    limits = StepLimits(max_prefill_tokens=12)
    admitted_at = None
    for step in range(8):
        plan = plan_step(running, waiting, blocks, limits)
        if waiter in plan.admitted:
            admitted_at = (step, leader.computed_tokens)
        finish_step(plan, running, blocks)
        blocks.check_integrity(running + list(waiting))
    # The leader takes the whole budget (oldest first) for 36 of its 44 tokens; the stem is cached after
    # step 1. At step 3 the waiter joins beside the leader's last chunk, with the stem from the cache: it no
    # longer waits for the step after the leader's whole prompt.
    assert admitted_at == (3, 36) and waiter.cached_tokens == 20


def test_a_cancelled_leader_leaves_what_it_computed_to_its_waiter() -> None:
    blocks = BlockManager(64, BS)
    stem = list(range(500, 540))  # 10 full blocks
    leader, waiter = req(0, stem + [1] * 4, max_new=3), req(1, stem + [2, 2, 2], max_new=3)
    running: list[ScheduledRequest] = []
    waiting = deque([leader, waiter])
    limits = StepLimits(max_prefill_tokens=14)
    for _ in range(2):
        plan = plan_step(running, waiting, blocks, limits)
        assert plan.admitted in ([leader], [])  # the waiter waits for the stem
        finish_step(plan, running, blocks)
    assert leader.computed_tokens == 28 and list(waiting) == [waiter]
    running.remove(leader)  # cancelled (the loop's _handle): its computed blocks stay cached, unlocked
    blocks.release(leader)
    blocks.check_integrity(running + list(waiting))
    plan = plan_step(running, waiting, blocks, limits)
    # The waiter takes the 7 blocks the leader computed and computes the rest of the stem and its suffix.
    assert plan.admitted == [waiter] and waiter.cached_tokens == 28 and waiter.scheduled_tokens == 14
    while running:
        finish_step(plan, running, blocks)
        plan = plan_step(running, waiting, blocks, limits)
    assert blocks.num_request_blocks(running) == 0 and blocks.allocator.num_free_blocks + blocks.num_cached_blocks == 63


def test_a_preempted_leader_resumes_from_what_it_computed_and_its_waiter_still_waits() -> None:
    blocks = BlockManager(10, BS)  # 9 usable blocks: the leader cannot finish its prompt beside the decode
    stem = list(range(500, 524))  # 6 full blocks
    decode, leader, waiter = req(0, 4, max_new=8), req(1, stem + [1] * 8, max_new=2), req(2, stem + [2] * 3, 2)
    running: list[ScheduledRequest] = []
    waiting = deque([decode, leader, waiter])
    limits = StepLimits(max_prefill_tokens=8)
    computed_by = {0: 0, 1: 0, 2: 0}
    preempted_at, leader_progress = None, 0
    while running or waiting:
        plan = plan_step(running, waiting, blocks, limits)
        if leader in plan.preempted:
            preempted_at = leader_progress
            assert blocks.cache is not None and len(blocks.cache.match(leader.request.input_ids).blocks) == 6
        if leader in plan.admitted and preempted_at is not None:
            assert leader.cached_tokens == 24  # its own stem blocks, from the cache
        assert waiter not in plan.admitted or leader.computed_tokens >= 24 or leader not in running
        for sr in plan.running + plan.admitted:
            computed_by[sr.id] += sr.scheduled_tokens
        leader_progress = leader.computed_tokens + leader.scheduled_tokens
        finish_step(plan, running, blocks)
        blocks.check_integrity(running + list(waiting))
    assert preempted_at == 25  # half-way through its prompt
    assert waiter.cached_tokens == 24 and computed_by[2] == 3 + 1  # only its suffix (and one decode)
    assert computed_by[1] == 25 + 8 + 1  # after preemption: the rest of its prompt from block 6 on, then a decode
    assert blocks.num_request_blocks(running) == 0


def test_a_request_asking_prompt_logprobs_does_not_wait_for_a_prefix() -> None:
    blocks = BlockManager(64, BS, prefix_caching=True)
    first, second = req(0, list(range(40))), req(1, list(range(40)))
    second.request = ValidRequest(input_ids=second.request.input_ids, sampling=SamplingParams(),
                                  stopping=StoppingParams(max_new_tokens=4), prefill_logprobs=True)
    running: list[ScheduledRequest] = []
    plan = plan_step(running, deque([first, second]), blocks, StepLimits(max_prefill_tokens=30))
    assert [(sr.id, sr.scheduled_tokens) for sr in plan.admitted] == [(0, 30)]
    finish_step(plan, running, blocks)  # 0 still has 10 prompt tokens to go
    plan = plan_step(running, deque([second]), blocks, StepLimits(max_prefill_tokens=30))
    assert [sr.id for sr in plan.admitted] == [1]  # computes everything itself anyway: no reason to wait


def test_decode_rows_learned_from_decode_steps_widen_the_budget() -> None:
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000)
    # Four decode rows took 53 ms, not the 33 ms the warmup probe predicts: 5 ms more per row.
    learned = cost
    for _ in range(40):
        learned = learned.observe_decode_step(4, 53_000_000)
    assert abs(learned.decode_row_ns - 5_000_000) < 50_000
    # Decode-only is 53 ms; at 2x, 53 ms more for prefill tokens: 53 of them (33 without what it learned).
    rows = StepCost(30_000_000, 1_000_000, decode_row_ns=5_000_000)
    assert rows.decode_only_ns(4) == 53_000_000 and rows.max_chunk(0, 1000, rows.decode_only_ns(4)) == 53
    assert cost.max_chunk(0, 1000, cost.decode_only_ns(4)) == 33
    assert cost.observe_decode_step(0, 10**9) is cost


def test_a_long_queue_lifts_the_stall_free_cap() -> None:
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000)
    limits = StepLimits(max_prefill_tokens=512, step_cost=cost, max_decode_slowdown=1.5, waiting_served_ratio=0.3)
    blocks = BlockManager(512, BS, prefix_caching=False)
    running: list[ScheduledRequest] = []
    waiting = deque([req(i, 3, max_new=50) for i in range(4)])
    finish_step(plan_step(running, waiting, blocks, limits), running, blocks)  # four decoding
    waiting.append(req(9, 400))  # one waiting for four running: 0.25 < 0.3, capped
    assert plan_step(running, waiting, blocks, limits).num_tokens == 20
    waiting.extend([req(10, 400), req(11, 400)])  # two waiting for five running (9 joined): 0.4, full rate
    assert limits.budget(running, len(waiting)).spare_ns is None  # no time limit: 512 tokens
    assert StepLimits(max_prefill_tokens=512, step_cost=cost, max_decode_slowdown=1.5).budget(
        running, len(waiting)).spare_ns is not None  # ratio 0: never lifted


class ShardKV:
    """What the shards' KV blocks hold, as the token prefix each full block was computed for: catches a
    request reading a cached block that was never computed (or computed for other tokens)."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, ...]] = {}
        self.computed: list[tuple[int, ...]] = []  # full prompt blocks computed (by their prefix) that the
        # request could have read from the cache instead

    def check_reads(self, sr: ScheduledRequest) -> None:
        ids = sr.request.input_ids
        for i in range(sr.cached_tokens // BS):
            assert self.held.get(sr.blocks[i]) == ids[: (i + 1) * BS], f"request {sr.id} read block {i} unwritten"

    def write(self, sr: ScheduledRequest) -> None:
        """`sr` computes its scheduled tokens: the blocks they complete now hold their prefix."""
        context = sr.request.input_ids + tuple(sr.generated_ids)
        start, end = sr.computed_tokens, sr.computed_tokens + sr.scheduled_tokens
        for i in range(start // BS, end // BS):
            self.held[sr.blocks[i]] = context[: (i + 1) * BS]
            if (i + 1) * BS < sr.prompt_len:  # a block holding the last prompt token is always computed
                self.computed.append(context[: (i + 1) * BS])


@pytest.mark.parametrize("seed", range(16))
def test_randomized_in_flight_sharing_with_cancels_and_preemption(seed: int) -> None:
    """Requests sharing stems arrive while others prefill them, some are cancelled (leaders too), blocks are
    scarce: every cached block a request reads holds exactly its prefix, nobody is stranded, nothing leaks.
    With no cancellation and no preemption, no full prompt block is computed twice."""
    rng = random.Random(1000 + seed)
    calm = seed % 2 == 0  # no cancellations, blocks to spare: each shared block is computed once
    num_blocks = 400 if calm else rng.randint(14, 40)
    blocks = BlockManager(num_blocks, BS)
    cost = StepCost(base_ns=30_000, token_ns=rng.choice([100, 1000]), context_ns=rng.choice([0, 5, 50]))
    limits = StepLimits(max_prefill_tokens=rng.randint(6, 40), step_cost=cost, max_decode_slowdown=1.5)
    capacity = (num_blocks - 1) * BS
    bursts: list[list[ScheduledRequest]] = []  # requests sharing a fresh stem, arriving together
    for _ in range(8):
        stem = [rng.randint(0, 3) for _ in range(rng.randint(6, 60))]
        bursts.append([])
        for _ in range(rng.randint(2, 4)):
            max_new = rng.randint(1, 6)
            prompt = stem + [rng.randint(0, 9) for _ in range(rng.randint(1, 20))]
            bursts[-1].append(req(sum(map(len, bursts)), prompt[: capacity - max_new], max_new=max_new))
    total = sum(map(len, bursts))
    waiting: deque[ScheduledRequest] = deque()
    running: list[ScheduledRequest] = []
    kv, done, cancelled, preempted = ShardKV(), [], [], 0
    for _ in range(5000):
        if not (bursts or waiting or running):
            break
        if bursts and rng.random() < 0.4:
            waiting.extend(bursts.pop(0))
        if not calm and running and rng.random() < 0.08:  # the loop's _handle for a cancelled request
            victim = rng.choice(running)
            running.remove(victim)
            blocks.release(victim)
            cancelled.append(victim)
        plan = plan_step(running, waiting, blocks, limits)
        preempted += len(plan.preempted)
        for sr in plan.admitted:
            kv.check_reads(sr)
        for sr in plan.running + plan.admitted:
            kv.write(sr)
        done += finish_step(plan, running, blocks)
        blocks.check_integrity(running + list(waiting))
    else:
        raise AssertionError("no progress")
    assert sorted(s.id for s in done + cancelled) == list(range(total))
    assert blocks.num_request_blocks(running) == 0
    assert blocks.allocator.num_free_blocks + blocks.num_cached_blocks == blocks.allocator.num_usable_blocks
    if calm:
        assert preempted == 0
        assert len(kv.computed) == len(set(kv.computed)), "a shared prompt block was computed twice"


def test_chunk_price_learned_from_mixed_steps_narrows_the_budget() -> None:
    cost = StepCost(base_ns=30_000_000, token_ns=1_000_000)
    # Four decode rows (33 ms alone) beside chunks the probes priced at 20 ms: the step took 73 ms, so the
    # chunks added 40 ms, twice their probe price.
    learned = cost
    for _ in range(40):
        learned = learned.observe_mixed_step(4, 20_000_000, 73_000_000)
    assert abs(learned.chunk_scale - 2.0) < 0.01
    assert learned.probe_chunk_ns(10, 0) == cost.chunk_ns(10, 0) == 10_000_000
    assert abs(learned.chunk_ns(10, 0) - 20_000_000) < 200_000
    spare = 0.7 * cost.decode_only_ns(4)  # 23.1 ms at the default slowdown
    assert cost.max_chunk(0, 1000, spare) == 23 and learned.max_chunk(0, 1000, spare) == 11
    # One stalled step moves the price a fifth of the way, to at most MAX_CHUNK_SCALE; a step faster than its
    # decode rows alone to at least MIN_CHUNK_SCALE.
    assert cost.observe_mixed_step(4, 20_000_000, 10**10).chunk_scale == pytest.approx(0.8 + 0.2 * MAX_CHUNK_SCALE)
    assert cost.observe_mixed_step(4, 20_000_000, 1).chunk_scale == pytest.approx(0.8 + 0.2 * MIN_CHUNK_SCALE)
    assert cost.observe_mixed_step(0, 20_000_000, 73_000_000) is cost  # no decode rows: nothing to compare with
    assert cost.observe_mixed_step(4, 0.0, 73_000_000) is cost
