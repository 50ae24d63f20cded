"""sample(): greedy rows, seeded sampling independent of batch mates, log-probs, top-n, validation."""

from __future__ import annotations

import math

import pytest
import spindle_server.sampling.sampler as sampler_module
import torch
from spindle_proto import generate_pb2
from spindle_server.sampling import SamplingParams, sample
from spindle_server.sampling.sampler import step_seed

GREEDY = SamplingParams()


def _logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_default_rows_are_one_argmax_and_one_log_normalizer(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("per-row work for a row with default parameters")

    for name in ("apply_penalties_rows", "apply_filters", "_draw"):
        monkeypatch.setattr(sampler_module, name, forbidden)
    logits = _logits(32, 50_000, 0)
    before = logits.clone()
    histories = [list(range(100))] * 32
    out = sample(logits, [GREEDY] * 32, histories, [0] * 32, [0] * 32)
    assert out.next_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)
    assert out.top_ids == [[]] * 32 and out.top_logprobs == [[]] * 32
    assert torch.equal(logits, before)


def test_bfloat16_logits_choose_as_their_float32_copy_does() -> None:
    # Unprocessed rows are read in the logits' dtype (no float32 copy): same tokens, log-probs, top-n and
    # seeded draws as from the exact float32 copy, with greedy, penalized and sampling rows in one batch.
    logits = _logits(4, 3000, 7).bfloat16()
    params = [GREEDY, SamplingParams(repetition_penalty=1.3), SamplingParams(do_sample=True, seed=5), GREEDY]
    histories = [list(range(50))] * 4
    args = (params, histories, [3] * 4, [3, 0, 2, 5])
    got, want = sample(logits, *args), sample(logits.float(), *args)
    assert got.next_ids == want.next_ids and got.top_ids == want.top_ids
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-5)
    for a, b in zip(got.top_logprobs, want.top_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


def test_processing_never_writes_into_the_callers_logits() -> None:
    logits = _logits(3, 100, 1)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(temperature=0.5, top_k=3), GREEDY]
    sample(logits, params, [[1, 2, 3]] * 3, [0] * 3, [5] * 3)
    assert torch.equal(logits, before)


def test_greedy_with_penalty_is_argmax_of_the_penalized_scores() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.0, -1.0]])
    out = sample(logits, [SamplingParams(repetition_penalty=2.0)], [[1]], [0], [0])
    assert out.next_ids == [2]  # token 1 drops to 2.5 < 4.0


def _sampler_params(seed: int) -> SamplingParams:
    return SamplingParams(
        do_sample=True, temperature=1.3, top_k=60, top_p=0.95, repetition_penalty=1.1, seed=seed
    )


def _generate(logit_rows: list[torch.Tensor], batch_of: int, target: int, mates_seed: int) -> list[int]:
    """Draw a token per step for the request at row `target` of a batch of `batch_of` rows whose
    other rows (logits, params, histories, steps) come from `mates_seed`."""
    params = _sampler_params(1234)
    history = [5, 6, 7]
    drawn = []
    g = torch.Generator().manual_seed(mates_seed)
    mate_params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=99),
        SamplingParams(temperature=0.5, seed=mates_seed),
        SamplingParams(top_p=0.5, frequency_penalty=1.0, seed=3),
        SamplingParams(typical_p=0.7, do_sample=True, seed=mates_seed + 1),
        SamplingParams(top_k=2, seed=1234),  # same seed as the target, other parameters
        _sampler_params(1234),  # identical parameters, another step
    ]
    for step, row in enumerate(logit_rows):
        logits = torch.randn(batch_of, row.shape[0], generator=g) * 3
        logits[target] = row
        all_params = [mate_params[i % len(mate_params)] for i in range(batch_of)]
        all_params[target] = params
        histories = [torch.randint(0, row.shape[0], (8,), generator=g).tolist() for _ in range(batch_of)]
        histories[target] = list(history)
        steps = [step + 1 + i for i in range(batch_of)]
        steps[target] = step
        out = sample(logits, all_params, histories, steps, [2] * batch_of)
        drawn.append(out.next_ids[target])
        history.append(out.next_ids[target])
    return drawn


