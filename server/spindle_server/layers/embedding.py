"""Vocabulary-parallel token embedding and LM head.

The vocabulary is cut into N equal contiguous ranges (the last padded with zero rows when N does not
divide it):

    vocab ids:  [0 ........ per) [per ...... 2*per) ... [(N-1)*per ... V) + padding
                   rank 0            rank 1                 rank N-1

Embedding: each rank looks up the ids in its range, zeros the rest, and an all-reduce sums the rows.
LM head: each rank scores its range, an all-gather concatenates the ranges, padding is cut off, so every
rank holds the same full-vocabulary logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spindle_server.distributed import Distributed
from spindle_server.layers.linear import can_pack, pack_weight, packed_linear
from spindle_server.weights import Weights


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dist: Distributed,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_per_rank = -(-vocab_size // dist.world_size)  # ceil
        self.vocab_start = dist.rank * self.vocab_per_rank
        self.vocab_stop = min(self.vocab_start + self.vocab_per_rank, vocab_size)  # may be < start + per
        self.weight = torch.nn.Parameter(
            torch.zeros(self.vocab_per_rank, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def load(self, weights: Weights, name: str) -> None:
        """name: the full tensor name, e.g. "model.embed_tokens.weight"."""
        shape = weights.shape(name)
        if shape != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"weight {name!r} has shape {shape}, expected {(self.vocab_size, self.hidden_size)}"
            )
        num_rows = max(self.vocab_stop - self.vocab_start, 0)
        with torch.no_grad():
            self.weight.zero_()
            if num_rows:
                self.weight[:num_rows].copy_(weights.get_rows(name, 0, self.vocab_start, self.vocab_stop))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden], identical on every rank."""
        if self.dist.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.dist.all_reduce(out)


class ParallelLMHead(torch.nn.Module):
    """hidden [N, hidden] -> float32 logits [N, vocab_size], full vocabulary on every rank."""

    # Warmup builds this head's oneDNN primitives up to this many rows only (`warm_packed_linears`): a step's
    # logit rows are one per sampling request, more only with prompt log-probs, and warming a vocabulary-wide
    # matmul at every bucket up to max_prefill_tokens would cost more than the warmup forward itself.
    max_warm_rows = 256

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dist: Distributed,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.vocab_size = vocab_size
        # Same vocabulary split as the embedding, so a tied head can share its weight.
        self.table = tied_to or VocabParallelEmbedding(vocab_size, hidden_size, dist, dtype, device)
        self.is_tied = tied_to is not None
        self.packed: torch.Tensor | None = None
        self.plain_rows: torch.Tensor | None = None  # the plain table, read by the row kernel (linear.py)

    def load(self, weights: Weights, name: str) -> None:
        """name: e.g. "lm_head.weight"; a tied head loads nothing (the embedding did)."""
        if not self.is_tied:
            self.table.load(weights, name)

    def pack(self, keep_plain: bool = False) -> None:
        """The head's matmul from a oneDNN-packed copy; a tied table stays for the embedding, an own one goes
        unless `keep_plain` (then matmuls of up to `LINEAR_ROWS` rows read it through the C++ row kernel, until
        `drop_plain`)."""
        if self.packed is None and can_pack(self.table.weight):
            self.packed = pack_weight(self.table.weight)
            if keep_plain:
                self.plain_rows = self.table.weight.detach()
            elif not self.is_tied:
                self.table.weight.data = self.table.weight.data.new_empty(0)

    def row_copy_bytes(self) -> int:
        """What keeping the plain table beside the packed copy costs: nothing when tied (the embedding keeps it)."""
        weight = self.table.weight
        return 0 if self.is_tied else weight.numel() * weight.element_size()

    def drop_plain(self) -> None:
        """Every matmul from the packed copy; an own plain table freed."""
        if self.plain_rows is not None:
            self.plain_rows = None
            if not self.is_tied:
                self.table.weight.data = self.table.weight.data.new_empty(0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            logits = packed_linear(hidden, self.packed, None, self.plain_rows)  # [N, vocab_per_rank]
        else:
            logits = F.linear(hidden, self.table.weight)
        logits = self.dist.all_gather_last_dim(logits)
        return logits[:, : self.vocab_size].float()
