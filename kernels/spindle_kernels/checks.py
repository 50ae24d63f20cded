"""Argument checks shared by the kernel wrappers (no triton here, so they also guard the CPU path).

Every check raises ValueError naming the argument, what was expected and what came. Checks that would
need the tensor's *values* (block ids in range, context lengths within the table) are not done: reading
them would synchronise the GPU on every layer; the engine guarantees them.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_ndim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc} ({ndim}-D), got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} dtype must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def check_same_dtype(names: str, *tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{names} must share one dtype, got {[str(t.dtype) for t in tensors]}")


def check_same_device(names: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{names} must be on one device, got {[str(t.device) for t in tensors]}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    return float(scale)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_dim) of a matching contiguous K/V cache pair."""
    check_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_ndim("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    check_dtype("k_cache", k_cache, FLOAT_DTYPES)
    check_same_dtype("k_cache, v_cache", k_cache, v_cache)
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    return num_blocks, block_size, num_kv_heads, head_dim


def check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[int, int, int]:
    """Checks shared by prefill and decode attention; returns (batch, num_heads, num_kv_heads)."""
    check_ndim("q", q, 3, "[tokens, num_heads, head_dim]")
    _, _, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype("q, k_cache, v_cache", q, k_cache, v_cache)
    check_last_dim_contiguous("q", q)
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    check_ndim("block_tables", block_tables, 2, "[batch, max_blocks]")
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_last_dim_contiguous("block_tables", block_tables)
    check_ndim("context_lens", context_lens, 1, "[batch]")
    check_dtype("context_lens", context_lens, (torch.int32,))
    batch = context_lens.shape[0]
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, context_lens has {batch}")
    check_same_device("q, k_cache, block_tables, context_lens", q, k_cache, block_tables, context_lens)
    return batch, num_heads, num_kv_heads
