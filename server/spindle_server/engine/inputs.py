"""Flatten one step of a batch into the model's varlen inputs.

Every request contributes its next chunk `all_ids[computed_len : computed_len + next_len]`; chunks of
prefilling requests and single decode tokens sit side by side in one flat token axis:

    request:       r0 (prefill chunk, 3)   r1 (decode, 1)   r2 (chunk after a cached prefix, 4)
    rows:          0  1  2                 3                4  5  6  7
    positions:     0  1  2                 9                32 33 34 35     (computed_len + i)
    cu_seqlens_q:  0                       3                4               8
    context_lens:  3                       10               36              (computed_len + next_len)
    slot of row:   block_table[pos // block_size] * block_size + pos % block_size

A mixed step lists its single-token requests first (`AttentionMetadata.decode_rows`: they attend through
the decode kernel); `sample_row` and `prompt_rows` stay in the order of `requests`.

Logits are computed only for the rows that need them (`logit_rows`, increasing): the last row of a
request whose chunk reaches the end of its tokens (it samples), and every row of a chunk whose
prompt log-probs were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spindle_server.engine.request import RequestState
from spindle_server.layers.attention import AttentionMetadata, split_decode_rows


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [N] int64: rows of the hidden states whose logits the step needs
    # Per request, indexes into the [N, vocab] logits:
    sample_row: list[int | None]  # row to sample the next token from; None: prompt not complete yet
    prompt_rows: list[range | None]  # rows predicting its chunk's tokens 1.. (prompt log-probs), or None


def build_step_inputs(requests: Sequence[RequestState], block_size: int, device: torch.device) -> StepInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu_seqlens = [0]
    context_lens: list[int] = []
    logit_rows: list[int] = []
    sample_row: list[int | None] = [None] * len(requests)
    prompt_rows: list[range | None] = [None] * len(requests)
    max_q_len = 0
    singles = [i for i, r in enumerate(requests) if r.next_len == 1]
    num_decode = len(singles) if 0 < len(singles) < len(requests) else 0
    order = singles + [i for i, r in enumerate(requests) if r.next_len != 1] if num_decode else range(len(requests))
    for i in order:
        r = requests[i]
        start, n = r.computed_len, r.next_len
        table = r.block_table
        row0 = len(input_ids)
        input_ids.extend(r.all_ids[start : start + n])
        for p in range(start, start + n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        cu_seqlens.append(row0 + n)
        context_lens.append(start + n)
        max_q_len = max(max_q_len, n)

        if r.wants_prompt_logprobs:
            first = len(logit_rows)
            logit_rows.extend(range(row0, row0 + n))
            prompt_rows[i] = range(first, first + n)
            sample_row[i] = first + n - 1 if r.completes_context else None
        elif r.completes_context:
            sample_row[i] = len(logit_rows)
            logit_rows.append(row0 + n - 1)

    max_blocks = max(len(r.block_table) for r in requests)
    tables = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    for b, i in enumerate(order):
        table = requests[i].block_table
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)

    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_q_len=max_q_len,
        is_decode=max_q_len == 1,
    )
    if num_decode:
        meta.decode_rows = split_decode_rows(meta, num_decode)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        sample_row=sample_row,
        prompt_rows=prompt_rows,
    )
