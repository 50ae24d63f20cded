"""Triton paged attention: decode (one query per sequence) and varlen prefill chunks.

Both read keys/values straight out of the paged cache through the block table, one BLOCK_N tile of
positions at a time, so block_size need not match the tile:

    position p of sequence b  ->  page  = block_tables[b, p // block_size]
                                  entry = k_cache[page, p % block_size, kv_head, :]

and both keep an online softmax (running max m, running sum l, rescaled accumulator) in fp32, using
exp2 with the scale folded into log2 units.

Decode is split-KV ("flash-decoding"): programs are (sequence, kv head, split); each handles every
query head of its GQA group against one range of the context (so K/V are read once per group), and
writes a partial output and its log-sum-exp; a second kernel merges the splits. The NUMBER of splits
depends only on the batch size and the device (`decode_num_splits`: enough programs to fill every SM
several times over), never on table widths or context values, so a decode step can be captured in a
CUDA graph and eager steps never recompile; each sequence cuts its own visible range into that many
splits in the kernel (vLLM's triton_decode_attention does the same):

    visible = [lo, context_len)   (lo = 0, or context_len - WINDOW under a sliding window)
    split_len = round_up(cdiv(context_len - lo, num_splits), BLOCK_N)
    split s covers [lo + s * split_len, min(context_len, lo + (s + 1) * split_len))   (may be empty)

Prefill programs are (query tile, head). Query tiles of all sequences are numbered consecutively;
a program finds its sequence from `cu_tiles` (exclusive prefix sums of tiles per sequence, built
on the device without a host sync), scanning it 128 sequences at a time. It sweeps the context positions every query in the tile may
see without a mask, then the diagonal tiles with the causal mask.

Sliding window (WINDOW > 0; 0 = full attention): a query at position p sees p - WINDOW + 1 .. p. Decode
starts its sweep at the first visible position; a prefill tile adds a masked sweep over the positions
only some of its queries still see (the window's trailing edge) before the unmasked middle.

Soft-capped logits (SOFTCAP > 0.0, Gemma 2): each score becomes SOFTCAP * tanh(score / SOFTCAP) before the
softmax (`_scores`, tanh from a sigmoid: the interpreter and every backend have that).

Compiles: runtime integers that vary between calls (batch, table stride, split count) are marked
`do_not_specialize`, so one compile per kernel and layer kind (dtype, window, soft cap, head shape)
serves every batch: a Warmup that runs one prefill and one decode forward has compiled them all.

Importing this module imports triton; `spindle_kernels` only imports it when the Triton ops are used.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from spindle_kernels.checks import check_attention_inputs, check_ndim, check_scale
from spindle_kernels.reference import check_softcap, check_window

_LOG2E = 1.4426950408889634
MAX_DECODE_SPLITS = 64  # the merge kernel reads every split of a head at once (one tile of this many)


@triton.jit
def _scores(qk, qk_scale_log2, SOFTCAP: tl.constexpr):
    """q.k products -> logits in log2 units (scale folded in), soft-capped when SOFTCAP > 0."""
    if SOFTCAP > 0:
        x = qk * (qk_scale_log2 / 1.4426950408889634)  # the natural-log logit
        capped = SOFTCAP * (2.0 * tl.sigmoid(2.0 * x / SOFTCAP) - 1.0)  # SOFTCAP * tanh(x / SOFTCAP)
        return capped * 1.4426950408889634
    return qk * qk_scale_log2


# The split count sizes the partial outputs: their strides vary with it, so they are not specialized either.
@triton.jit(do_not_specialize=["num_splits", "stride_btb", "stride_ob", "stride_oh", "stride_lb", "stride_lh"])
def _decode_kernel(
    Q, K, V, BlockTables, ContextLens, Out, Lse,
    qk_scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + b)
    lo = context_len * 0
    if WINDOW > 0:  # positions before the window weigh nothing: split only the visible ones
        lo = tl.maximum(context_len - WINDOW, 0)
    split_len = tl.cdiv(tl.cdiv(context_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(context_len, start + split_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = BlockTables + b * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(table + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = page * stride_kb + (pos % PAGE_SIZE) * stride_kt + kv_head * stride_kh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale_log2, SOFTCAP)  # [G, N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (start >= context_len) leaves l_i == 0: output 0 with weight exp2(-inf) == 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out, mask=g_mask[:, None] & d_mask[None, :])
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])
def _merge_splits_kernel(
    Partial, Lse, Out, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    partial = tl.load(
        Partial + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


@triton.jit
def _masked_tile(
    q, m_i, l_i, acc, n0, lo, hi, q_pos, table, K, V, kv_head_off, stride_kb, stride_kt, offs_n, offs_d, d_mask,
    qk_scale_log2, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One online-softmax step over positions n0 + offs_n, keeping those in [lo, hi) each row may see."""
    pos = n0 + offs_n
    n_mask = (pos >= lo) & (pos < hi)
    page = tl.load(table + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    kv_off = page * stride_kb + (pos % PAGE_SIZE) * stride_kt + kv_head_off
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale_log2, SOFTCAP)
    visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
    if WINDOW > 0:
        visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet (a window's edge, a padding row) keeps m = -inf: shift by 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["batch", "stride_btb"])
def _prefill_kernel(
    Q, K, V, BlockTables, ContextLens, CuSeqlensQ, CuTiles, Out,
    qk_scale_log2, batch,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    # Which sequence owns this tile: the number of sequences whose tiles all come before it (scanned
    # 128 at a time, so no compile-time constant depends on the batch size).
    seq = tile * 0
    for b0 in range(0, batch, 128):
        offs_b = b0 + tl.arange(0, 128)
        tile_ends = tl.load(CuTiles + 1 + offs_b, mask=offs_b < batch, other=2147483647)
        seq += tl.sum((tile_ends <= tile).to(tl.int32), 0)
    is_valid = seq < batch
    seq = tl.minimum(seq, batch - 1)
    tile_in_seq = tile - tl.load(CuTiles + seq)
    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    context_len = tl.load(ContextLens + seq)
    prefix_len = context_len - q_len

    offs_m = tile_in_seq * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    rows = (q_start + offs_m).to(tl.int64)  # token index in q / out (int64: long prefills)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < tl.where(is_valid, q_len, 0)
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix_len + offs_m
    q = tl.load(
        Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )

    # Positions < first_q are visible to every query of the tile; the rest up to last_q need the mask.
    # Under a window, [window_lo, full_lo) is seen by some queries of the tile only: masked too.
    first_q = prefix_len + tile_in_seq * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, context_len) - 1
    unmasked_end = tl.where(is_valid, (first_q // BLOCK_N) * BLOCK_N, 0)
    masked_end = tl.where(is_valid, last_q + 1, 0)
    window_lo = 0
    unmasked_start = 0
    diagonal_start = unmasked_end
    if WINDOW > 0:
        window_lo = tl.maximum(first_q - WINDOW + 1, 0)  # the first position any query of the tile sees
        full_lo = tl.minimum(tl.maximum(last_q - WINDOW + 1, 0), unmasked_end)  # every query sees from here
        # whole tiles ending at unmasked_end, so the unmasked sweep never overshoots into the diagonal
        unmasked_start = unmasked_end - ((unmasked_end - full_lo) // BLOCK_N) * BLOCK_N
        diagonal_start = tl.maximum(unmasked_end, window_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BlockTables + seq * stride_btb
    kv_head_off = kv_head * stride_kh
    if WINDOW > 0:
        for n0 in range(window_lo, unmasked_start, BLOCK_N):
            m_i, l_i, acc = _masked_tile(
                q, m_i, l_i, acc, n0, window_lo, unmasked_start, q_pos, table, K, V, kv_head_off,
                stride_kb, stride_kt, offs_n, offs_d, d_mask, qk_scale_log2, PAGE_SIZE, WINDOW, DOT_PRECISION,
                SOFTCAP,
            )
    for n0 in range(unmasked_start, unmasked_end, BLOCK_N):
        pos = n0 + offs_n
        page = tl.load(table + pos // PAGE_SIZE).to(tl.int64)
        kv_off = page * stride_kb + (pos % PAGE_SIZE) * stride_kt + kv_head_off
        k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale_log2, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for n0 in range(diagonal_start, masked_end, BLOCK_N):
        m_i, l_i, acc = _masked_tile(
            q, m_i, l_i, acc, n0, window_lo, context_len, q_pos, table, K, V, kv_head_off,
            stride_kb, stride_kt, offs_n, offs_d, d_mask, qk_scale_log2, PAGE_SIZE, WINDOW, DOT_PRECISION,
            SOFTCAP,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise be truncated to tf32 on tensor cores; the reference is exact fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises the split path


def decode_num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per (sequence, kv head): about 16 programs per SM, a power of two in 1 .. MAX_DECODE_SPLITS.

    A function of shapes and the device only (a CUDA graph of `batch` rows keeps it). 16 per SM: the H200
    run of the old kernel read the cache at 0.18 of copy bandwidth with 4 programs per SM (batch 64, one
    split) and at 0.59 with 16 (batch 256). Empty splits of short sequences cost one early exit each.
    """
    wanted = triton.cdiv(16 * num_sms, max(batch * num_kv_heads, 1))
    return min(MAX_DECODE_SPLITS, triton.next_power_of_2(wanted))


def decode_attention_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    block_n: int = 64,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`paged_decode_attention` with the split count and tile length chosen by the caller (tests, tuning)."""
    batch, num_heads, num_kv_heads = check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    scale = check_scale(scale)
    check_window(window)
    check_softcap(softcap)
    if q.shape[0] != batch:
        raise ValueError(f"q has {q.shape[0]} tokens but the batch has {batch} sequences (one query each)")
    if not 1 <= num_splits <= MAX_DECODE_SPLITS or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(
            f"num_splits must be in 1..{MAX_DECODE_SPLITS} and block_n a power of two >= 16, "
            f"got {num_splits}, {block_n}"
        )
    _, block_size, _, head_dim = k_cache.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    # Always split + merge (even one split): one kernel variant, whatever the batch.
    partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=block_size, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), WINDOW=window or 0,
        SOFTCAP=float(softcap or 0.0), num_warps=4,
    )
    _merge_splits_kernel[(batch, num_heads)](
        partial, lse, out, num_splits,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=MAX_DECODE_SPLITS,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out


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
) -> torch.Tensor:
    """Triton version of `reference.paged_decode_attention`: q [batch, num_heads, head_dim] -> same shape."""
    check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    num_splits = decode_num_splits(q.shape[0], k_cache.shape[2], _num_sms(q.device))
    return decode_attention_splits(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, window=window,
                                   softcap=softcap)


def prefill_attention_tiles(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`paged_attention` with the tile sizes chosen by the caller (tests, tuning)."""
    batch, num_heads, num_kv_heads = check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    scale = check_scale(scale)
    check_window(window)
    check_softcap(softcap)
    check_ndim("cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must be int32 [batch + 1] = [{batch + 1}], "
            f"got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
        )
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    _, block_size, _, head_dim = k_cache.shape
    num_tokens = q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    # cu_tiles [batch + 1]: exclusive prefix sums of query tiles per sequence (device-side, no sync).
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    cu_tiles = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu_tiles[1:] = torch.cumsum((q_lens + block_m - 1) // block_m, 0)
    max_tiles = triton.cdiv(num_tokens, block_m) + batch  # each sequence adds at most one partial tile
    _prefill_kernel[(max_tiles, num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, cu_tiles, out,
        scale * _LOG2E, batch,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), WINDOW=window or 0,
        SOFTCAP=float(softcap or 0.0), num_warps=4, num_stages=2,
    )
    return out


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
) -> torch.Tensor:
    """Triton version of `reference.paged_attention` (varlen chunks, paged context, causal, GQA, window)."""
    return prefill_attention_tiles(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                   window=window, softcap=softcap)