def test_seeded_sampling_is_the_same_alone_and_inside_batches_of_8() -> None:
    rows = list(_logits(12, 500, 2, scale=1.0))
    alone = _generate(rows, 1, 0, mates_seed=0)
    assert _generate(rows, 8, 3, mates_seed=10) == alone
    assert _generate(rows, 8, 7, mates_seed=20) == alone
    assert len(set(alone)) > 3, "a flat distribution sampled 12 times should not repeat this much"


def test_resuming_at_a_step_redraws_the_same_token() -> None:
    logits = _logits(1, 500, 3, scale=0.5)
    params = [_sampler_params(42)]
    first = [sample(logits, params, [[1]], [s], [0]).next_ids[0] for s in range(10)]
    again = [sample(logits, params, [[1]], [s], [0]).next_ids[0] for s in range(10)]
    assert first == again
    assert len(set(first)) > 3, "different steps must draw independently"


def test_different_seeds_draw_different_tokens() -> None:
    logits = _logits(1, 1000, 4, scale=0.5)
    runs = {
        tuple(
            sample(logits, [SamplingParams(do_sample=True, seed=seed)], [[]], [s], [0]).next_ids[0]
            for s in range(8)
        )
        for seed in (0, 1, 2, 2**64 - 1)
    }
    assert len(runs) == 4


def test_step_seed_mixes_seed_and_step() -> None:
    seeds = {step_seed(seed, step) for seed in range(50) for step in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**64 for s in seeds)


def test_sampling_follows_the_processed_distribution() -> None:
    # 4 possible tokens after top_k; frequencies over many steps track the softmax of the survivors.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = [SamplingParams(top_k=4, seed=5)]
    n = 4000
    counts = torch.zeros(6)
    for step in range(n):
        counts[sample(logits, params, [[]], [step], [0]).next_ids[0]] += 1
    expected = torch.softmax(logits[0, :4], -1)
    assert counts[4:].sum() == 0
    assert torch.all((counts[:4] / n - expected).abs() < 0.03), (counts / n, expected)


def test_top_n_is_best_first_and_includes_the_greedy_choice() -> None:
    logits = _logits(3, 200, 6)
    out = sample(
        logits, [GREEDY, SamplingParams(temperature=0.7, seed=1), GREEDY], [[]] * 3, [0] * 3, [5, 3, 0]
    )
    assert [len(ids) for ids in out.top_ids] == [5, 3, 0]
    for i in (0, 1):
        assert out.top_logprobs[i] == sorted(out.top_logprobs[i], reverse=True)
        logp = torch.log_softmax(logits[i] / (0.7 if i == 1 else 1.0), -1)
        assert out.top_ids[i] == torch.topk(logp, len(out.top_ids[i])).indices.tolist()
        torch.testing.assert_close(torch.tensor(out.top_logprobs[i]), logp[out.top_ids[i]], rtol=0, atol=1e-5)
    assert out.top_ids[0][0] == out.next_ids[0]
    assert out.top_logprobs[0][0] == pytest.approx(out.logprobs[0])


def test_top_n_omits_tokens_the_filters_made_impossible() -> None:
    logits = _logits(1, 50, 7)
    out = sample(logits, [SamplingParams(top_k=2, seed=0)], [[]], [0], [5])
    assert len(out.top_ids[0]) == 2
    assert all(math.isfinite(v) for v in out.top_logprobs[0])
    assert math.fsum(math.exp(v) for v in out.top_logprobs[0]) == pytest.approx(1.0, abs=1e-5)


def test_sample_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="histories has 1 entries for 2 rows"):
        sample(_logits(2, 10, 0), [GREEDY] * 2, [[]], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.zeros(10), [GREEDY], [[]], [0], [0])


def _pb(**fields) -> generate_pb2.NextTokenChooserParameters:
    base = dict(
        temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, frequency_penalty=0.0
    )
    base.update(fields)
    return generate_pb2.NextTokenChooserParameters(**base)


