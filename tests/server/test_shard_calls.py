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
        # Before Warmup there is no KV cache: a Step is refused, and the shard keeps serving.
        with pytest.raises(grpc.RpcError) as err:
            group.call("Step", pb.StepRequest(requests=[_request(1, prompt(4))], num_requests=1))
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


def _refused(group: ShardGroup, request: pb.StepRequest) -> str:
    """The Step's error message; its status must be INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as err:
        group.call("Step", request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()  # a message a person can act on
    return err.value.details()


def _reference(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_bad_steps_get_invalid_argument_and_change_nothing(shard, router):
    """The step contract: bad ids, duplicate ids, an empty step, bad blocks or chunks, a wrong count are each
    refused before anything changes, and the shard serves on as if they had never come."""
    group, num_blocks, model, _ = shard
    req = Req(3, prompt(12), 6)
    router.step([req])
    free = router.free[0]

    def step(**kw) -> pb.StepRequest:
        return pb.StepRequest(num_requests=kw.pop("num_requests", 1), **kw)

    bad_steps = {
        "drop of an unknown id": (step(dropped_ids=[42]), "drop of request 42, which the shard does not hold"),
        "update of an unknown id": (step(updates=[pb.RequestUpdate(request_id=42)]), "request 42"),
        "new id already held": (step(requests=[_request(3, prompt(4), [free])], num_requests=2),
                                "new request 3 is already held"),
        "new id twice": (step(requests=[_request(8, prompt(4), [free]), _request(8, prompt(4), [free + 1])],
                              num_requests=3), "request 8 appears twice"),
        "two updates of one id": (step(updates=[pb.RequestUpdate(request_id=3)] * 2), "request 3 appears twice"),
        "drop twice": (step(dropped_ids=[3, 3], requests=[_request(8, prompt(4), [free])]),
                       "request 3 appears twice"),
        "update of a dropped id": (step(dropped_ids=[3], updates=[pb.RequestUpdate(request_id=3)],
                                        requests=[_request(8, prompt(4), [free])]), "dropped by this step"),
        "empty step": (step(dropped_ids=[3], num_requests=0), "empty step"),
        "count disagrees": (step(num_requests=2), "names 2 requests"),
        "update block out of range": (step(updates=[pb.RequestUpdate(request_id=3, blocks=[num_blocks])]),
                                      "out of range"),
        "a step out of order": (step(seq=router.seq + 2), "steps must run in the order sent"),
    }
    bad_new = {
        "block out of range": _request(8, prompt(4), blocks=[num_blocks]),
        "too few blocks": _request(8, prompt(20), blocks=[free]),
        "chunk beyond prompt": _request(8, prompt(4), [free], chunk_len=5),
        "cache_len covers the prompt": _request(8, prompt(4), [free], cache_len=4),
        "token outside vocab": _request(8, [1, 10**6], [free]),
        "invalid params": pb.Request(
            id=8, input_ids=prompt(4), blocks=[free],
            parameters=pb.NextTokenChooserParameters(temperature=-1.0, top_p=1.0, typical_p=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4)),
        "max_new_tokens 0": _request(8, prompt(4), [free]),
    }
    bad_new["max_new_tokens 0"].stopping_parameters.max_new_tokens = 0
    for what, new in bad_new.items():
        bad_steps[what] = (step(requests=[new], num_requests=2), "request 8")
    for what, (request, message) in bad_steps.items():
        assert message in _refused(group, request), what

    # Nothing moved: the shard still holds exactly request 3 (a Step counting one request is accepted, so no
    # bad new request was kept, nor 3 dropped), and it decodes on to exactly the reference tokens (its KV
    # blocks were not written by a refused call).
    assert router.held == [3] and list(router.active) == [3]
    while router.is_running:
        router.decode()
    assert req.tokens == _reference(model, req.prompt, 6)
    # The finished request is dropped by the next step, which the blocks the refused calls named serve.
    late = Req(8, prompt(4), 3)
    router.step([late])
    assert router.held == [8]
    while router.is_running:
        router.decode()
    assert late.tokens == _reference(model, late.prompt, 3)
    group.call("Health", pb.HealthRequest())


def test_finished_requests_stay_until_dropped(shard, router):
    """A finished request stays on the shard until a step drops it: without the drop the count disagrees."""
    group, _, _, _ = shard
    a, b = Req(0, prompt(5), 2), Req(1, prompt(9, offset=4), 5)
    router.step([a, b])
    router.decode()
    assert a.finished is not None and router.held == [0, 1] and list(router.active) == [1]
    assert "names 1 requests to compute, the shard would compute 2" in _refused(group, pb.StepRequest(num_requests=1))
    router.decode()  # drops 0
    assert router.held == [1]
    # ClearCache forgets everything: a step naming request 1 is refused after it.
    group.call("ClearCache", pb.ClearCacheRequest())
    assert "does not hold" in _refused(group, pb.StepRequest(updates=[pb.RequestUpdate(request_id=1)],
                                                             num_requests=1))


def test_info(shard):
    group, _, _, _ = shard
    info = group.call("Info", pb.InfoRequest())
    assert (info.model_type, info.dtype, info.device_type, info.block_size) == ("llama", "float32", "cpu", 16)
    assert info.world_size == 1 and info.support_chunking and list(info.eos_token_ids) == [2]
