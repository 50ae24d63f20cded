"""The step planner: which requests advance by how many tokens in the next forward, and with which blocks.

Policy (continuous batching with chunked prefill, one mixed forward per step):

* Token budget. One forward carries at most `max_prefill_tokens` tokens, decodes and prefill chunks
  together (the shard warmed up exactly that forward). Every running request computes at least one token
  each step (a shard batch cannot idle a request), so those are reserved first; leftover budget goes to
  prompts still prefilling, oldest first, then to new admissions. A prompt larger than what is left is
  split: its chunk rides along with the decodes and continues next step.
* Stall-free budget (Sarathi-Serve). While requests are decoding, a step that also carries prefill chunks
  may take at most `max_decode_slowdown` times a decode-only step, by a step cost model (`StepCost`: a
  fixed cost, a cost per token and a cost per (token, earlier position) pair a chunk attends, measured by
  the shards at warmup, plus what a decode row costs beyond a token, learned from the decode-only steps the
  scheduler sees). Chunks are priced where they sit: a long prompt arrives in chunks small enough that the
  streams already running keep their pace, large at its start and smaller as its context grows; with
  nothing decoding, prompts get the whole `max_prefill_tokens`. When the queue is long (waiting >=
  `waiting_served_ratio` x running, TGI's flag and meaning), the cap is lifted for that step: the queue
  is served at full rate, as TGI serves it, instead of trickling in beside half-empty batches (the
  running streams take one long step; a lone long prompt beside many streams stays capped).
* Capacity budget. A request is admitted while the KV positions the running batch holds plus its
  prompt stay within `max_total_tokens` (TGI's `max_batch_total_tokens - cached.max_tokens`). Holdings,
  not worst cases: blocks are allocated on demand, so the batch may later grow past what was held at
  admission; the blocks the shards hold bound that growth (preemption). `max_batch_size` caps how many
  requests run at once.
* In-flight prefix sharing. Full prompt blocks enter the prefix cache as soon as they are computed. A
  waiting request whose prompt starts with full blocks that a running request is still prefilling (not
  yet in the prefix cache) waits until they are cached, instead of computing them a second time beside
  the first: 8 requests sharing a 1500-token prefix prefill it once, not 8x. If that request leaves
  first (cancelled, preempted), the waiter takes what it computed from the cache and computes the rest.
* Admission is strict FIFO: the first waiting request that does not fit (or waits for a prefix) stops
  admission, so nobody is overtaken (head-of-line blocking by design, as in TGI). With chunking a waiting
  request never needs to pause the decodes, so it is admitted every step it fits: TGI's
  `max_waiting_tokens` (which rations prefill-only forwards) has nothing to decide here and is unused.
* KV blocks are allocated on demand, as requests cross block boundaries. When a running request cannot
  grow, even after evicting unlocked prefix-cache blocks, the most recently admitted running request
  is preempted: it leaves the shard batch, frees its blocks and goes back to the FRONT of the queue with
  what it generated so far, to be recomputed later. A step that preempted admits nobody.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from spindle_router.scheduler.block_manager import BlockManager
from spindle_router.scheduler.request import ScheduledRequest


@dataclass(frozen=True)
class StepCost:
    """A forward takes about base_ns + (n - 1) * token_ns + d * decode_row_ns + context_ns * pairs.

    n tokens, d of them decode rows; `pairs` counts what the prefill chunks attend before themselves: a
    chunk of c tokens from context position p has c * p (token, earlier position) pairs, so a late chunk
    of a long prompt, which attends to everything before it, costs more than an early one (attention
    within a chunk is in token_ns, as the warmup probe from position 0 measured it).
    base_ns, token_ns and context_ns are measured by the shards at warmup (a one-token forward, a prefill
    probe from position 0, the same probe deep into a context); decode_row_ns, what a decode row costs
    beyond a token (its attention over its context), is learned from the decode-only steps the scheduler
    sees (`observe_decode_step`), and chunk_scale, how far the probes' price of a chunk is from what chunks
    beside decode rows really add, from the mixed steps (`observe_mixed_step`): the probes run one chunk
    alone, the best of three, and a short chunk deep into a context pays fixed costs per layer (gathering
    that context) they spread over 128 tokens; on a Sapphire Rapids host chunks beside 16 decode rows cost
    1.3-2x their probe price, and steps meant to take 1.7x a decode step took 2.7x.
    """

    base_ns: int
    token_ns: int
    decode_row_ns: float = 0.0
    context_ns: float = 0.0
    chunk_scale: float = 1.0

    def decode_only_ns(self, decodes: int) -> float:
        """A step of `decodes` decode rows and nothing else."""
        return self.base_ns + max(0, decodes - 1) * self.token_ns + decodes * self.decode_row_ns

    def probe_chunk_ns(self, num_tokens: int, start: int) -> float:
        """The warmup probes' price of a prefill chunk of `num_tokens` from context position `start`."""
        return num_tokens * (self.token_ns + self.context_ns * start)

    def chunk_ns(self, num_tokens: int, start: int) -> float:
        """What a prefill chunk of `num_tokens` from context position `start` adds to a forward."""
        return self.chunk_scale * self.probe_chunk_ns(num_tokens, start)

    def max_chunk(self, start: int, limit: int, spare_ns: float) -> int:
        """The longest chunk from `start`, at most `limit` tokens, that adds at most `spare_ns`."""
        lo, hi = 0, max(0, limit)  # chunk_ns grows with the length: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.chunk_ns(mid, start) <= spare_ns:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def observe_decode_step(self, decodes: int, forward_ns: int, weight: float = 0.2) -> StepCost:
        """This cost with decode_row_ns moved towards what a decode-only step of `decodes` rows just took."""
        if decodes < 1:
            return self
        row = max(0.0, (forward_ns - self.base_ns - (decodes - 1) * self.token_ns) / decodes)
        return replace(self, decode_row_ns=(1 - weight) * self.decode_row_ns + weight * row)

    def observe_mixed_step(self, decodes: int, probe_ns: float, forward_ns: int, weight: float = 0.2) -> StepCost:
        """This cost with chunk_scale moved towards what the chunks of a step with `decodes` decode rows just
        added beyond a decode-only step, over their probe price `probe_ns` (the sum of `probe_chunk_ns`).
        Kept within [MIN_CHUNK_SCALE, MAX_CHUNK_SCALE]: one stalled step must not starve prompts for long."""
        if decodes < 1 or probe_ns <= 0:
            return self
        added = forward_ns - self.decode_only_ns(decodes)
        ratio = min(MAX_CHUNK_SCALE, max(MIN_CHUNK_SCALE, added / probe_ns))
        return replace(self, chunk_scale=(1 - weight) * self.chunk_scale + weight * ratio)


