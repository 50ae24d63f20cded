"""Logits processors and warpers, applied in place to rows of scores.

Semantics follow transformers' processors (which TGI uses): RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper, all
with min_tokens_to_keep = 1; SequenceBiasLogitsProcessor for single-token biases (OpenAI's logit_bias);
MinNewTokensLengthLogitsProcessor for min_tokens. The presence and frequency penalties are OpenAI's. Each function takes `scores` [n, V] float32 and returns the processed
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


def apply_presence_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` once from every token present in `history` (OpenAI semantics)."""
    scores[:, torch.unique(history)] -= penalty
    return scores


def apply_logit_bias(scores: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Add each (token id, bias) to that token's score."""
    ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=scores.device)
    scores[:, ids] += torch.tensor([b for _, b in bias], dtype=scores.dtype, device=scores.device)
    return scores


def apply_min_p(scores: torch.Tensor, min_p: float | Sequence[float]) -> torch.Tensor:
    """Keep, per row, tokens whose probability is at least min_p x the best token's (the best survives)."""
    probs = scores.softmax(dim=-1)
    threshold = _column(min_p, scores) * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill_(probs < threshold, _FILTERED)


def _column(values: float | Sequence[float], scores: torch.Tensor) -> torch.Tensor:
    """One value per row as an [n, 1] tensor of the scores' dtype (a scalar applies to every row)."""
    if isinstance(values, (int, float)):
        values = [values] * scores.shape[0]
    return torch.tensor(values, dtype=scores.dtype, device=scores.device).unsqueeze(1)


def apply_top_k(scores: torch.Tensor, top_k: int | Sequence[int]) -> torch.Tensor:
    """Keep, per row, tokens scoring at least its k-th best score (ties at the boundary survive)."""
    ks = [top_k] * scores.shape[0] if isinstance(top_k, int) else list(top_k)
    ks = [min(max(k, 1), scores.shape[-1]) for k in ks]
    best = torch.topk(scores, max(ks), dim=-1).values
    last = torch.tensor(ks, dtype=torch.int64, device=scores.device).unsqueeze(1) - 1
    kth_best = best.gather(1, last)
    return scores.masked_fill_(scores < kth_best, _FILTERED)


def apply_top_p(scores: torch.Tensor, top_p: float | Sequence[float]) -> torch.Tensor:
    """Keep, per row, the smallest set of best tokens whose probability mass reaches top_p (at least one)."""
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    tops = [top_p] * scores.shape[0] if isinstance(top_p, (int, float)) else list(top_p)
    remove_sorted = cumulative <= _column([1 - p for p in tops], scores)
    remove_sorted[..., -1:] = False  # the best token always survives
    remove = remove_sorted.scatter(1, sorted_ids, remove_sorted)
    return scores.masked_fill_(remove, _FILTERED)


