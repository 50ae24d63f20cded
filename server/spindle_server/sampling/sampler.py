"""Turn a batch of logits into next tokens, their log-probs and top-n alternatives.

Per row, in TGI's order: repetition -> frequency -> presence penalty -> logit bias -> min-tokens mask
-> temperature -> top-k -> top-p -> min-p -> typical-p -> argmax (greedy) or a draw (sampling). Rows with default parameters cost nothing
beyond the batch-wide argmax and log_softmax; penalties, filters and draws run only for the rows
that ask for them.

Draws are batched (one set of kernels for every sampling row) yet each row's token depends only on its
own distribution, its seed and its step: an exponential race, argmax_v p[v] / E[v] with E[v] ~ Exp(1),
picks v with probability p[v], and E comes from a counter-based hash of (step_seed(seed, step), v)
computed on the device, so no generator object is made per row and no batch mate changes a draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's >> is arithmetic on negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 in (0, 1): splitmix64 of (key_r + (v + 1) * golden), int64 arithmetic wrapping."""
    index = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    x = keys[:, None] + index[None, :] * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) * (1.0 / (1 << 24))  # the top 24 bits, centred


def _draw(probs: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """One token per row of `probs` [R, V], row r drawn with the key step_seed(seeds[r], steps[r])."""
    keys = torch.tensor([_signed64(step_seed(s, t)) for s, t in zip(seeds, steps, strict=True)],
                        dtype=torch.int64, device=probs.device)
    exponentials = -torch.log(_uniforms(keys, probs.shape[1]))
    return torch.argmax(probs / exponentials, dim=-1)


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

    scores = logits.float()
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    warped = [i for i, p in enumerate(params) if p.has_warpers]
    if (penalized or warped) and scores is logits:
        scores = scores.clone()  # never write into the caller's logits
    if penalized:
        apply_penalties_rows(scores, penalized, histories, params, steps)
    if warped:
        scores = apply_filters(apply_temperature(scores, params), params)

    logprobs = torch.log_softmax(scores, dim=-1)
    next_ids = scores.argmax(dim=-1)
    sampling = [i for i, p in enumerate(params) if p.is_sampling]
    if sampling:
        next_ids = next_ids.clone()
        rows = torch.tensor(sampling, dtype=torch.int64, device=scores.device)
        # softmax works row by row: a row's probabilities do not depend on how the batch was laid out
        probs = torch.softmax(scores.index_select(0, rows), dim=-1)
        drawn = _draw(probs, [params[i].seed for i in sampling], [steps[i] for i in sampling])
        next_ids.index_copy_(0, rows, drawn)
    chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)

    top_ids: list[list[int]] = [[] for _ in range(batch)]
    top_logprobs: list[list[float]] = [[] for _ in range(batch)]
    k = min(max(top_n, default=0), vocab)
    if k > 0:
        values, indices = torch.topk(logprobs, k, dim=-1)  # sorted, best first
        values_l, indices_l = values.tolist(), indices.tolist()
        for i, n in enumerate(top_n):
            kept = [j for j in range(min(n, k)) if values_l[i][j] != float("-inf")]
            top_ids[i] = [indices_l[i][j] for j in kept]
            top_logprobs[i] = [values_l[i][j] for j in kept]
    return SampleOutput(
        next_ids=next_ids.tolist(), logprobs=chosen.tolist(), top_ids=top_ids, top_logprobs=top_logprobs
    )