MIN_CHUNK_SCALE, MAX_CHUNK_SCALE = 0.5, 4.0


@dataclass
class StepBudget:
    """What the forward being planned may still carry: `tokens`, and under the stall-free rule `spare_ns`,
    the time its prefill chunks may add to the decode-only step (None: no time limit).

    Every running request computes at least one token a step, so the planner reserves those tokens first
    (`reserve`); chunks then take what they may (`take`), priced by their position when a cost is given.
    """

    tokens: int
    spare_ns: float | None = None
    cost: StepCost | None = None
    has_chunk: bool = False  # a prefill chunk got tokens this step

    def reserve(self, num_tokens: int) -> None:
        self.tokens -= num_tokens

    def take(self, start: int, want: int, reserved: int = 0) -> int:
        """Tokens for a prefill chunk from context position `start`, at most `want`, taken from the budget.

        `reserved` of them were set aside by `reserve` and are granted whatever they cost. The step's first
        chunk gets at least one token too, so a prompt always advances beside any number of decodes.
        """
        limit = min(want, reserved + max(0, self.tokens))
        num = limit
        if self.spare_ns is not None and self.cost is not None:
            num = self.cost.max_chunk(start, limit, self.spare_ns)
            num = max(num, reserved, 0 if self.has_chunk else min(1, limit))
            self.spare_ns -= self.cost.chunk_ns(num, start)
        self.tokens -= num - reserved
        self.has_chunk = self.has_chunk or num > 0
        return num


@dataclass(frozen=True)
class StepLimits:
    max_prefill_tokens: int  # tokens one forward may carry (decodes + prefill chunks)
    max_total_tokens: int | None = None  # KV positions held by the running batch at admission
    max_batch_size: int | None = None
    step_cost: StepCost | None = None  # None: no stall-free budget (every step may fill max_prefill_tokens)
    max_decode_slowdown: float = 0.0  # 0: no stall-free budget
    waiting_served_ratio: float = 0.0  # waiting >= this x running lifts the stall-free cap; 0: never

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_decode_slowdown and self.max_decode_slowdown < 1:
            raise ValueError("max_decode_slowdown must be 0 (off) or >= 1")

    def budget(self, running: list[ScheduledRequest], num_waiting: int = 0) -> StepBudget:
        """What the next forward may carry, given the requests already running and how many wait."""
        decodes = sum(sr.remaining_tokens == 1 for sr in running)
        cost = self.step_cost
        if not decodes or cost is None or not self.max_decode_slowdown:
            return StepBudget(self.max_prefill_tokens)
        if self.waiting_served_ratio and num_waiting >= self.waiting_served_ratio * len(running):
            return StepBudget(self.max_prefill_tokens)
        spare_ns = (self.max_decode_slowdown - 1) * cost.decode_only_ns(decodes)
        return StepBudget(self.max_prefill_tokens, spare_ns=spare_ns, cost=cost)


