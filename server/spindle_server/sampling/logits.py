"""Logits processors and warpers, applied in place to rows of scores.

Semantics follow transformers' processors (which TGI uses): RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper, all with
min_tokens_to_keep = 1. Each function takes `scores` [n, V] float32 and returns the processed
[n, V] tensor (possibly the same storage); filtered tokens get -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spindle_server.sampling.params import SamplingParams

_FILTERED = float("-inf")


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token seen in `history` [L] int64: positive logits divided by `penalty`, negative multiplied."""
    ids = torch.unique(history)
    seen = scores[:, ids]
    scores[:, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def apply_frequency_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` once per occurrence of each token in `history` (OpenAI semantics)."""
    counts = torch.bincount(history, minlength=scores.shape[-1]).to(scores.dtype)
    scores -= penalty * counts
    return scores


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best score (ties at the boundary survive)."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill_(scores < kth_best, _FILTERED)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability mass reaches `top_p` (at least one)."""
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # the best token always survives
    remove = remove_sorted.scatter(1, sorted_ids, remove_sorted)
    return scores.masked_fill_(remove, _FILTERED)


def apply_typical_p(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding: keep tokens whose surprisal is closest to the entropy, up to `mass`."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance = torch.abs(-logp - entropy)
    sorted_distance, sorted_ids = torch.sort(distance, descending=False)
    cumulative = scores.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    remove_sorted = sorted_distance > sorted_distance.gather(1, last.view(-1, 1))
    remove_sorted[..., :1] = False  # the most typical token always survives
    remove = remove_sorted.scatter(1, sorted_ids, remove_sorted)
    return scores.masked_fill_(remove, _FILTERED)


def apply_temperature(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Divide every row by its temperature in one op (rows at 1.0 are unchanged bit for bit)."""
    temps = [p.temperature for p in params]
    if all(t == 1.0 for t in temps):
        return scores
    return scores.div_(torch.tensor(temps, dtype=scores.dtype, device=scores.device).unsqueeze(1))


def apply_penalties(scores: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Repetition then frequency penalty on one row `scores` [1, V] (TGI's order)."""
    if not history:
        return scores
    ids = torch.tensor(history, dtype=torch.int64, device=scores.device)
    if params.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, ids, params.repetition_penalty)
    if params.frequency_penalty != 0.0:
        scores = apply_frequency_penalty(scores, ids, params.frequency_penalty)
    return scores


def apply_filters(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top-k -> top-p -> typical-p on one row `scores` [1, V] (temperature already applied)."""
    if params.top_k != 0:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    if params.typical_p < 1.0:
        scores = apply_typical_p(scores, params.typical_p)
    return scores
