"""The scheduler task: the one owner of the queue, the block accounting, the prefix cache and the shard batch.

HTTP handlers call `submit` (and `RequestStream.cancel`), which only post messages; everything else runs
in a single asyncio task, one step at a time (STYLE 4: no locks, and the batch can never disagree with
the blocks). A step:

    drain messages (new requests, cancellations)
    plan = plan_step(running, waiting, blocks, limits)          batcher.py: tokens, chunks, blocks, preemption
    Step(new requests, updates, dropped ids)     one call, one mixed forward; dropped: the requests the
                                                 shards hold that left `running` (finished, cancelled,
                                                 preempted), so leaving costs no round trip of its own
    generations -> events; finished requests free their blocks; full prompts enter the prefix cache

Overlap (`overlap_steps`, off by default): a step is sent before the previous one's answer is absorbed, so
the shards run step N + 1 while the router turns step N into events and plans N + 2; the shards execute
steps in the order sent. Counters advance when a step is sent, as if it had run, and a token being sampled
holds a PENDING_TOKEN place in `generated_ids` until its answer fills it. What the router cannot know in
advance: a request that stops on EOS or a stop sequence at step N is still in step N + 1, whose token for it
nobody reads (it is dropped with N + 2). A request's last token by max_new_tokens is known: it leaves
`running` (and its blocks) when that step is sent. Blocks freed while a step that wrote them is in flight
can only be written again by later steps, which run after it.

On a failed shard call every request in the batch gets an ErrorEvent, the shards are cleared and
`is_healthy` turns False (until a health check passes). Waiting requests stay queued. A shard that misses a
call's deadline (ShardStalled) is fatal instead: every request, running or waiting, gets an ErrorEvent, new
ones are refused, `is_healthy` stays False and `failed` is set, so the server exits (the launcher, or
Kubernetes, restarts the pod); nothing more is sent to the stalled shards.

Each stream buffers at most MAX_BUFFERED_EVENTS events its client has not read yet: a client that reads
slower than the model writes (or stopped reading without closing) is cancelled past it, with a logged reason,
instead of growing the router's memory; its blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from spindle_proto import generate_pb2 as pb

from spindle_router.config import SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.batcher import StepCost, StepLimits, StepPlan, plan_step
from spindle_router.scheduler.block_manager import BlockManager
from spindle_router.scheduler.request import (
    EndEvent,
    ErrorEvent,
    Event,
    PrefillEvent,
    ScheduledRequest,
    Token,
    TokenEvent,
    ValidRequest,
)
from spindle_router.shards import ShardClient, ShardError, ShardStalled

log = logging.getLogger("spindle_router.scheduler")

# Events a stream may hold unread (beyond what the socket buffers took): about 1 KB each with top tokens.
MAX_BUFFERED_EVENTS = 1024
# A mixed step teaches the chunk price only when its chunks were priced at this share of the decode rows'
# step or more: what a few tokens add is lost in a step's noise.
MIN_LEARNED_CHUNK_SHARE = 0.1

_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


class _Stream:
    """The events of one request (implements backend.RequestStream)."""

    def __init__(self, scheduler: Scheduler, request_id: int) -> None:
        self._scheduler = scheduler
        self.request_id = request_id
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.is_done = False  # an EndEvent / ErrorEvent was pushed, or the client cancelled

    def push(self, event: Event) -> None:
        if self.is_done:
            return
        if self._events.qsize() >= MAX_BUFFERED_EVENTS and not isinstance(event, (EndEvent, ErrorEvent)):
            self._drop_slow_reader()
            return
        self._events.put_nowait(event)
        self.is_done = isinstance(event, (EndEvent, ErrorEvent))

    def _drop_slow_reader(self) -> None:
        """The client left MAX_BUFFERED_EVENTS events unread: cancel the request (its blocks go at the next
        step) and replace the backlog by one error event, which is all the client still gets."""
        log.warning(
            "request %d cancelled: its client left %d events unread (it reads slower than the model writes)",
            self.request_id, self._events.qsize(),
        )
        while not self._events.empty():
            self._events.get_nowait()
        self._events.put_nowait(
            ErrorEvent(f"the client read too slowly: {MAX_BUFFERED_EVENTS} events were left unread")
        )
        self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (EndEvent, ErrorEvent)):
                return

    def cancel(self) -> None:
        if self.is_done:
            return
        self.is_done = True
        self._scheduler._post(_Cancel(self.request_id))


PENDING_TOKEN = -1  # a generated_ids place whose token a step in flight is sampling


@dataclass
class _Flight:
    """A step sent to the shards whose answer is not absorbed yet."""

    stepped: list[ScheduledRequest]  # running then admitted, as sent
    admitted: bool  # the step admitted requests
    num_running: int  # requests it carried that were running before it
    samples: dict[int, int]  # request id -> index in its generated_ids of the token this step samples
    num_tokens: int  # tokens its forward computes
    method: str  # "prefill" when it admitted requests, else "decode" (TGI's metric labels)
    dropped: bool  # it dropped requests from the shards
    sent_at: float  # time.perf_counter()
    decodes: int  # rows computing one token of a request that is decoding
    chunk_probe_ns: float  # its prefill chunks at the warmup probes' price (0: no chunks, or no cost model)
    call: asyncio.Future[pb.StepResponse]


@dataclass(frozen=True)
class _Submit:
    sr: ScheduledRequest


@dataclass(frozen=True)
class _Cancel:
    request_id: int


class Scheduler:
    """Continuous batching over the shards (implements backend.Backend)."""

    def __init__(
        self, shards: ShardClient, config: SchedulerConfig, num_blocks: int, block_size: int, metrics: Metrics,
        step_cost: StepCost | None = None,  # as the shards measured it at warmup; None: no stall-free budget
    ) -> None:
        self.shards = shards
        self.config = config
        self.metrics = metrics
        self.blocks = BlockManager(num_blocks, block_size, config.prefix_caching)
        self.limits = StepLimits(
            max_prefill_tokens=config.max_batch_prefill_tokens,
            max_total_tokens=config.max_batch_total_tokens,
            max_batch_size=config.max_batch_size,
            step_cost=step_cost,
            max_decode_slowdown=config.max_decode_slowdown,
            waiting_served_ratio=config.waiting_served_ratio,
        )
        self.waiting: deque[ScheduledRequest] = deque()
        self.running: list[ScheduledRequest] = []  # admission order; == the shard batch after each step
        self._streams: dict[int, _Stream] = {}
        self._inbox: asyncio.Queue[_Submit | _Cancel] = asyncio.Queue()
        # Ids the shards hold: those of `running`, plus requests that left it since the last step (they
        # are dropped by the next Step: a finished request stays on the shards until then).
        self._held: list[int] = []
        self._flight: _Flight | None = None  # a step sent whose answer is not absorbed yet (overlap)
        # Left `running` when their last token was sent for (max_new_tokens): their stream ends on the answer.
        self._finishing: list[ScheduledRequest] = []
        self._next_request_id = 0
        self._next_seq = 1  # of the next Step: the shards run steps strictly in this order
        self._healthy = True
        self._accepting = True
        self.fatal_error: str | None = None  # set when a shard stalled: nothing more is sent to the shards
        self.failed = asyncio.Event()  # set with fatal_error; the server exits on it
        self._idle = asyncio.Event()  # set while no accepted request is open (stop() waits for it)
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._hit_tokens = 0
        self._lookup_tokens = 0
        metrics.kv_blocks_total.set(num_blocks)

    # ---- Backend ------------------------------------------------------------------------------
    def submit(self, request: ValidRequest) -> _Stream:
        rid = self._next_request_id
        self._next_request_id += 1
        stream = _Stream(self, rid)
        capacity = self.blocks.allocator.num_usable_blocks
        needed = self.blocks.blocks_for(request.input_length + request.stopping.max_new_tokens)
        if self.fatal_error is not None:
            stream.push(ErrorEvent(self.fatal_error))
        elif not self._accepting:
            stream.push(ErrorEvent("the server is shutting down"))
        elif needed > capacity:  # it could never run, even alone: refuse instead of thrashing
            stream.push(ErrorEvent(f"the request needs {needed} KV blocks, the shards hold {capacity}"))
        else:
            self._streams[rid] = stream
            self._idle.clear()
            self._post(_Submit(ScheduledRequest(id=rid, request=request, queued_at=time.monotonic())))
            self.metrics.queue_size.inc()
        return stream

    @property
    def is_healthy(self) -> bool:
        return self._healthy

    async def health_check(self) -> bool:
        if self.fatal_error is not None:
            return False
        try:
            await self.shards.health()
        except ShardError as exc:
            log.warning("health check failed: %s", exc)
            self._healthy = False
            return False
        self._healthy = True
        return True

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler task (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="spindle-scheduler")

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new requests; let queued and running ones finish for `drain_timeout_s`, then fail the rest."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still open after %.1fs: failing them", len(self._streams), drain_timeout_s)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._abandon_flight()
        if self.running or self.waiting or self._finishing:
            self._fail(self.running + list(self.waiting) + self._finishing, "the server is shutting down")
            self.waiting.clear()
            if self.fatal_error is None:  # a stalled shard would only make us wait for another deadline
                await self._clear_shards()
        self._update_gauges()

    def _post(self, message: _Submit | _Cancel) -> None:
        self._inbox.put_nowait(message)

    # ---- the task -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self.running and not self.waiting and self._flight is None:
                self._handle(await self._inbox.get())
            while not self._inbox.empty():
                self._handle(self._inbox.get_nowait())
            if not self.running and not self.waiting and self._flight is None:
                self._update_gauges()  # cancellations may have emptied the batch: no step will say so
                continue
            start = time.perf_counter()
            plan = plan_step(self.running, self.waiting, self.blocks, self.limits)
            self.metrics.step_phase_duration.labels(phase="plan").observe(time.perf_counter() - start)
            self._note_plan(plan)
            try:
                sent = self._send(plan) if not plan.is_empty else None
                previous, self._flight = self._flight, sent
                if previous is not None:  # overlap: absorb step N while the shards run step N + 1
                    await self._finish(previous)
                if sent is not None and not self.config.overlap_steps:
                    self._flight = None
                    await self._finish(sent)
            except ShardStalled as exc:
                await self._abandon_flight()
                self._stalled(str(exc))
                return
            except Exception as exc:  # a shard error, or a bug here: never leave streams hanging
                if isinstance(exc, ShardError):
                    log.error("shard call failed: %s", exc)
                else:
                    log.exception("scheduler step failed")
                await self._abandon_flight()
                self._healthy = False
                message = str(exc) if isinstance(exc, ShardError) else f"Scheduler error: {exc!r}"
                self._fail(list(self.running) + self._finishing, message)
                for sr in self.waiting:  # preempted while a lost step was sampling for them: it never came
                    while sr.generated_ids and sr.generated_ids[-1] == PENDING_TOKEN:
                        sr.generated_ids.pop()
                self._held = []
                await self._clear_shards()
            self._update_gauges()
            if plan.is_empty and not self.running and self.waiting and self._flight is None:
                self._handle(await self._inbox.get())  # nothing could be admitted: wait for news

    async def _abandon_flight(self) -> None:
        """Cancel the step still in flight (its answer no longer matters: the shards get cleared)."""
        flight, self._flight = self._flight, None
        if flight is not None:
            flight.call.cancel()
            await asyncio.gather(flight.call, return_exceptions=True)
            self.metrics.batch_inference_failure.labels(method=flight.method).inc()

    async def _clear_shards(self) -> None:
        """The shards forget every request; steps count from 1 again (a cleared shard expects step 1 next)."""
        self._next_seq = 1
        try:
            await self.shards.clear_cache()
        except ShardError:
            pass

    def _stalled(self, message: str) -> None:
        """A shard missed a deadline: fail every request, refuse new ones, and tell the server to exit."""
        log.error("%s: failing %d running and %d waiting request(s); the server will exit",
                  message, len(self.running), len(self.waiting))
        self.fatal_error = message
        self._healthy = False
        self._fail(self.running + list(self.waiting) + self._finishing, message)
        self.waiting.clear()
        self._held = []
        while not self._inbox.empty():  # requests submitted meanwhile
            queued = self._inbox.get_nowait()
            if isinstance(queued, _Submit):
                self._fail([queued.sr], message)
        self._update_gauges()
        self.failed.set()

    def _handle(self, message: _Submit | _Cancel) -> None:
        if isinstance(message, _Submit):
            self.waiting.append(message.sr)
            return
        for sr in self.waiting:
            if sr.id == message.request_id:
                self.waiting.remove(sr)
                self._forget(sr)
                return
        for sr in self.running:
            if sr.id == message.request_id:
                self.running.remove(sr)  # its blocks free now; the next Step drops it from the shards
                self._forget(sr)
                return

    def _forget(self, sr: ScheduledRequest) -> None:
        self.blocks.release(sr)
        self._streams.pop(sr.id, None)
        if not self._streams:
            self._idle.set()  # every accepted request has ended

    def _send(self, plan: StepPlan) -> _Flight:
        """Start the step's call, and advance every counter as if it had run: the next plan (made while this
        step runs, with overlap) starts from there. A token being sampled holds a PENDING_TOKEN place."""
        phase = self.metrics.step_phase_duration
        start = time.perf_counter()
        stepped = plan.running + plan.admitted
        live = {sr.id for sr in plan.running}
        dropped = [i for i in self._held if i not in live]  # finished, cancelled or preempted since
        updates = [u for u in (self._update(sr, plan.new_blocks.get(sr.id, [])) for sr in plan.running) if u]
        if plan.admitted:
            now = time.monotonic()
            for sr in plan.admitted:
                sr.started_at = sr.started_at if sr.started_at is not None else now
            if plan.running:
                self.metrics.batch_concat.labels(reason="chunking").inc()
            self.metrics.batch_next_size.observe(len(plan.admitted))
            md = _carrier(plan.admitted, ask_all=True) or _carrier(plan.running)
        else:
            md = _carrier(plan.running)
        requests = [self._request(sr) for sr in plan.admitted]
        num_tokens = plan.num_tokens
        # TGI's method names, for its dashboards: a step that admits is a "prefill".
        method = "prefill" if plan.admitted else "decode"
        self.metrics.batch_inference_count.labels(method=method).inc()
        # Its deadline starts now, so it covers the step still in flight ahead of it (overlap) too.
        ahead = self._flight.num_tokens if self._flight is not None else 0
        call = asyncio.ensure_future(self.shards.step(
            requests, updates, dropped, num_requests=len(stepped), work_tokens=num_tokens + ahead,
            seq=self._next_seq, metadata=md,
        ))
        self._next_seq += 1
        self._held = [sr.id for sr in stepped]
        decodes, chunk_probe_ns = self._price(stepped)
        samples: dict[int, int] = {}
        for sr in stepped:
            sr.computed_tokens += sr.scheduled_tokens
            sr.scheduled_tokens = 0
            self.blocks.cache_prompt(sr)  # a later step reading these blocks runs after this one
            if sr.computed_tokens == sr.context_len:  # the step completes its context: it samples a token
                samples[sr.id] = sr.num_generated
                sr.generated_ids.append(PENDING_TOKEN)
        for sr in stepped:
            if sr.id in samples and sr.num_generated >= sr.request.stopping.max_new_tokens:
                # Its last token: it leaves the batch now (its blocks are free for steps after this one).
                self.running.remove(sr)
                self.blocks.release(sr)
                self._finishing.append(sr)
        flight = _Flight(stepped=stepped, admitted=bool(plan.admitted), num_running=len(plan.running),
                         samples=samples, num_tokens=num_tokens, method=method, dropped=bool(dropped),
                         sent_at=time.perf_counter(), decodes=decodes, chunk_probe_ns=chunk_probe_ns, call=call)
        phase.labels(phase="build").observe(flight.sent_at - start)
        return flight

    async def _finish(self, flight: _Flight) -> None:
        """Wait for a sent step's answer and absorb it. Counted a success only once absorbed (a scrape that
        sees inference_count == success + failure sees every answer absorbed)."""
        try:
            response = await flight.call  # on failure the error path clears the shards
        except ShardError:
            self.metrics.batch_inference_failure.labels(method=flight.method).inc()
            raise
        answered = time.perf_counter()
        self.metrics.step_phase_duration.labels(phase="call").observe(answered - flight.sent_at)
        self._observe(flight.method, response, flight.dropped, flight.admitted and flight.num_running > 0)
        self._learn_step_cost(flight, response)
        self._absorb(flight, response)
        self.metrics.batch_inference_success.labels(method=flight.method).inc()
        self.metrics.step_phase_duration.labels(phase="absorb").observe(time.perf_counter() - answered)

    def _request(self, sr: ScheduledRequest) -> pb.Request:
        """A new request, sent whole once (STYLE 8)."""
        r = sr.request
        s, st = r.sampling, r.stopping
        msg = pb.Request(
            id=sr.id,
            input_ids=list(r.input_ids),
            parameters=pb.NextTokenChooserParameters(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, typical_p=s.typical_p,
                do_sample=s.do_sample, seed=s.seed, repetition_penalty=s.repetition_penalty,
                frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty, min_p=s.min_p,
                logit_bias=dict(s.logit_bias),
            ),
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=st.max_new_tokens, stop_sequences=list(st.stop_sequences),
                ignore_eos_token=st.ignore_eos_token, min_new_tokens=st.min_new_tokens,
                stop_token_ids=list(st.stop_token_ids),
            ),
            prefill_logprobs=r.prefill_logprobs,
            top_n_tokens=r.top_n_tokens,
            blocks=list(sr.blocks),
            cache_len=sr.cached_tokens,
            generated_ids=list(sr.generated_ids),
        )
        chunk = _chunk_len(sr)
        if chunk is not None:
            msg.chunk_len = chunk
        if r.grammar is not None:
            msg.grammar.type = int(r.grammar.type)
            msg.grammar.value = r.grammar.value
        return msg

    def _update(self, sr: ScheduledRequest, new_blocks: list[int]) -> pb.RequestUpdate | None:
        """Appended blocks, and the next chunk whenever the step computes less than all the request has left.

        The shard forgets a chunk once it is computed (no chunk = everything left), so a chunk equal to the
        last one is sent again: skipping it made the shard compute the rest of the prompt while the router
        counted one chunk."""
        chunk = _chunk_len(sr)
        if not new_blocks and chunk is None:
            return None
        update = pb.RequestUpdate(request_id=sr.id, blocks=new_blocks)
        if chunk is not None:
            update.chunk_len = chunk
        return update

    def _absorb(self, flight: _Flight, response: pb.StepResponse) -> None:
        """Check the answer against what the step was sent to do, then fill in tokens and send events.

        With overlap a request may have left since the step was sent: cancelled (its stream is gone), or
        finished by the step before (EOS, a stop sequence: the shards computed one token past its end).
        Their tokens reach nobody."""
        generations = {g.request_id: g for g in response.generations}
        for sr in flight.stepped:
            samples = sr.id in flight.samples
            if samples != (sr.id in generations):
                raise ShardError(f"Server error: request {sr.id} {'got no' if samples else 'got a'} token this step")
        if len(generations) != sum(sr.id in generations for sr in flight.stepped):
            raise ShardError("Server error: a generation for a request that was not in the step")
        for sr in flight.stepped:
            gen = generations.get(sr.id)
            if gen is None:
                continue
            token = _tokens(gen.tokens)[0]
            sr.generated_ids[flight.samples[sr.id]] = token.id
            if sr.id not in self._streams:
                continue  # cancelled, or finished by an earlier step
            self._emit(sr, gen, token)
            if gen.HasField("generated_text"):
                self._end(sr)

    def _end(self, sr: ScheduledRequest) -> None:
        """A finished request leaves wherever it is (the next Step drops it from the shards)."""
        if sr in self.running:
            self.running.remove(sr)
        elif sr in self._finishing:
            self._finishing.remove(sr)
        elif sr in self.waiting:  # preempted by a plan made before this answer came
            self.waiting.remove(sr)
        self._forget(sr)

    def _emit(self, sr: ScheduledRequest, gen: pb.Generation, token: Token) -> None:
        stream = self._streams[sr.id]
        if gen.HasField("prefill_tokens") and gen.prefill_tokens.ids and not sr.prefill_event_sent:
            sr.prefill_event_sent = True
            stream.push(PrefillEvent(_tokens(gen.prefill_tokens)))
        top = _tokens(gen.top_tokens[0]) if gen.top_tokens else []
        if not gen.HasField("generated_text"):
            stream.push(TokenEvent(token=token, top_tokens=top))
            return
        done = gen.generated_text
        stream.push(EndEvent(
            token=token, top_tokens=top, generated_text=done.text,
            finish_reason=_FINISH_REASONS.get(done.finish_reason, "length"),
            generated_tokens=done.generated_tokens, seed=done.seed if done.HasField("seed") else None,
            queued_at=sr.queued_at, started_at=sr.started_at if sr.started_at is not None else sr.queued_at,
        ))

    def _fail(self, requests: list[ScheduledRequest], message: str) -> None:
        for sr in requests:
            stream = self._streams.get(sr.id)
            if stream is not None:
                stream.push(ErrorEvent(message))
            if sr in self.running:
                self.running.remove(sr)
            if sr in self._finishing:
                self._finishing.remove(sr)
            self._forget(sr)

    # ---- metrics --------------------------------------------------------------------------------
    def _observe(self, method: str, response: pb.StepResponse, dropped: bool, joined: bool) -> None:
        """Shard timings under TGI's metric names: the step's preparation (drops, updates, admissions) counts
        as "filter" when it dropped requests and as "concat" when new ones joined running ones."""
        m = self.metrics
        m.batch_forward_duration.labels(method=method).observe(response.forward_ns / 1e9)
        m.batch_decode_duration.labels(method=method).observe(response.decode_ns / 1e9)
        m.batch_inference_duration.labels(method=method).observe(response.total_ns / 1e9)
        if dropped:
            m.batch_filter_duration.labels(method=method).observe(response.prepare_ns / 1e9)
        if joined:
            m.batch_concat_duration.labels(method=method).observe(response.prepare_ns / 1e9)
        if response.grammar_compile_ns:
            m.grammar_compile_duration.observe(response.grammar_compile_ns / 1e9)
        if response.grammar_mask_ns:
            m.grammar_mask_duration.observe(response.grammar_mask_ns / 1e9)

    def _price(self, stepped: list[ScheduledRequest]) -> tuple[int, float]:
        """(decode rows, probe price of the prefill chunks) of a step about to be sent."""
        cost = self.limits.step_cost
        decodes, probe_ns = 0, 0.0
        for sr in stepped:
            if sr.remaining_tokens == 1 and sr.num_generated > 0:
                decodes += 1
            elif cost is not None:
                probe_ns += cost.probe_chunk_ns(sr.scheduled_tokens, sr.computed_tokens)
        return decodes, probe_ns

    def _learn_step_cost(self, flight: _Flight, response: pb.StepResponse) -> None:
        """Decode-only steps teach the stall-free budget what decode rows cost at today's context lengths;
        steps with chunks beside decode rows, what those chunks really add over their probe price."""
        cost = self.limits.step_cost
        if cost is None:
            return
        if not flight.admitted and flight.num_tokens == flight.num_running:
            learned = cost.observe_decode_step(flight.num_running, response.forward_ns)
        elif flight.decodes and flight.chunk_probe_ns >= MIN_LEARNED_CHUNK_SHARE * cost.decode_only_ns(flight.decodes):
            learned = cost.observe_mixed_step(flight.decodes, flight.chunk_probe_ns, response.forward_ns)
        else:
            return
        self.limits = dataclasses.replace(self.limits, step_cost=learned)

    def _note_plan(self, plan: StepPlan) -> None:
        m = self.metrics
        if plan.preempted:
            m.preemptions.inc(len(plan.preempted))
            log.info("preempted %d request(s) for KV blocks: %s", len(plan.preempted), [s.id for s in plan.preempted])
        if self.blocks.cache is not None:
            for sr in plan.admitted:
                self._hit_tokens += sr.cached_tokens
                self._lookup_tokens += sr.prompt_len
                m.prefix_cache_hit_tokens.inc(sr.cached_tokens)
                m.prefix_cache_prompt_tokens.inc(sr.prompt_len)
            if self._lookup_tokens:
                m.prefix_cache_hit_ratio.set(self._hit_tokens / self._lookup_tokens)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_size.set(len(self.waiting))
        m.batch_current_size.set(len(self.running))
        m.batch_current_max_tokens.set(sum(len(sr.blocks) for sr in self.running) * self.blocks.block_size)
        m.kv_blocks_used.set(self.blocks.num_request_blocks(self.running))
        m.prefix_cache_blocks.set(self.blocks.num_cached_blocks)

    def check_integrity(self) -> None:
        """Block accounting of every live request (tests call this between steps)."""
        self.blocks.check_integrity(self.running + list(self.waiting))


def _carrier(requests: list[ScheduledRequest], ask_all: bool = False) -> tuple[tuple[str, str], ...]:
    """Trace context for a batch RPC: the first traced request's. `ask_all` for newly admitted requests:
    asking is how each learns it left the queue."""
    found: tuple[tuple[str, str], ...] = ()
    for sr in requests:
        if sr.request.trace is not None:
            found = found or sr.request.trace.carrier()
            if found and not ask_all:
                break
    return found


def _chunk_len(sr: ScheduledRequest) -> int | None:
    """The chunk to send: None when the step computes everything the request has left."""
    return None if sr.scheduled_tokens >= sr.remaining_tokens else sr.scheduled_tokens


def _tokens(t: pb.Tokens) -> list[Token]:
    return [
        Token(
            id=t.ids[i],
            text=t.texts[i] if i < len(t.texts) else "",
            logprob=None if i >= len(t.logprobs) or math.isnan(t.logprobs[i]) else t.logprobs[i],
            special=t.is_special[i] if i < len(t.is_special) else False,
        )
        for i in range(len(t.ids))
    ]
