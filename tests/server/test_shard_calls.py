"""One llama shard process: log-probs against transformers, seeded sampling, and bad calls.

Bad calls must answer the right gRPC status, change nothing, and leave the shard serving.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from spindle_proto import generate_pb2 as pb

from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model
from tests.server.shard_harness import MiniRouter, Req, ShardGroup, greedy_params, warmup

pytestmark = pytest.mark.slow


def prompt(n: int, offset: int = 0) -> list[int]:
    return [1] + [(11 * i + offset) % 500 + 3 for i in range(n - 1)]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("model") / "llama", TinyModelSpec(arch="llama", seed=21))
    group = ShardGroup(path)
    try:
        # Before Warmup there is no KV cache: a Prefill is refused, and the shard keeps serving.
        with pytest.raises(grpc.RpcError) as err:
            group.call("Prefill", pb.PrefillRequest(batch=pb.Batch(id=1, requests=[_request(1, prompt(4))])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        num_blocks = warmup(group).num_blocks
        model, tokenizer = load_reference(path)
        yield group, num_blocks, model, tokenizer
    finally:
        group.close()


@pytest.fixture
def router(shard):
    group, num_blocks, _, _ = shard
    group.call("ClearCache", pb.ClearCacheRequest())
    return MiniRouter(group, num_blocks)


def _request(rid: int, ids: list[int], blocks=(0,), **kw) -> pb.Request:
    return pb.Request(id=rid, input_ids=ids, parameters=greedy_params(),
                      stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4, ignore_eos_token=True),
                      blocks=list(blocks), **kw)


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("chunk", [None, 7])
def test_logprobs_match_transformers(shard, router, chunk):
    _, _, model, _ = shard
    req = Req(0, prompt(23), 5, prefill_logprobs=True, top_n_tokens=3, chunk=chunk)
    router.run([req])
    full = req.prompt + req.tokens
    ref = _log_softmax(model, full)

    prefill = req.generations[0].prefill_tokens
    assert list(prefill.ids) == req.prompt
    assert math.isnan(prefill.logprobs[0])
    expected = [ref[i - 1, req.prompt[i]].item() for i in range(1, len(req.prompt))]
    assert prefill.logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(not g.HasField("prefill_tokens") for g in req.generations[1:])

    for step, gen in enumerate(req.generations):
        row = ref[len(req.prompt) - 1 + step]
        token = gen.tokens.ids[0]
        assert token == int(row.argmax())
        assert gen.tokens.logprobs[0] == pytest.approx(row[token].item(), abs=1e-4)
        (top,) = gen.top_tokens
        values, indices = row.topk(3)
        assert list(top.ids) == indices.tolist()  # best first
        assert list(top.logprobs) == pytest.approx(values.tolist(), abs=1e-4)
        assert list(top.logprobs) == sorted(top.logprobs, reverse=True)


def _sampling(seed: int) -> pb.NextTokenChooserParameters:
    return pb.NextTokenChooserParameters(temperature=1.5, top_p=1.0, typical_p=1.0, do_sample=True,
                                         seed=seed, repetition_penalty=1.0)


def test_same_seed_same_tokens_alone_and_in_a_batch_of_eight(router, shard):
    group, num_blocks, _, _ = shard
    alone = Req(0, prompt(9), 10, params=_sampling(1234))
    router.run([alone])
    assert alone.finished.seed == 1234

    mates = [Req(i, prompt(5 + 4 * i, offset=i), 10, params=_sampling(i)) for i in range(1, 8)]
    batched = Req(0, prompt(9), 10, params=_sampling(1234))
    MiniRouter(group, num_blocks).run(mates[:3] + [batched] + mates[3:])
    assert batched.tokens == alone.tokens
    # Different seeds do draw differently (otherwise the comparison above proves nothing).
    assert len({tuple(m.tokens) for m in mates} | {tuple(alone.tokens)}) > 1


def _status(group: ShardGroup, method: str, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        group.call(method, request)
    assert err.value.details()  # a message a person can act on
    return err.value.code()


def test_bad_calls_get_the_right_status_and_change_nothing(shard, router):
    group, num_blocks, model, _ = shard
    NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    req = Req(3, prompt(12), 6)
    router.prefill([req])
    cached = router.cached

    assert _status(group, "Decode", pb.DecodeRequest(batches=[pb.CachedBatch(id=999)])) == NOT_FOUND
    assert _status(group, "FilterBatch", pb.FilterBatchRequest(batch_id=999, request_ids=[3])) == NOT_FOUND
    prefill = pb.PrefillRequest(batch=pb.Batch(id=7, requests=[_request(8, prompt(4))]),
                                cached_batch=pb.CachedBatch(id=999))
    assert _status(group, "Prefill", prefill) == NOT_FOUND
    bad_prefills = {
        "empty batch": pb.Batch(id=7),
        "block out of range": pb.Batch(id=7, requests=[_request(8, prompt(4), blocks=[num_blocks])]),
        "too few blocks": pb.Batch(id=7, requests=[_request(8, prompt(20), blocks=[5])]),
        "duplicate id": pb.Batch(id=7, requests=[_request(8, prompt(4), [5]), _request(8, prompt(4), [6])]),
        "id already running": pb.Batch(id=7, requests=[_request(3, prompt(4), [5])]),
        "chunk beyond prompt": pb.Batch(id=7, requests=[_request(8, prompt(4), [5], chunk_len=5)]),
        "cache_len covers the prompt": pb.Batch(id=7, requests=[_request(8, prompt(4), [5], cache_len=4)]),
        "token outside vocab": pb.Batch(id=7, requests=[_request(8, [1, 10**6], [5])]),
        "invalid params": pb.Batch(id=7, requests=[pb.Request(
            id=8, input_ids=prompt(4), blocks=[5],
            parameters=pb.NextTokenChooserParameters(temperature=-1.0, top_p=1.0, typical_p=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4))]),
        "max_new_tokens 0": pb.Batch(id=7, requests=[_request(8, prompt(4), [5])]),
    }
    bad_prefills["max_new_tokens 0"].requests[0].stopping_parameters.max_new_tokens = 0
    for what, batch in bad_prefills.items():
        assert _status(group, "Prefill", pb.PrefillRequest(batch=batch)) == INVALID, what
    stale = pb.PrefillRequest(batch=pb.Batch(id=7, requests=[_request(8, prompt(4), [5])]),
                              cached_batch=pb.CachedBatch(id=cached.id, request_ids=[3, 99]))
    assert _status(group, "Prefill", stale) == INVALID
    # A bad update (block out of range) in a Decode is refused before anything moves.
    bad_update = pb.DecodeRequest(batches=[cached], updates=[pb.RequestUpdate(request_id=3, blocks=[num_blocks])])
    assert _status(group, "Decode", bad_update) == INVALID
    unknown = pb.DecodeRequest(batches=[cached], updates=[pb.RequestUpdate(request_id=42)])
    assert _status(group, "Decode", unknown) == INVALID
    assert _status(group, "FilterBatch", pb.FilterBatchRequest(batch_id=cached.id, request_ids=[42])) == INVALID

    # The batch is untouched: it decodes on to exactly the reference tokens.
    assert router.cached == cached
    while router.cached is not None:
        router.decode()
    ids = list(req.prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert req.tokens == ids[len(req.prompt):]
    group.call("Health", pb.HealthRequest())


def test_filter_and_clear(shard, router):
    group, _, _, _ = shard
    reqs = [Req(i, prompt(6 + i), 20) for i in range(3)]
    router.prefill(reqs)
    batch_id = router.cached.id
    kept = group.call("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=[0, 2]))
    assert list(kept.batch.request_ids) == [0, 2] and kept.batch.size == 2
    assert kept.batch.max_tokens == 2 * 16
    none = group.call("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=[]))
    assert not none.HasField("batch")
    assert _status(group, "Decode", pb.DecodeRequest(batches=[kept.batch])) == grpc.StatusCode.NOT_FOUND
    # ClearCache of an unknown id is fine (the goal state holds); of all, too.
    group.call("ClearCache", pb.ClearCacheRequest(id=12345))
    group.call("ClearCache", pb.ClearCacheRequest())


def test_decode_merges_batches(shard, router):
    group, num_blocks, _, _ = shard
    a, b = Req(0, prompt(5), 3), Req(1, prompt(9, offset=4), 6)
    router.prefill([a])
    first = router.cached
    other = MiniRouter(group, num_blocks)
    other._next_batch_id = 500
    other.free = [blk for blk in router.free]  # disjoint blocks: take them from the first router's pool
    router.free = router.free[len(router.free) // 2 :]
    other.free = other.free[: len(other.free) // 2]
    other.prefill([b])
    response = group.call("Decode", pb.DecodeRequest(batches=[first, other.cached]))
    assert response.batch.id == first.id and sorted(response.batch.request_ids) == [0, 1]
    assert {g.request_id for g in response.generations} == {0, 1}


def test_info(shard):
    group, _, _, _ = shard
    info = group.call("Info", pb.InfoRequest())
    assert (info.model_type, info.dtype, info.device_type, info.block_size) == ("llama", "float32", "cpu", 16)
    assert info.world_size == 1 and info.support_chunking and list(info.eos_token_ids) == [2]
