"""The OpenAI / vLLM sampling parameters on the shard: min_p, logit_bias, min_tokens (against transformers'
processors), the presence penalty (against a hand computation), stop_token_ids and their proto path."""

from __future__ import annotations

import math

import pytest
import torch
from spindle_proto import generate_pb2
from spindle_server.sampling import SamplingParams, sample
from spindle_server.sampling.logits import apply_min_p, apply_penalties, apply_presence_penalty
from spindle_server.sampling.stopping import FinishReason, StoppingCriteria
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from tests.helpers.logits import VOCAB, assert_same_filtering, random_logits


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_matches_transformers(min_p: float) -> None:
    scores = random_logits(4, 11)
    ref = MinPLogitsWarper(min_p)(None, scores.clone())
    ours = apply_min_p(scores.clone(), min_p)
    assert_same_filtering(ours, ref)
    assert torch.isinf(ours).any()


def test_min_p_in_the_chain_follows_top_p_like_transformers() -> None:
    scores = random_logits(2, 12)
    params = [SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1, seed=1), SamplingParams(min_p=0.3)]
    out = sample(scores, params, [[], []], [0, 0], [VOCAB, VOCAB])
    for row, (t, p, m) in enumerate([(0.7, 0.9, 0.1), (1.0, 1.0, 0.3)]):
        ref = scores[row : row + 1].clone()
        ref = TemperatureLogitsWarper(t)(None, ref) if t != 1.0 else ref
        ref = TopPLogitsWarper(p)(None, ref) if p < 1.0 else ref
        ref = MinPLogitsWarper(m)(None, ref)
        expected = torch.log_softmax(ref, dim=-1)[0]
        kept = {i: lp for i, lp in zip(out.top_ids[row], out.top_logprobs[row])}
        assert set(kept) == set(torch.nonzero(~torch.isinf(expected)).flatten().tolist())
        for i, lp in kept.items():
            assert math.isclose(lp, expected[i].item(), rel_tol=1e-5, abs_tol=1e-5)


def test_logit_bias_matches_transformers_sequence_bias() -> None:
    scores = random_logits(1, 13)
    bias = ((3, 5.0), (40, -100.0), (299, 0.5))
    ref = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(torch.tensor([[1, 2]]), scores.clone())
    ours = apply_penalties(scores.clone(), [], SamplingParams(logit_bias=bias), 0)
    assert_same_filtering(ours, ref)


def test_logit_bias_of_100_forces_its_token_greedily() -> None:
    scores = random_logits(1, 14)
    loser = int(scores[0].argmin())
    out = sample(scores, [SamplingParams(logit_bias=((loser, 100.0),))], [[1]], [0], [0])
    assert out.next_ids == [loser]


@pytest.mark.parametrize("min_new_tokens, step", [(3, 0), (3, 2), (3, 3)])
def test_min_tokens_masks_stop_ids_like_transformers(min_new_tokens: int, step: int) -> None:
    scores = random_logits(1, 15)
    eos = [7, 8]
    prompt = [1, 2, 3]
    ids = torch.tensor([prompt + [9] * step])
    ref = MinNewTokensLengthLogitsProcessor(len(prompt), min_new_tokens, eos)(ids, scores.clone())
    params = SamplingParams(min_new_tokens=min_new_tokens, min_tokens_banned_ids=tuple(eos))
    ours = apply_penalties(scores.clone(), prompt + [9] * step, params, step)
    assert_same_filtering(ours, ref)


def test_presence_penalty_is_additive_once_per_present_token() -> None:
    scores = random_logits(1, 16)
    history = [5, 5, 5, 9, 299]
    ours = apply_presence_penalty(scores.clone(), torch.tensor(history), 0.75)
    expected = scores.clone()
    for t in {5, 9, 299}:
        expected[0, t] -= 0.75  # once, however many times it occurs
    torch.testing.assert_close(ours, expected)


def test_presence_and_frequency_penalties_add_up() -> None:
    scores = random_logits(1, 17)
    history = [4, 4, 6]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    ours = apply_penalties(scores.clone(), history, params, 0)
    expected = scores.clone()
    expected[0, 4] -= 2 * 0.5 + 1.0
    expected[0, 6] -= 1 * 0.5 + 1.0
    torch.testing.assert_close(ours, expected)


def test_stop_token_ids_stop_as_eos_even_when_eos_is_ignored_but_not_before_min_tokens() -> None:
    s = StoppingCriteria(10, [], eos_token_ids=[2], ignore_eos_token=True, min_new_tokens=2, stop_token_ids=[50])
    assert s(50, "x") is None  # first token: min_new_tokens holds it back
    assert s(2, "") is None  # EOS ignored
    assert s(50, "x") is FinishReason.EOS_TOKEN


def test_proto_carries_the_new_parameters_and_rejects_out_of_range() -> None:
    pb = generate_pb2.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0,
                                                 presence_penalty=0.5, min_p=0.1, logit_bias={9: -3.0, 2: 1.5})
    p = SamplingParams.from_proto(pb)
    assert (p.presence_penalty, p.min_p, p.logit_bias) == (0.5, pytest.approx(0.1), ((2, 1.5), (9, -3.0)))
    assert p.has_warpers and p.has_penalties and not p.is_sampling  # min-p alone keeps the argmax
    for bad in ({"min_p": 1.5}, {"presence_penalty": 2.5}, {"logit_bias": {1: 101.0}}):
        with pytest.raises(ValueError):
            SamplingParams.from_proto(generate_pb2.NextTokenChooserParameters(
                temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, **bad))
