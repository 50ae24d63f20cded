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


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class HostStaging:
    """Sends a step's integer inputs to the device in one copy (CUDA: from pinned memory, non-blocking).

    One int64 buffer, every segment starting 16-byte aligned, so kernels see the same pointer alignment at
    every step (no new Triton specialization):

        int64 segments (each padded to 2 elements)  | int32 segments, sent as int64 (each padded to 4)
        input_ids | positions | slots | logit_rows   | cu_seqlens_q | context_lens | block_tables
                                                      '-- one cast to int32 on the device --'

    Two pinned buffers alternate; one is rewritten only once the copy that last read it has completed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def send(
        self, int64_segments: Sequence[Sequence[int]], int32_segments: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device tensors of each segment's values (int64, then int32), in the order given."""
        sizes64 = [_padded(len(seg), 2) for seg in int64_segments]
        sizes32 = [_padded(len(seg), 4) for seg in int32_segments]
        flat: list[int] = []
        for seg, size in zip([*int64_segments, *int32_segments], sizes64 + sizes32, strict=True):
            flat.extend(seg)
            flat.extend([0] * (size - len(seg)))
        host = torch.tensor(flat, dtype=torch.int64)
        sent = self._copy(host) if self.device.type == "cuda" else host
        split = sum(sizes64)
        part64, part32 = sent[:split], sent[split:].to(torch.int32)
        return (self._views(part64, int64_segments, sizes64), self._views(part32, int32_segments, sizes32))

    @staticmethod
    def _views(flat: torch.Tensor, segments: Sequence[Sequence[int]], sizes: list[int]) -> list[torch.Tensor]:
        views, offset = [], 0
        for seg, size in zip(segments, sizes, strict=True):
            views.append(flat[offset : offset + len(seg)])
            offset += size
        return views

    def _copy(self, host: torch.Tensor) -> torch.Tensor:
        turn, self._turn = self._turn, self._turn ^ 1
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # its last copy has read the buffer: safe to overwrite
        pinned = self._pinned[turn]
        if pinned is None or pinned.numel() < host.numel():
            pinned = torch.empty(max(host.numel(), 4096), dtype=torch.int64, pin_memory=True)
            self._pinned[turn] = pinned
        n = host.numel()
        pinned[:n].copy_(host)
        sent = pinned[:n].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[turn] = event
        return sent


def build_step_inputs(
    requests: Sequence[RequestState], block_size: int, device: torch.device, staging: HostStaging | None = None
) -> StepInputs:
    """The step's flattened inputs on `device`, sent in one copy through `staging` (the runner's, reused)."""
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
    tables: list[int] = []
    for i in order:
        table = requests[i].block_table
        tables.extend(table)
        tables.extend([0] * (max_blocks - len(table)))

    staging = staging or HostStaging(device)
    (ids_t, positions_t, slots_t, logit_rows_t), (cu_t, context_t, tables_t) = staging.send(
        [input_ids, positions, slots, logit_rows], [cu_seqlens, context_lens, tables]
    )
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        cu_seqlens_q=cu_t,
        context_lens=context_t,
        block_tables=tables_t.view(len(requests), max_blocks),
        max_q_len=max_q_len,
        is_decode=max_q_len == 1,
    )
    if num_decode:
        meta.decode_rows = split_decode_rows(meta, num_decode)
    return StepInputs(
        input_ids=ids_t,
        positions=positions_t,
        meta=meta,
        logit_rows=logit_rows_t,
        sample_row=sample_row,
        prompt_rows=prompt_rows,
    )