def test_from_proto_converts_every_field() -> None:
    p = SamplingParams.from_proto(
        _pb(
            temperature=0.5,
            top_k=7,
            top_p=0.75,
            typical_p=0.5,
            do_sample=True,
            seed=2**64 - 1,
            repetition_penalty=1.25,
            frequency_penalty=-1.5,
        )
    )
    assert p == SamplingParams(0.5, 7, 0.75, 0.5, True, 2**64 - 1, 1.25, -1.5)
    assert p.is_sampling
    assert not SamplingParams.from_proto(_pb()).is_sampling
    assert not SamplingParams.from_proto(_pb(repetition_penalty=1.5, frequency_penalty=1.0)).is_sampling


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", 0.0, "temperature"),
        ("temperature", -1.0, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("typical_p", 0.0, "typical_p"),
        ("typical_p", 1.01, "typical_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("frequency_penalty", 2.5, "frequency_penalty"),
        ("frequency_penalty", -2.01, "frequency_penalty"),
        ("frequency_penalty", float("inf"), "frequency_penalty"),
    ],
)
def test_from_proto_rejects_out_of_range_values(field: str, value: float, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        SamplingParams.from_proto(_pb(**{field: value}))


def test_negative_top_k_is_rejected() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


@pytest.mark.parametrize("field", ["temperature", "do_sample", "top_k", "top_p", "typical_p"])
def test_is_sampling_follows_tgi(field: str) -> None:
    value = {"temperature": 0.9, "do_sample": True, "top_k": 5, "top_p": 0.9, "typical_p": 0.9}[field]
    assert SamplingParams(**{field: value}).is_sampling


def test_sampling_rows_draw_in_one_batched_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # No generator and no kernels per row: every sampling row of the step goes through one _draw.
    calls = []
    real = sampler_module._draw

    def counting(probs, seeds, steps):
        calls.append((probs.shape[0], list(seeds), list(steps)))
        return real(probs, seeds, steps)

    monkeypatch.setattr(sampler_module, "_draw", counting)
    params = [SamplingParams(do_sample=True, seed=s) for s in (1, 2, 3)] + [GREEDY, _sampler_params(9)]
    out = sample(_logits(5, 300, 7), params, [[1]] * 5, [4, 5, 6, 7, 8], [0] * 5)
    assert calls == [(4, [1, 2, 3, 9], [4, 5, 6, 8])] and len(out.next_ids) == 5


def test_draws_never_pick_a_filtered_token() -> None:
    # Inverse-CDF draws over rows whose mass sits on a few tokens (the rest filtered to probability 0),
    # for many seeds: the chosen token always has positive probability, and each row follows its own seed.
    probs = torch.zeros(3, 50, dtype=torch.float32)
    probs[0, [3, 49]] = torch.tensor([0.25, 0.75])
    probs[1, 0] = 1.0
    probs[2, 10:20] = 0.1
    for seed in range(200):
        drawn = sampler_module._draw(probs, [seed, seed + 1, seed + 2], [seed, 0, 7])
        assert all(probs[r, t] > 0 for r, t in enumerate(drawn.tolist()))
        alone = sampler_module._draw(probs[2:], [seed + 2], [7])
        assert drawn[2] == alone[0]


def test_batched_penalties_equal_row_by_row() -> None:
    # One batched pass over rows with different penalties and history lengths (and one row left alone)
    # gives every row exactly what penalizing it alone gives.
    from spindle_server.sampling.logits import apply_penalties, apply_penalties_rows

    logits = _logits(5, 200, 11)
    params = [
        SamplingParams(repetition_penalty=1.3),
        GREEDY,
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.2, logit_bias=((5, 3.0),)),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5),
        SamplingParams(logit_bias=((7, -2.0),)),
    ]
    histories = [[1, 2, 2, 3], [4], [9, 9, 9, 150, 1], list(range(0, 200, 3)), []]
    rows = [0, 2, 3, 4]
    batched = apply_penalties_rows(logits.clone(), rows, histories, params, [0] * 5)
    for i in range(5):
        alone = apply_penalties(logits[i : i + 1].clone(), histories[i], params[i], 0) if i in rows else logits[i : i + 1]
        assert torch.equal(batched[i : i + 1], alone), i
