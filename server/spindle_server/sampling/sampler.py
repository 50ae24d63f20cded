"""Turn a batch of logits into next tokens, their log-probs and top-n alternatives.

Per row, in TGI's order: repetition -> frequency -> presence penalty -> logit bias -> min-tokens mask
-> temperature -> top-k -> top-p -> min-p -> typical-p -> argmax (greedy) or a draw (sampling). Rows with default parameters cost nothing
beyond the batch-wide argmax and log-normalizer; penalties, filters and draws run only for the rows
that ask for them.

Draws are batched (one cumulative sum and one search for every sampling row) yet each row's token
depends only on its own distribution, its seed and its step: inverse-CDF sampling with one uniform per
row taken from step_seed(seed, step), so no generator object is made per row and no batch mate changes
a draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from spindle_kernels import argmax_logsumexp

from spindle_server.sampling.logits import apply_filters, apply_penalties_rows, apply_temperature
from spindle_server.sampling.params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SampleOutput:
    next_ids: list[int]
    logprobs: list[float]  # log-prob of the chosen token under the PROCESSED distribution
    # Per row, up to top_n[row] alternatives, best first; tokens the filters made impossible are omitted.
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a request's `step`-th draw: depends on nothing else, so a request draws
    the same tokens whatever its batch mates and after a preemption (step = tokens generated so far)."""
    return _splitmix64(_splitmix64(seed) ^ step)


def _uniform(seed: int, step: int) -> float:
    """A number in (0, 1) from the top 53 bits of step_seed(seed, step)."""
    return ((step_seed(seed, step) >> 11) + 0.5) / (1 << 53)


def _draw(probs: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """One token per row of `probs` [R, V]: the first v whose cumulative probability exceeds u_r * total_r.

    float64 sums, and a target strictly below each row's total, so a token of probability 0 (filtered)
    is never chosen.
    """
    u = torch.tensor([_uniform(s, t) for s, t in zip(seeds, steps, strict=True)], dtype=torch.float64,
                     device=probs.device)
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    steps: Sequence[int],
    top_n: Sequence[int],
) -> SampleOutput:
    """Choose one token per row of `logits` [B, V].

    `histories[i]`: every token id of row i so far (prompt + generated), for the penalties;
    `steps[i]`: tokens row i generated before this one; `top_n[i]`: alternatives to report.
    Greedy rows take the argmax of the processed scores; sampling rows draw from them with a
    generator seeded from (seed, step). Log-probs are log_softmax of the processed scores (TGI).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    for name, seq in (("params", params), ("histories", histories), ("steps", steps), ("top_n", top_n)):
        if len(seq) != batch:
            raise ValueError(f"{name} has {len(seq)} entries for {batch} rows of logits")

    # Unprocessed rows stay in the logits' dtype: the argmax and the log-normalizer read them as they are.
    scores = logits
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    warped = [i for i, p in enumerate(params) if p.has_warpers]
    if penalized or warped:
        scores = logits.float()
        if scores is logits:
            scores = scores.clone()  # never write into the caller's logits
    if penalized:
        apply_penalties_rows(scores, penalized, histories, params, steps)
    if warped:
        scores = apply_filters(apply_temperature(scores, params), params)

    # A row's log-softmax is scores - lse: no float32 copy of the logits and no full log-softmax per step.
    next_ids, lse = argmax_logsumexp(scores)
    sampling = [i for i, p in enumerate(params) if p.is_sampling]
    if sampling:
        rows = torch.tensor(sampling, dtype=torch.int64, device=scores.device)
        # softmax works row by row: a row's probabilities do not depend on how the batch was laid out
        probs = torch.softmax(scores.index_select(0, rows).float(), dim=-1)
        drawn = _draw(probs, [params[i].seed for i in sampling], [steps[i] for i in sampling])
        next_ids.index_copy_(0, rows, drawn)
    chosen = scores.gather(1, next_ids.unsqueeze(1)).squeeze(1).float() - lse

    top_ids: list[list[int]] = [[] for _ in range(batch)]
    top_logprobs: list[list[float]] = [[] for _ in range(batch)]
    k = min(max(top_n, default=0), vocab)
    if k > 0:
        values, indices = torch.topk(scores.float(), k, dim=-1)  # sorted, best first
        values = values - lse.unsqueeze(1)
        values_l, indices_l = values.tolist(), indices.tolist()
        for i, n in enumerate(top_n):
            kept = [j for j in range(min(n, k)) if values_l[i][j] != float("-inf")]
            top_ids[i] = [indices_l[i][j] for j in kept]
            top_logprobs[i] = [values_l[i][j] for j in kept]
    return SampleOutput(
        next_ids=next_ids.tolist(), logprobs=chosen.tolist(), top_ids=top_ids, top_logprobs=top_logprobs
    )
