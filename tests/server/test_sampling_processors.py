"""Each logits processor against transformers' implementation on random logits, and the whole
chain (penalties -> temperature -> top-k -> top-p -> typical-p) as seen through sample()'s log-probs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from spindle_server.sampling import SamplingParams, sample
from spindle_server.sampling.logits import (
    apply_filters,
    apply_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tests.helpers.logits import VOCAB, assert_same_filtering, random_logits


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    scores = random_logits(4, 1)
    g = torch.Generator().manual_seed(2)
    history = torch.randint(0, VOCAB, (4, 40), generator=g)  # duplicates included
    ref = RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
    ours = scores.clone()
    for i in range(4):
        apply_repetition_penalty(ours[i : i + 1], history[i], penalty)
    assert_same_filtering(ours, ref)
    assert not torch.equal(ours, scores)


@pytest.mark.parametrize("penalty", [-2.0, -0.5, 0.7, 2.0])
def test_frequency_penalty_subtracts_per_occurrence(penalty: float) -> None:
    scores = random_logits(1, 3)
    history = [5, 5, 5, 9, 17, 17, 299]
    ours = apply_frequency_penalty(scores.clone(), torch.tensor(history), penalty)
    expected = scores.clone()
    for token, count in Counter(history).items():
        expected[0, token] -= penalty * count
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(temperature: float) -> None:
    scores = random_logits(3, 4)
    ref = TemperatureLogitsWarper(temperature)(None, scores.clone())
    ours = apply_temperature(scores.clone(), [SamplingParams(temperature=temperature)] * 3)
    assert_same_filtering(ours, ref)


def test_temperature_is_per_row_and_leaves_unit_rows_untouched() -> None:
    scores = random_logits(3, 5)
    temps = [0.5, 1.0, 2.0]
    ours = apply_temperature(scores.clone(), [SamplingParams(temperature=t) for t in temps])
    for i, t in enumerate(temps):
        assert_same_filtering(ours[i : i + 1], TemperatureLogitsWarper(t)(None, scores[i : i + 1].clone()))
    assert torch.equal(ours[1], scores[1])


@pytest.mark.parametrize("top_k", [1, 2, 17, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(top_k: int) -> None:
    scores = random_logits(4, 6)
    ref = TopKLogitsWarper(top_k)(None, scores.clone())
    ours = apply_top_k(scores.clone(), top_k)
    assert_same_filtering(ours, ref)
    kept = (~torch.isinf(ours)).sum(-1)
    assert torch.all(kept == min(top_k, VOCAB))


def test_top_k_keeps_ties_at_the_boundary_like_transformers() -> None:
    scores = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    ours = apply_top_k(scores.clone(), 2)
    assert_same_filtering(ours, TopKLogitsWarper(2)(None, scores.clone()))
    assert (~torch.isinf(ours)).sum() == 4


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_top_p_matches_transformers(top_p: float, scale: float) -> None:
    scores = random_logits(4, 7, scale)
    ref = TopPLogitsWarper(top_p)(None, scores.clone())
    ours = apply_top_p(scores.clone(), top_p)
    assert_same_filtering(ours, ref)
    assert torch.all((~torch.isinf(ours)).sum(-1) >= 1)


@pytest.mark.parametrize("mass", [0.01, 0.2, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_typical_p_matches_transformers(mass: float, scale: float) -> None:
    scores = random_logits(4, 8, scale)
    ref = TypicalLogitsWarper(mass)(None, scores.clone())
    ours = apply_typical_p(scores.clone(), mass)
    assert_same_filtering(ours, ref)
    assert torch.all((~torch.isinf(ours)).sum(-1) >= 1)


def test_filters_run_top_k_then_top_p_then_typical() -> None:
    scores = random_logits(1, 9)
    params = SamplingParams(top_k=40, top_p=0.8, typical_p=0.9)
    chain = LogitsProcessorList([TopKLogitsWarper(40), TopPLogitsWarper(0.8), TypicalLogitsWarper(0.9)])
    assert_same_filtering(apply_filters(scores.clone(), [params]), chain(None, scores.clone()))


def test_filters_batched_over_rows_with_different_parameters() -> None:
    params = [
        SamplingParams(top_k=3),
        SamplingParams(),
        SamplingParams(top_p=0.5, typical_p=0.8),
        SamplingParams(top_k=100, top_p=0.95),
        SamplingParams(typical_p=0.3),
        SamplingParams(top_k=1, top_p=0.2, typical_p=0.9),
    ]
    scores = random_logits(len(params), 12)
    ours = apply_filters(scores.clone(), params)
    for i, p in enumerate(params):
        chain = LogitsProcessorList()
        if p.top_k:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            chain.append(TopPLogitsWarper(p.top_p))
        if p.typical_p < 1.0:
            chain.append(TypicalLogitsWarper(p.typical_p))
        assert_same_filtering(ours[i : i + 1], chain(None, scores[i : i + 1].clone()))
    assert torch.equal(ours[1], scores[1])


CHAIN_CASES = [
    SamplingParams(repetition_penalty=1.4),
    SamplingParams(frequency_penalty=0.8),
    SamplingParams(temperature=0.6, do_sample=True),
    SamplingParams(top_k=10),
    SamplingParams(top_p=0.7),
    SamplingParams(typical_p=0.5),
    SamplingParams(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        typical_p=0.95,
        repetition_penalty=1.2,
        frequency_penalty=-0.5,
        seed=7,
    ),
]


def _reference_scores(scores: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """TGI's order with transformers' processors; the frequency penalty written out by hand."""
    ids = torch.tensor([history])
    out = scores.clone()
    if p.repetition_penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, out)
    for token, count in Counter(history).items():
        out[0, token] -= p.frequency_penalty * count
    warpers = LogitsProcessorList()
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    return warpers(ids, out)


def test_whole_chain_logprobs_match_transformers_per_row_of_a_mixed_batch() -> None:
    logits = random_logits(len(CHAIN_CASES) + 1, 10)
    params = [*CHAIN_CASES, SamplingParams()]
    g = torch.Generator().manual_seed(11)
    histories = [torch.randint(0, VOCAB, (30,), generator=g).tolist() for _ in params]
    out = sample(logits.clone(), params, histories, [3] * len(params), [VOCAB] * len(params))
    for i, p in enumerate(params):
        ref = torch.log_softmax(_reference_scores(logits[i : i + 1], histories[i], p), dim=-1)[0]
        possible = ~torch.isinf(ref)
        # Every possible token is reported, best first, with its processed log-prob; impossible ones are not.
        assert sorted(out.top_ids[i]) == sorted(torch.nonzero(possible).flatten().tolist())
        got = torch.full((VOCAB,), float("-inf"))
        got[out.top_ids[i]] = torch.tensor(out.top_logprobs[i])
        torch.testing.assert_close(got[possible], ref[possible], rtol=0, atol=1e-5)
        assert out.logprobs[i] == pytest.approx(ref[out.next_ids[i]].item(), abs=1e-5)
        assert possible[out.next_ids[i]], "drew a filtered token"
        if not p.is_sampling:
            assert out.next_ids[i] == int(torch.argmax(ref))
