"""Triton `reshape_and_cache`: scatter this step's keys/values into the paged cache by slot.

    slot_mapping[t] = block * block_size + offset   ->   k_cache[block, offset, :, :] = key[t]

One program per token. A negative slot marks a padding token (e.g. a CUDA-graph batch padded to a
captured size) and is skipped, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spindle_kernels.checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_kv_cache,
    check_ndim,
    check_same_device,
)


@triton.jit
def _reshape_and_cache_kernel(
    Key, Value, KCache, VCache, SlotMapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SlotMapping + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    num_heads_written = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a padding token writes nothing
    mask = (offs_h[:, None] < num_heads_written) & (offs_d[None, :] < HEAD_DIM)
    cache_off = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(Key + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(KCache + cache_off, k.to(KCache.dtype.element_ty), mask=mask)
    v = tl.load(Value + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(VCache + cache_off, v.to(VCache.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `reference.reshape_and_cache` (key/value [num_tokens, num_kv_heads, head_dim])."""
    _, _, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    for name, t in (("key", key), ("value", value)):
        check_ndim(name, t, 3, "[num_tokens, num_kv_heads, head_dim]")
        check_dtype(name, t, FLOAT_DTYPES)
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match the cache's [*, {num_kv_heads}, {head_dim}]"
            )
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")
    check_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    check_dtype("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    num_tokens = key.shape[0]
    if value.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"key, value and slot_mapping disagree on num_tokens: "
            f"{num_tokens}, {value.shape[0]}, {slot_mapping.shape[0]}"
        )
    check_same_device("key, value, k_cache, v_cache, slot_mapping", key, value, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
