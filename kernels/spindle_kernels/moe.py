"""Triton fused mixture-of-experts: the routed (token, k) pairs sorted by expert, one grouped GEMM per
projection, no host synchronisation (so a CUDA graph can capture it).

    topk_ids [T, K] -> pairs p = t * K + k, sorted by expert, each expert's run padded to BLOCK_M (16 or 64):

    sorted_pairs:  | e0: p p p . | e1: p p p p | p . . . | e3: p . . . | . . ...   (. = T * K, padding)
    block_expert:  |     0       |      1      |    1    |      3      | E  (unused blocks)

    gate_up[p] = x[p // K] @ w13[e].T            [T * K, 2I]   (one program per BLOCK_M x BLOCK_N tile)
    hidden     = silu(gate) * up                 [T * K, I]    (activation.silu_and_mul)
    down[p]    = topk_weights[p] * hidden[p] @ w2[e].T         [T * K, H]
    out[t]     = sum_k down[t * K + k]           [T, H]

The buffers are sized for the worst case (every expert's run padded), T * K + E * (BLOCK_M - 1) rows of
`sorted_pairs`, so nothing is read back to the host. Same signature and results as `reference.fused_moe`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spindle_kernels.activation import silu_and_mul
from spindle_kernels.checks import FLOAT_DTYPES, check_dtype, check_ndim, check_same_device, check_same_dtype


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows of one tile (pairs of one expert): 16 while experts see few tokens (decode), where a bigger
    tile would be mostly padding; 64 for prefill-sized batches, where it reuses each weight tile 4x more."""
    return 16 if num_pairs <= 16 * num_experts else 64


@triton.jit(do_not_specialize=["num_pairs"])  # == 1 / % 16 would compile again as batches vary
def _grouped_gemm_kernel(
    A, B, C, SortedPairs, BlockExpert, Weights, NumPaddedPairs,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    N, K_DIM, num_pairs,  # runtime: a new token count must not compile a new kernel
    A_ROW_DIV: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MUL_WEIGHTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """C[p] = A[p // A_ROW_DIV] @ B[expert].T (times Weights[p]) for the BLOCK_M pairs of this tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NumPaddedPairs):
        return
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    if expert >= NUM_EXPERTS:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(SortedPairs + offs_m).to(tl.int64)
    row_mask = pairs < num_pairs
    a_rows = pairs // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = (k0 + offs_k) < K_DIM
        a = tl.load(
            A + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        b = tl.load(
            B + expert * stride_be + offs_n[None, :] * stride_bn + (k0 + offs_k)[:, None] * stride_bk,
            mask=n_mask[None, :] & k_mask[:, None], other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    if MUL_WEIGHTS:
        # Round the projection to the activations' dtype first, as the reference's matmul output is.
        w = tl.load(Weights + pairs, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc.to(C.dtype.element_ty).to(tl.float32) * w[:, None]
    tl.store(
        C + pairs[:, None] * stride_cm + offs_n[None, :],
        acc.to(C.dtype.element_ty),
        mask=row_mask[:, None] & n_mask[None, :],
    )


def _sort_pairs_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pairs [max_padded], block_expert [max_padded / block_m], num_padded_pairs [1]), on device.

    Every expert's run starts at a multiple of block_m so a tile never mixes experts; padding slots hold
    T * K (past every pair); blocks past the last run hold expert id E.
    """
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    run_start = padded_end - padded  # where each expert's run begins in sorted_pairs
    first_of_expert = torch.cumsum(counts, 0) - counts  # where each expert's pairs begin in sorted order
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - first_of_expert[experts_sorted]
    max_padded = num_pairs + num_experts * (block_m - 1)
    max_padded = triton.cdiv(max_padded, block_m) * block_m
    sorted_pairs = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[run_start[experts_sorted] + rank_in_expert] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert, padded_end[-1:].to(torch.int32)


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))  # tl.dot needs every tile dim >= 16


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    block_m: int,
    a_row_div: int,
    weights: torch.Tensor | None,
) -> None:
    num_pairs = out.shape[0]
    n, k_dim = b.shape[1], b.shape[2]
    block_n, block_k = _block(n, 64), _block(k_dim, 64)
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, out, sorted_pairs, block_expert, weights if weights is not None else out, num_padded,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        n, k_dim, num_pairs,
        A_ROW_DIV=a_row_div, NUM_EXPERTS=b.shape[0],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        MUL_WEIGHTS=weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Triton version of `reference.fused_moe`: x [T, H], w13 [E, 2I, H], w2 [E, H, I],
    topk_weights [T, K] float32, topk_ids [T, K] int32/int64 -> [T, H] in x's dtype."""
    check_ndim("x", x, 2, "[tokens, hidden]")
    check_ndim("w13", w13, 3, "[experts, 2 * intermediate, hidden]")
    check_ndim("w2", w2, 3, "[experts, hidden, intermediate]")
    check_ndim("topk_weights", topk_weights, 2, "[tokens, top_k]")
    check_ndim("topk_ids", topk_ids, 2, "[tokens, top_k]")
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_dtype("x, w13, w2", x, w13, w2)
    check_dtype("topk_weights", topk_weights, (torch.float32,))
    check_dtype("topk_ids", topk_ids, (torch.int32, torch.int64))
    check_same_device("x, w13, w2, topk_weights, topk_ids", x, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.shape[2] != hidden or two_inter % 2:
        raise ValueError(f"w13 must be [E, 2 * I, {hidden}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [{num_experts}, {hidden}, {inter}], got {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            f"[{num_tokens}, top_k]"
        )
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("x, w13 and w2 must have a contiguous last dimension")
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs, num_experts)
    sorted_pairs, block_expert, num_padded = _sort_pairs_by_expert(topk_ids, num_experts, block_m)
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, sorted_pairs, block_expert, num_padded, block_m, top_k, None)
    hidden_states = silu_and_mul(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.contiguous().view(-1)
    _grouped_gemm(hidden_states, w2, down, sorted_pairs, block_expert, num_padded, block_m, 1, weights)
    return down.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
