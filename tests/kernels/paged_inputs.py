"""Random paged-attention inputs: scattered blocks, odd lengths, GQA (shared by CPU and GPU tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedCase:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    context_lens: torch.Tensor  # [batch] int32
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    scale: float


def make_paged_case(
    q_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedCase:
    """Each sequence gets distinct blocks drawn at random from a pool larger than needed.

    Unused table entries point at real (random-filled) blocks too, so reading past a sequence's
    context would change the answer instead of reading zeros.
    """
    assert all(0 <= q <= c for q, c in zip(q_lens, context_lens, strict=True))
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in context_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: tables are wider than any sequence
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(q_lens), max_blocks), generator=gen)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = pool[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return PagedCase(
        q=torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        k_cache=torch.randn(shape, generator=gen).to(dtype=dtype, device=device),
        v_cache=torch.randn(shape, generator=gen).to(dtype=dtype, device=device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )
