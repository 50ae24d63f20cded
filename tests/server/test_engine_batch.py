"""Batch bookkeeping without a model: request validation, Step calls (drops, updates, admissions), step inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from spindle_proto import generate_pb2 as pb
from spindle_server.engine.batch import BatchContext, RequestUpdate, ShardBatch, StepCall, request_from_proto
from spindle_server.engine.errors import InvalidArgumentError
from spindle_server.engine.inputs import build_step_inputs

from tests.helpers.tiny_model import build_tokenizer

BS = 4  # small blocks make the slot arithmetic visible


@pytest.fixture(scope="module")
def ctx() -> BatchContext:
    return BatchContext(tokenizer=build_tokenizer(300), eos_token_ids=(2,), vocab_size=300, block_size=BS,
                        num_blocks=64)


def request(rid: int, n: int, blocks, **kw) -> pb.Request:
    return pb.Request(
        id=rid, input_ids=[1] + [10 + i for i in range(n - 1)], blocks=blocks,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=5), **kw,
    )


def batch(ctx, *reqs: pb.Request) -> ShardBatch:
    """A batch holding `reqs`, admitted by one Step."""
    b = ShardBatch([], BS)
    b.apply_step(StepCall(requests=tuple(request_from_proto(r, ctx) for r in reqs), num_requests=len(reqs)),
                 num_blocks=ctx.num_blocks)
    return b


def test_counters(ctx):
    b = batch(ctx, request(1, 10, [3, 4, 5]), request(2, 6, [6, 7], cache_len=4),
              request(3, 9, [8, 9], chunk_len=5))
    assert b.request_ids == [1, 2, 3]
    assert [r.next_len for r in b.requests] == [10, 2, 5]
    assert [r.completes_context for r in b.requests] == [True, True, False]


def test_step_inputs_slots_positions_and_logit_rows(ctx):
    b = batch(ctx, request(1, 6, [9, 2]), request(2, 7, [5, 6], cache_len=4),
              request(3, 9, [8, 1], chunk_len=5, prefill_logprobs=True))
    inputs = build_step_inputs(b.requests, BS, torch.device("cpu"))
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 0, 1, 2, 3, 4]
    # slot = table[p // BS] * BS + p % BS
    assert inputs.meta.slot_mapping.tolist() == [36, 37, 38, 39, 8, 9, 24, 25, 26, 32, 33, 34, 35, 4]
    assert inputs.meta.cu_seqlens_q.tolist() == [0, 6, 9, 14]
    assert inputs.meta.context_lens.tolist() == [6, 7, 5]
    assert inputs.meta.block_tables.tolist() == [[9, 2], [5, 6], [8, 1]]
    assert inputs.meta.max_q_len == 6 and not inputs.meta.is_decode
    # r1 and r2 sample from their last row; r3 is mid-prompt (no sample) but wants every row's log-probs.
    assert inputs.logit_rows.tolist() == [5, 8, 9, 10, 11, 12, 13]
    assert inputs.sample_row == [0, 1, None]
    assert inputs.prompt_rows == [None, None, range(2, 7)]


def test_decode_step_is_decode(ctx):
    b = batch(ctx, request(1, 3, [0]), request(2, 1, [1]))
    for r in b.requests:  # as after a prefill that sampled one token
        r.computed_len = len(r.all_ids)
        r.all_ids.append(42)
    inputs = build_step_inputs(b.requests, BS, torch.device("cpu"))
    assert inputs.meta.is_decode and inputs.positions.tolist() == [3, 1]
    assert inputs.input_ids.tolist() == [42, 42] and inputs.sample_row == [0, 1]


def test_step_drops_updates_and_admits_in_order(ctx):
    b = batch(ctx, request(1, 3, [0]), request(2, 3, [1]), request(3, 3, [2]))
    new = request_from_proto(request(4, 3, [3]), ctx)
    b.apply_step(StepCall(dropped_ids=(2,), updates=(RequestUpdate(3, blocks=(5,)),), requests=(new,),
                          num_requests=3), num_blocks=64)
    assert b.request_ids == [1, 3, 4]
    assert b.requests[1].block_table == [2, 5]
    # A dropped id may come back as a new request in the same step (a preempted request resumed).
    again = request_from_proto(request(1, 3, [6]), ctx)
    b.apply_step(StepCall(dropped_ids=(1,), requests=(again,), num_requests=3), num_blocks=64)
    assert b.request_ids == [3, 4, 1] and b.requests[2].block_table == [6]


def test_mixed_step_lists_single_token_requests_first(ctx):
    # r1 and r3 decode (one new token), r2 prefills 6: the step's rows are r1, r3, then r2's chunk, and the
    # decode rows come with their own metadata for the decode kernel.
    b = batch(ctx, request(1, 3, [0]), request(2, 6, [1, 2], prefill_logprobs=True), request(3, 5, [3, 4]))
    for r in (b.requests[0], b.requests[2]):
        r.computed_len = len(r.all_ids)
        r.all_ids.append(42)
    inputs = build_step_inputs(b.requests, BS, torch.device("cpu"))
    meta = inputs.meta
    assert inputs.positions.tolist() == [3, 5, 0, 1, 2, 3, 4, 5]
    assert inputs.input_ids.tolist()[:2] == [42, 42]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 8] and meta.context_lens.tolist() == [4, 6, 6]
    assert meta.block_tables.tolist() == [[0, 0], [3, 4], [1, 2]] and not meta.is_decode
    d = meta.decode_rows
    assert d is not None and d.num_seqs == 2
    assert d.context_lens.tolist() == [4, 6] and d.block_tables.tolist() == [[0, 0], [3, 4]]
    assert d.rest_cu_seqlens_q.tolist() == [0, 6] and d.rest_context_lens.tolist() == [6]
    assert d.rest_block_tables.tolist() == [[1, 2]]
    # Per request, in the batch's order: r1 samples logits row 0, r3 row 1, r2's rows are 2..7.
    assert inputs.logit_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert inputs.sample_row == [0, 7, 1] and inputs.prompt_rows == [None, range(2, 8), None]


def test_staging_sends_aligned_segments_with_their_values():
    # One buffer for the whole step; each segment 16-byte aligned whatever the lengths before it, so the
    # kernels reading them never see a new pointer alignment (a new compile).
    from spindle_server.engine.inputs import HostStaging

    staging = HostStaging(torch.device("cpu"))
    seg64, seg32 = [[5, 6, 7], [], [1 << 40], [9]], [[0, 1, 2], [4] * 5, list(range(7))]
    got64, got32 = staging.send(seg64, seg32)
    assert [t.tolist() for t in got64] == seg64 and [t.tolist() for t in got32] == seg32
    assert all(t.dtype == torch.int64 for t in got64) and all(t.dtype == torch.int32 for t in got32)
    assert all(t.data_ptr() % 16 == 0 for t in got64 + got32 if t.numel())


def test_mixed_step_attention_equals_one_varlen_call():
    # The decode-kernel route of a mixed step computes what one paged_attention call over all rows does; ops
    # that say they need no split get one call.
    from spindle_kernels import REFERENCE_OPS
    from spindle_server.distributed import Distributed
    from spindle_server.layers.attention import AttentionMetadata, PagedAttention, split_decode_rows
    from spindle_server.layers.rotary import RopeConfig, RotaryEmbedding

    torch.manual_seed(0)
    calls = []

    def counted(name, fn):
        def wrapper(q, *args, **kwargs):
            calls.append((name, q.shape[0]))
            return fn(q, *args, **kwargs)
        return wrapper

    ops = dataclasses.replace(
        REFERENCE_OPS,
        paged_attention=counted("prefill", REFERENCE_OPS.paged_attention),
        paged_decode_attention=counted("decode", REFERENCE_OPS.paged_decode_attention),
    )
    cpu = torch.device("cpu")
    rotary = RotaryEmbedding(RopeConfig(), 8, 64, ops, cpu)
    layer = PagedAttention(32, 4, 2, 8, rotary, Distributed(0, 1, None), ops, qkv_bias=False, o_bias=False,
                           dtype=torch.float32, device=cpu)
    for param in layer.parameters():
        param.data.normal_()
    # sequences: two decodes (contexts 9 and 3) then a chunk of 5 after 2 cached tokens
    tables = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0]], dtype=torch.int32)
    positions = torch.tensor([8, 2, 2, 3, 4, 5, 6])
    slots = torch.tensor([2 * BS + 0, 4 * BS + 2, 5 * BS + 2, 5 * BS + 3, 6 * BS + 0, 6 * BS + 1, 6 * BS + 2])
    meta = AttentionMetadata(slots, torch.tensor([0, 1, 2, 7], dtype=torch.int32),
                             torch.tensor([9, 3, 7], dtype=torch.int32), tables, max_q_len=5, is_decode=False)
    hidden = torch.randn(7, 32)
    results = []
    for decode_rows in (None, split_decode_rows(meta, 2)):
        cache = (torch.randn(8, BS, 2, 8, generator=torch.Generator().manual_seed(1)),
                 torch.randn(8, BS, 2, 8, generator=torch.Generator().manual_seed(2)))
        meta.decode_rows = decode_rows
        results.append(layer(positions, hidden, cache, meta))
    # Ops whose paged_attention takes every row (the CPU's C++ kernel) get the mixed step in one call.
    layer.ops = dataclasses.replace(ops, splits_decode_rows=False)
    results.append(layer(positions, hidden, cache, meta))
    assert calls == [("prefill", 7), ("decode", 2), ("prefill", 5), ("prefill", 7)]
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=1e-5)


def _state(b: ShardBatch) -> list:
    return [(x.id, list(x.block_table), x.chunk_len, x.computed_len) for x in b.requests]


@pytest.mark.parametrize(
    "call, match",
    [
        (StepCall(dropped_ids=(9,), num_requests=1), "drop of request 9, which the shard does not hold"),
        (StepCall(updates=(RequestUpdate(9),), num_requests=2), "update for request 9, which the shard does not"),
        (StepCall(dropped_ids=(1, 1), num_requests=1), "request 1 appears twice"),
        (StepCall(updates=(RequestUpdate(2), RequestUpdate(2)), num_requests=2), "request 2 appears twice"),
        (StepCall(dropped_ids=(1,), updates=(RequestUpdate(1),), num_requests=1), "dropped by this step"),
        (StepCall(dropped_ids=(1, 2), num_requests=0), "empty step"),
        (StepCall(num_requests=3), "names 3 requests to compute, the shard would compute 2"),
    ],
)
def test_bad_step_changes_nothing(ctx, call, match):
    b = batch(ctx, request(1, 3, [0]), request(2, 3, [1]))
    before = _state(b)
    with pytest.raises(InvalidArgumentError, match=match):
        b.apply_step(call, num_blocks=64)
    assert _state(b) == before


def test_new_request_ids_must_be_new_and_distinct(ctx):
    b = batch(ctx, request(1, 3, [0]))
    before = _state(b)
    held = request_from_proto(request(1, 3, [2]), ctx)
    with pytest.raises(InvalidArgumentError, match="new request 1 is already held"):
        b.apply_step(StepCall(requests=(held,), num_requests=2), num_blocks=64)
    twice = tuple(request_from_proto(request(5, 3, [k]), ctx) for k in (3, 4))
    with pytest.raises(InvalidArgumentError, match="request 5 appears twice"):
        b.apply_step(StepCall(requests=twice, num_requests=3), num_blocks=64)
    with pytest.raises(InvalidArgumentError, match="empty step"):
        ShardBatch([], BS).apply_step(StepCall(), num_blocks=64)
    assert _state(b) == before


def test_updates_append_blocks_and_set_chunks(ctx):
    b = batch(ctx, request(1, 10, [0], chunk_len=4))
    r = b.requests[0]
    r.computed_len += r.next_len
    r.chunk_len = None
    assert r.remaining_len == 6
    b.apply_step(StepCall(updates=(RequestUpdate(1, blocks=(5,), chunk_len=3),), num_requests=1), num_blocks=64)
    assert r.block_table == [0, 5] and r.next_len == 3


@pytest.mark.parametrize(
    "update, match",
    [
        (RequestUpdate(9), "does not hold"),
        (RequestUpdate(1, blocks=(64,)), "out of range"),
        (RequestUpdate(1, chunk_len=7), "chunk_len"),
        (RequestUpdate(1, chunk_len=0), "chunk_len"),
        (RequestUpdate(1, chunk_len=5), "block table"),  # positions 4..8 need a third block
    ],
)
def test_bad_update_changes_nothing(ctx, update, match):
    b = batch(ctx, request(1, 10, [0, 1], chunk_len=4), request(2, 3, [2]))
    r = b.requests[0]
    r.computed_len, r.chunk_len = 4, None
    before = [(list(x.block_table), x.chunk_len, x.computed_len) for x in b.requests]
    good = RequestUpdate(2, blocks=(3,))
    with pytest.raises(InvalidArgumentError, match=match):
        b.apply_step(StepCall(updates=(good, update), num_requests=2), num_blocks=64)
    assert [(list(x.block_table), x.chunk_len, x.computed_len) for x in b.requests] == before


@pytest.mark.parametrize(
    "req, match",
    [
        (pb.Request(id=1, blocks=[0]), "empty"),
        (request(1, 3, [64]), "out of range"),
        (request(1, 9, [0]), "block table"),
        (request(1, 3, [0], chunk_len=4), "chunk_len"),
        (request(1, 3, [0], cache_len=3), "cache_len"),
    ],
)
def test_from_proto_rejects(ctx, req, match):
    with pytest.raises(InvalidArgumentError, match=match):
        request_from_proto(req, ctx)


def test_resumed_request_counts_its_tokens(ctx):
    req = request(1, 5, [0, 1], generated_ids=[50, 51], prefill_logprobs=True)
    (r,) = batch(ctx, req).requests
    assert r.all_ids[-2:] == [50, 51] and r.num_generated == 2 and r.num_resumed == 2
    assert r.next_len == 7 and r.completes_context
    assert not r.wants_prompt_logprobs  # reported before the preemption
    too_many = request(1, 5, [0, 1], generated_ids=[50] * 5)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        batch(ctx, too_many)


def test_prompt_logprobs_start_with_nan_for_cached_positions(ctx):
    (r,) = batch(ctx, request(1, 10, [0, 1, 2], cache_len=4, prefill_logprobs=True)).requests
    assert len(r.prompt_logprobs) == 5 and all(math.isnan(x) for x in r.prompt_logprobs)
