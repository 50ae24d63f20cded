"""Triton rotary embedding, "rotate half" (GPT-NeoX / Llama) style, in place on q and k.

    x = [x1 | x2] (halves of head_dim)   ->   [x1 * cos - x2 * sin | x2 * cos + x1 * sin]

One program per token rotates all its query and key heads; q and k may be strided views (e.g.
slices of a fused qkv projection) as long as head_dim is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spindle_kernels.checks import FLOAT_DTYPES, check_dtype, check_ndim, check_same_device


@triton.jit
def _rotate_heads(X, stride_t, stride_h, t, c, s, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    ptr1 = X + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * c[None, :] - x2 * s[None, :]).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Cos, Sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    c = tl.load(Cos + t * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(Sin + t * stride_st + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(Q, stride_qt, stride_qh, t, c, s, NUM_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, stride_kt, stride_kh, t, c, s, NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Triton version of `reference.rotary_embedding`: q [T, heads, d], k [T, kv_heads, d], cos/sin [T, d/2]."""
    check_ndim("q", q, 3, "[num_tokens, num_heads, head_dim]")
    check_ndim("k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_dtype("k", k, FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} must be [{num_tokens}, num_kv_heads, {head_dim}] like q")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half rotary, got {head_dim}")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        check_ndim(name, t, 2, "[num_tokens, head_dim // 2]")
        check_dtype(name, t, FLOAT_DTYPES)
        if tuple(t.shape) != (num_tokens, half):
            raise ValueError(f"{name} must be [{num_tokens}, {half}], got {tuple(t.shape)}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")
    check_same_device("q, k, cos, sin", q, k, cos, sin)
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
