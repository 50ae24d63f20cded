"""CUDA graphs for decode steps: one captured forward per batch size, replayed on padded batches.

A decode step (every sequence has exactly one new token) of n sequences runs the graph of the smallest
captured size >= n. The graphs read static buffers, so a step copies its inputs in and pads the rest:

    rows:            0 .. n-1 (the batch)            n .. size-1 (padding)
    input_ids        the new tokens                  0
    positions        their positions                 0
    slot_mapping     their KV slots                  -1   (the KV-store kernels skip negative slots)
    context_lens     computed_len + 1                1    (attend to block 0's first slot: finite, unused)
    block_tables     [size, max_blocks_per_seq]      0    (the batch's tables left-aligned, 0 beyond them)
    cu_seqlens_q     0 1 2 .. size                   (fixed: one token per sequence)

and keeps the first n rows of the output hidden states (logits are computed eagerly, only for the rows
the step needs). Shapes inside a graph never depend on the batch: the block tables are always
`max_blocks_per_seq` wide (the blocks of the longest request the router may send), the decode attention's
split count follows the graph's size alone (each sequence splits its own length in the kernel, see
spindle_kernels.attention), and nothing in a decode forward reads a tensor's values on the host.

Prefill chunks, mixed prefill + decode steps, batches larger than the largest size and requests
longer than `max_blocks_per_seq` blocks run eagerly.

`capture=False` runs the very same padded static-buffer path without capturing (the forward is called
on the static buffers at every step): CPU tests use it to check the padding, and it is the fallback for
debugging a graph problem on CUDA.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spindle_server.engine.inputs import StepInputs
from spindle_server.kv_cache import KVCache
from spindle_server.layers.attention import AttentionMetadata

log = logging.getLogger("spindle_server.engine")

DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def parse_cuda_graph_sizes(text: str) -> tuple[int, ...]:
    """"1,2,4,8" -> (1, 2, 4, 8), sorted and deduplicated; "0" (or "") -> () (graphs off)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"CUDA graph sizes must be a comma-separated list of integers, got {text!r}") from None
    if sizes in ([], [0]):
        return ()
    if any(s < 1 for s in sizes):
        raise ValueError(f"CUDA graph sizes must be positive (or a single 0 to disable), got {text!r}")
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class DecodeGraphSettings:
    sizes: tuple[int, ...] = ()  # decode batch sizes to capture, increasing; (): every step runs eagerly
    # Run the padded static-buffer path without capturing (CPU tests, debugging); on CPU without it,
    # graphs are off whatever `sizes` says.
    eager_replay: bool = False

    def __post_init__(self) -> None:
        if any(s < 1 for s in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"CUDA graph sizes must be positive and strictly increasing, got {self.sizes}")


class DecodeGraphs:
    """Static input buffers, one captured decode forward per size, and their output buffers.

    The buffers are allocated once for the largest size; the graph of size s reads their first s rows.
    Bound to one model and one KV cache (the graphs hold the cache's addresses).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        sizes: Sequence[int],
        max_blocks_per_seq: int,
        device: torch.device,
        *,
        capture: bool,
    ) -> None:
        DecodeGraphSettings(tuple(sizes))  # validates
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be positive, got {max_blocks_per_seq}")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = tuple(sizes)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        self.is_captured = capture
        max_bs = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(max_bs, dtype=i64, device=device)  # [max_bs]
        self.positions = torch.zeros(max_bs, dtype=i64, device=device)  # [max_bs]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=i64, device=device)  # [max_bs]
        self.context_lens = torch.ones(max_bs, dtype=i32, device=device)  # [max_bs]
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=i32, device=device)  # [max_bs, W]
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=i32, device=device)  # [max_bs + 1], never changes
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # size -> hidden [size, hidden_size], written by replay
        self.replays: collections.Counter[int] = collections.Counter()  # steps run per size
        if capture:
            self._capture_all()

    # ---- dispatch -------------------------------------------------------------------------------
    def size_for(self, num_seqs: int) -> int | None:
        """The smallest captured size >= num_seqs, or None when the batch is too large."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def can_run(self, inputs: StepInputs, kv_cache: KVCache) -> bool:
        """Whether this step is a decode step these graphs can serve."""
        meta = inputs.meta
        return (
            kv_cache is self.kv_cache
            and meta.is_decode
            and self.size_for(inputs.input_ids.shape[0]) is not None
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [n, hidden_size] of the batch's n tokens (a view, valid until the next run).

        The caller checked `can_run`.
        """
        n = inputs.input_ids.shape[0]
        size = self.size_for(n)
        assert size is not None
        self._load(inputs, n, size)
        self.replays[size] += 1
        if self.is_captured:
            self._graphs[size].replay()
            return self._outputs[size][:n]
        return self._forward(size)[:n]

    # ---- static buffers -------------------------------------------------------------------------
    def _load(self, inputs: StepInputs, n: int, size: int) -> None:
        meta = inputs.meta
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[:n, width:].zero_()
        # Padding rows: write nowhere, attend to one slot, outputs discarded.
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[n:size].fill_(1)
        self.block_tables[n:size].zero_()

    def _forward(self, size: int) -> torch.Tensor:
        """The decode forward over the first `size` rows of the static buffers (what a graph captures)."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            max_q_len=1,
            is_decode=True,
        )
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_cache.layers, meta)

    # ---- capture --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture every size, largest first, into one memory pool (smaller graphs reuse its memory).

        The static buffers hold padding only while capturing: no slot is written, so the KV cache is
        untouched. Every rank captures the same sizes in the same order, so collectives match.
        """
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            # Eager runs first: Triton compiles (and autotunes) here, never inside a capture.
            for _ in range(2):
                self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a Health call on another thread (not serialised with Warmup) may use the
            # device meanwhile; it works on its own stream, not the capturing one.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._forward(size)
            self._graphs[size] = graph
            self._outputs[size] = out
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info(
            "CUDA graphs: captured decode batch sizes %s (block tables %d wide) in %.1f s, %.1f MiB",
            ",".join(map(str, self.sizes)), self.max_blocks_per_seq, time.perf_counter() - start, used / 2**20,
        )