@dataclass
class StepPlan:
    """What the next forward does. `scheduled_tokens` of every request in it is set."""

    running: list[ScheduledRequest] = field(default_factory=list)  # already on the shards, advancing
    admitted: list[ScheduledRequest] = field(default_factory=list)  # joining this step (first chunk)
    new_blocks: dict[int, list[int]] = field(default_factory=dict)  # running request id -> blocks appended
    preempted: list[ScheduledRequest] = field(default_factory=list)  # left the shards, requeued at the front

    @property
    def num_tokens(self) -> int:
        return sum(sr.scheduled_tokens for sr in self.running + self.admitted)

    @property
    def is_empty(self) -> bool:
        return not self.running and not self.admitted


def plan_step(
    running: list[ScheduledRequest], waiting: deque[ScheduledRequest], blocks: BlockManager, limits: StepLimits
) -> StepPlan:
    """Plan one step, updating `running` (admission order) and `waiting` (FIFO) in place."""
    plan = StepPlan()
    budget = limits.budget(running, len(waiting))
    # 1. Tokens for the running batch: one each, then prefill chunks oldest first.
    budget.reserve(len(running))
    for sr in running:
        prefilling = sr.remaining_tokens > 1
        sr.scheduled_tokens = budget.take(sr.computed_tokens, sr.remaining_tokens, reserved=1) if prefilling else 1
    # 2. Blocks for the running batch, oldest first; preempt the youngest when they run out.
    for sr in list(running):
        if sr not in running:
            continue  # preempted for an older request already
        new = blocks.grow(sr, sr.computed_tokens + sr.scheduled_tokens)
        while new is None:
            victim = running[-1]
            _preempt(victim, running, waiting, blocks, plan)
            if victim is sr:
                break
            new = blocks.grow(sr, sr.computed_tokens + sr.scheduled_tokens)
        if new:
            plan.new_blocks[sr.id] = new
    plan.running = list(running)
    # 3. Admit waiting requests in order while every budget allows.
    while waiting and not plan.preempted and _has_room(waiting[0], running, budget, limits, blocks.block_size):
        sr = waiting[0]
        if blocks.waits_for_prefix(sr, running):
            break
        if not _admit(sr, budget, blocks):
            break
        waiting.popleft()
        running.append(sr)
        plan.admitted.append(sr)
    return plan


def _has_room(
    sr: ScheduledRequest, running: list[ScheduledRequest], budget: StepBudget, limits: StepLimits, block_size: int
) -> bool:
    """Token, batch-size and capacity budgets (an empty batch always takes one request, or nothing runs)."""
    if budget.tokens < 1:
        return False
    if limits.max_batch_size is not None and len(running) >= limits.max_batch_size:
        return False
    if limits.max_total_tokens is not None and running:
        held = sum(len(r.blocks) for r in running) * block_size
        if held + sr.prompt_len > limits.max_total_tokens:
            return False
    return True


def _admit(sr: ScheduledRequest, budget: StepBudget, blocks: BlockManager) -> bool:
    """Give `sr` its cached prefix, a first chunk and the blocks for it; False (nothing held) if no room."""
    blocks.attach_prefix(sr)
    sr.scheduled_tokens = budget.take(sr.computed_tokens, sr.remaining_tokens)
    if sr.scheduled_tokens == 0 or blocks.grow(sr, sr.computed_tokens + sr.scheduled_tokens) is None:
        blocks.release(sr)
        reset_progress(sr)
        return False
    sr.resumed_len = sr.num_generated
    return True


def _preempt(
    sr: ScheduledRequest, running: list[ScheduledRequest], waiting: deque[ScheduledRequest],
    blocks: BlockManager, plan: StepPlan,
) -> None:
    running.remove(sr)
    blocks.release(sr)
    reset_progress(sr)
    waiting.appendleft(sr)  # preempted youngest first, so older ones end up ahead: order is kept
    plan.preempted.append(sr)
    plan.new_blocks.pop(sr.id, None)


def reset_progress(sr: ScheduledRequest) -> None:
    """Back to "nothing on the shards" (what it generated stays: it is resent as generated_ids)."""
    sr.cached_tokens = sr.computed_tokens = sr.scheduled_tokens = 0
