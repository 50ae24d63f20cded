"""flash-attn-backed paged attention (CUDA, fp16/bf16, block_size a multiple of 256).

flash-attn 2 reads a paged cache laid out exactly like ours ([num_blocks, block_size, kv_heads,
head_dim] with an int32 block table) but only for pages of 256*k tokens and half-precision inputs.
Calls it cannot serve go to `fallback` (the Triton kernel), so the op is always correct;
`ops_for(device, block_size=...)` avoids choosing this backend when the block size rules it out.

Maximum lengths are upper bounds from shapes (no host sync): flash-attn only uses them to size its
grid and scratch, and reads the true lengths from the device tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from spindle_kernels.checks import check_attention_inputs, check_scale
from spindle_kernels.reference import check_softcap, check_window

PAGE_MULTIPLE = 256
_DTYPES = (torch.float16, torch.bfloat16)


def _window_size(window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right): a query at p sees p - left .. p + right; -1 is unbounded."""
    check_window(window)
    return (-1, -1) if window is None else (window - 1, 0)


def _softcap(softcap: float | None) -> float:
    """flash-attn's soft cap: 0.0 is off."""
    check_softcap(softcap)
    return 0.0 if softcap is None else float(softcap)


def can_serve(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in _DTYPES and k_cache.shape[1] % PAGE_MULTIPLE == 0


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`reference.paged_attention` through flash_attn_varlen_func(block_table=...)."""
    if not can_serve(q, k_cache):
        return fallback(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                        window=window, softcap=softcap)
    batch, _, _ = check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    scale = check_scale(scale)
    if cu_seqlens_q.shape != (batch + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be int32 [{batch + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    cu_seqlens_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu_seqlens_k[1:] = torch.cumsum(context_lens, 0)
    # Causal masking in flash-attn >= 2.1 aligns the query chunk to the end of the keys, as ours does.
    return flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k,
        q.shape[0], block_tables.shape[1] * k_cache.shape[1],
        softmax_scale=scale, causal=True, block_table=block_tables,
        window_size=_window_size(window), softcap=_softcap(softcap),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`reference.paged_decode_attention` through flash_attn_with_kvcache(block_table=...)."""
    if not can_serve(q, k_cache):
        return fallback(q, k_cache, v_cache, block_tables, context_lens, scale, window=window, softcap=softcap)
    batch, _, _ = check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    scale = check_scale(scale)
    if q.shape[0] != batch:
        raise ValueError(f"q has {q.shape[0]} tokens but the batch has {batch} sequences (one query each)")
    out = flash_attn_with_kvcache(
        q.unsqueeze(1), k_cache, v_cache,
        cache_seqlens=context_lens, block_table=block_tables, softmax_scale=scale, causal=True,
        window_size=_window_size(window), softcap=_softcap(softcap),
    )
    return out.squeeze(1)