def apply_typical_p(scores: torch.Tensor, mass: float | Sequence[float]) -> torch.Tensor:
    """Typical decoding: keep, per row, tokens whose surprisal is closest to the entropy, up to `mass`."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance = torch.abs(-logp - entropy)
    sorted_distance, sorted_ids = torch.sort(distance, descending=False)
    cumulative = scores.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < _column(mass, scores)).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
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


def apply_penalties(
    scores: torch.Tensor, history: Sequence[int], params: SamplingParams, num_generated: int
) -> torch.Tensor:
    """On one row `scores` [1, V]: repetition, frequency and presence penalty over `history` (TGI's order),
    then the logit bias, then, while fewer than min_new_tokens were generated, the banned stop ids."""
    return apply_penalties_rows(scores, [0], [history], [params], [num_generated])


def apply_penalties_rows(
    scores: torch.Tensor,
    rows: Sequence[int],
    histories: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    num_generated: Sequence[int],
) -> torch.Tensor:
    """`apply_penalties` on `rows` of `scores` [B, V] in place (histories, params, num_generated indexed by
    row). Each history penalty runs once for all its rows, on the seen ids [R, L] (one host-to-device copy
    of the padded histories; torch.unique would sync once per row); only the frequency penalty, which needs
    counts, makes a dense [R, V] tensor."""
    with_history = [i for i in rows if histories[i]]
    if with_history:
        width = max(len(histories[i]) for i in with_history)
        flat: list[int] = []
        for i in with_history:  # padded with the row's first id: seen anyway, so gathers and scatters agree
            flat.extend(histories[i])
            flat.extend([histories[i][0]] * (width - len(histories[i])))
        ids = torch.tensor(flat, dtype=torch.int64, device=scores.device).view(len(with_history), width)
        _penalize_seen(scores, with_history, ids, [params[i].repetition_penalty for i in with_history], 1.0,
                       lambda seen, p: torch.where(seen < 0, seen * p, seen / p))
        freq = [k for k, i in enumerate(with_history) if params[i].frequency_penalty != 0.0]
        if freq:
            lengths = torch.tensor([len(histories[with_history[k]]) for k in freq], device=scores.device)
            real = torch.arange(width, device=scores.device)[None, :] < lengths[:, None]  # not padding
            counts = torch.zeros(len(freq), scores.shape[1], dtype=scores.dtype, device=scores.device)
            counts.scatter_add_(1, ids[freq], real.to(scores.dtype))
            index = torch.tensor([with_history[k] for k in freq], dtype=torch.int64, device=scores.device)
            penalty = _column([params[with_history[k]].frequency_penalty for k in freq], scores)
            scores.index_copy_(0, index, scores.index_select(0, index) - penalty * counts)
        _penalize_seen(scores, with_history, ids, [params[i].presence_penalty for i in with_history], 0.0,
                       lambda seen, p: seen - p)
    for i in rows:
        p = params[i]
        if p.logit_bias:
            scores[i : i + 1] = apply_logit_bias(scores[i : i + 1], p.logit_bias)
        if num_generated[i] < p.min_new_tokens and p.min_tokens_banned_ids:
            scores[i, list(p.min_tokens_banned_ids)] = _FILTERED
    return scores


def _penalize_seen(scores, rows, ids, penalties, neutral, fn) -> None:  # type: ignore[no-untyped-def]
    """scores[row, id] = fn(scores[row, id], penalty) for every id row has seen, rows whose penalty is not
    `neutral` only (duplicate ids write the same value)."""
    picked = [k for k, p in enumerate(penalties) if p != neutral]
    if not picked:
        return
    index = torch.tensor([rows[k] for k in picked], dtype=torch.int64, device=scores.device)
    seen_ids = ids[picked]
    sub = scores.index_select(0, index)
    seen = sub.gather(1, seen_ids)
    sub.scatter_(1, seen_ids, fn(seen, _column([penalties[k] for k in picked], scores)))
    scores.index_copy_(0, index, sub)


def _on_rows(scores: torch.Tensor, rows: list[int], apply, values: list) -> torch.Tensor:
    """Run one filter as a single batched op over `rows` of `scores`, with one value per row."""
    if len(rows) == scores.shape[0]:
        return apply(scores, values)
    index = torch.tensor(rows, dtype=torch.int64, device=scores.device)
    return scores.index_copy_(0, index, apply(scores[index], values))  # index_select: slow on CPU


def apply_filters(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k -> top-p -> min-p -> typical-p on `scores` [B, V] (one params per row; temperature already
    applied; transformers' order). Each filter is one batched op over the rows that use it."""
    rows = [i for i, p in enumerate(params) if p.top_k != 0]
    if rows:
        scores = _on_rows(scores, rows, apply_top_k, [params[i].top_k for i in rows])
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if rows:
        scores = _on_rows(scores, rows, apply_top_p, [params[i].top_p for i in rows])
    rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if rows:
        scores = _on_rows(scores, rows, apply_min_p, [params[i].min_p for i in rows])
    rows = [i for i, p in enumerate(params) if p.typical_p < 1.0]
    if rows:
        scores = _on_rows(scores, rows, apply_typical_p, [params[i].typical_p for i in rows])
    return scores
