"""Plain torch versions of every kernel, with the kernels' exact signatures.

These are the CPU path of the shard and the ground truth the Triton kernels are tested against.

Paged KV layout (per layer):

    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables     : [batch, max_blocks] int32, row b lists sequence b's blocks in order
    slot             : block * block_size + offset; token at position p of sequence b lives in
                       slot block_tables[b, p // block_size] * block_size + p % block_size

Varlen queries (prefill chunks and decodes flattened together):

    q            : [num_tokens, num_heads, head_dim]
    cu_seqlens_q : [batch + 1] int32, sequence b's queries are q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
    context_lens : [batch] int32, tokens of sequence b in the cache *including* this chunk

    sequence b:  |<------------- context_lens[b] ------------->|
                 | cached prefix (already in blocks) | chunk    |
                                                     |<- q_len ->|
    query i of the chunk sits at position context_lens[b] - q_len + i and attends to positions <= it.

Sliding window (`window=W`, per layer; None = full attention): a query at position p attends to the W
positions p - W + 1 .. p (itself included), as transformers' `sliding_window` masks do.

Soft-capped logits (`softcap=c`, Gemma 2; None = off): scores = c * tanh(scale * q.k / c) before the mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping` [num_tokens].

    A negative slot marks a padding token (a batch padded to a captured CUDA-graph size): it is skipped.
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    flat_k.index_copy_(0, slots, key.to(k_cache.dtype))
    flat_v.index_copy_(0, slots, value.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """[context_len, num_kv_heads, head_dim] of one sequence, in position order."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache.index_select(0, blocks).flatten(0, 1)[:context_len]


def chunk_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    q_len: int,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [n, num_kv_heads, head_dim] that a chunk of the last q_len of context_len positions attends:
    the last n positions, all of them without a window; under one, back to what its first query sees
    (context_len - q_len - window + 1), no further."""
    first = 0 if window is None else max(context_len - q_len - window + 1, 0)
    k = _gather_context(k_cache, block_table, context_len)[first:]
    v = _gather_context(v_cache, block_table, context_len)[first:]
    return k, v


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
    """Causal attention of varlen query chunks over their paged context (see module docstring).

    Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    return varlen_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                            _decode_attention, chunk_attention, window=window, softcap=softcap)


def check_window(window: int | None) -> None:
    """A sliding window is None (full attention) or a positive token count."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")


def check_softcap(softcap: float | None) -> None:
    """A logit soft cap is None (off) or a positive float."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """q [..., heads, q_len, d], k, v [..., kv_heads, len, d], mask broadcastable to the scores (True =
    attend) -> [..., heads, q_len, d] float32; explicit scores, so the soft cap can be applied."""
    group = q.shape[-3] // k.shape[-3]
    k = k.float().repeat_interleave(group, dim=-3)
    v = v.float().repeat_interleave(group, dim=-3)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0) @ v  # a row that sees nothing (padding) gives zeros


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    decode: Callable[..., torch.Tensor],
    chunk: Callable[..., torch.Tensor],
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The varlen split: sequences with one new token (decodes) attend together in one batched `decode`
    call (q, k_cache, v_cache, block_tables, context_lens, scale, window=, softcap=); a chunk of several
    tokens attends on its own with `chunk` (q [q_len, heads, d], k, v [n, kv_heads, d], scale, window=,
    softcap=) ->
    [q_len, heads, d], where k, v are the last n positions of the context: under a window, only those some
    query of the chunk can see."""
    check_window(window)
    check_softcap(softcap)
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    singles = [b for b in range(len(lens)) if cu[b + 1] - cu[b] == 1]
    if singles:
        rows = torch.tensor([cu[b] for b in singles], device=q.device)
        index = torch.tensor(singles, device=q.device)
        out[rows] = decode(
            q[rows], k_cache, v_cache, block_tables.index_select(0, index), context_lens.index_select(0, index), scale,
            window=window, softcap=softcap,
        )
    for b in range(len(lens)):
        start, end = cu[b], cu[b + 1]
        if end - start <= 1:
            continue
        k, v = chunk_context(k_cache, v_cache, block_tables[b], lens[b], end - start, window)
        out[start:end] = chunk(q[start:end], k, v, scale, window=window, softcap=softcap)
    return out


def chunk_mask(q_len: int, ctx_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, ctx_len] bool, True = attend: the queries are the last q_len of the ctx_len positions."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
    k_pos = torch.arange(ctx_len, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [q_len, heads, d] at the last q_len positions of k, v [ctx_len, kv_heads, d]: causal, float32."""
    mask = chunk_mask(q.shape[0], k.shape[0], window, q.device)
    if softcap is not None:
        out = masked_attention(*(t.transpose(0, 1) for t in (q, k, v)), mask, scale, softcap)
        return out.transpose(0, 1).to(q.dtype)
    attn = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(),  # [heads, q_len, d]
        k.transpose(0, 1).float(),
        v.transpose(0, 1).float(),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return attn.transpose(0, 1).to(q.dtype)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """All sequences at once: gather every block table into [batch, max_len] and mask past each length."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks].long()
    # [batch, num_blocks, block_size, kv_heads, d] -> [batch, kv_heads, max_len, d]
    k = k_cache[tables].flatten(1, 2).transpose(1, 2).float()
    v = v_cache[tables].flatten(1, 2).transpose(1, 2).float()
    positions = torch.arange(num_blocks * block_size, device=q.device)
    mask = positions[None, :] < context_lens[:, None].to(q.device)  # [batch, max_len]
    if window is not None:
        mask &= positions[None, :] >= context_lens[:, None].to(q.device) - window
    if softcap is not None:
        attn = masked_attention(q[:, :, None, :], k, v, mask[:, None, None, :], scale, softcap)
        return attn.reshape(batch, num_heads, head_dim).to(q.dtype)
    attn = F.scaled_dot_product_attention(
        q.view(batch, num_kv_heads, group, head_dim).float(),  # the query heads sharing a KV head
        k,
        v,
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    # A row with no context (padding) attends to nothing: zeros rather than NaN.
    attn = attn.masked_fill((context_lens == 0).view(batch, 1, 1, 1).to(q.device), 0.0)
    return attn.reshape(batch, num_heads, head_dim).to(q.dtype)


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
    """One query token per sequence, q [batch, num_heads, head_dim], attending to its context_lens[b] tokens
    (the last `window` of them under a sliding window)."""
    check_window(window)
    check_softcap(softcap)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return _decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add.

    Returns (normed, residual_out): with `residual`, x + residual is normalised and also returned as
    the next residual; without, `x` itself is the next residual.
    """
    if residual is not None:
        x = x + residual
    residual_out = x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.to(x.dtype) * weight), residual_out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, heads, d] and k [T, kv_heads, d] in place, "rotate half" (GPT-NeoX / Llama) style.

    cos, sin: [T, d // 2] for each token's position.
    """
    for t in (q, k):
        half = t.shape[-1] // 2
        x1 = t[..., :half].float()
        x2 = t[..., half:].float()
        c = cos[:, None, :].float()
        s = sin[:, None, :].float()
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        t[..., :half] = o1.to(t.dtype)
        t[..., half:] = o2.to(t.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 * I] holding [gate | up] -> silu(gate) * up, [T, I]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]).

    x [T, H]; w13 [E, 2 * I, H] holding each expert's [gate | up] rows; w2 [E, H, I];
    topk_weights [T, K] float32; topk_ids [T, K] int. expert_e(v) = w2[e] @ (silu(w13[e][:I] v) * w13[e][I:] v).
    Returns [T, H] in x's dtype. Under tensor parallelism I is this rank's slice and the result is a partial
    sum (the caller all-reduces).
    """
    return moe_by_expert(
        x, topk_weights, topk_ids, lambda e, rows: F.linear(silu_and_mul(F.linear(rows, w13[e])), w2[e])
    )


def moe_by_expert(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert(topk_ids[t, k], x[t]) for every token t, [T, H] in x's dtype.

    The (token, k) pairs are sorted by expert so each expert runs once over all its tokens, `expert(e,
    rows [n, H]) -> [n, H]` (a loop over experts, never over tokens); contributions are added in expert
    order, as transformers does.
    """
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros_like(x)
    if num_tokens == 0:
        return out
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)  # pair p = token * K + k, grouped by expert
    counts = torch.bincount(flat_ids).tolist()
    token_of_pair = order // top_k
    weight_of_pair = topk_weights.reshape(-1)[order].float()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_pair[start : start + count]
        y = expert(e, x[rows])
        out.index_add_(0, rows, (y.float() * weight_of_pair[start : start + count, None]).to(x.dtype))
        start += count
    return out


def argmax_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [rows, vocab] -> (each row's argmax, int64, the first of equal maxima; its logsumexp, float32).
    A row's log-softmax is `scores - lse`: greedy sampling needs only these two."""
    x = scores.float()
    return x.argmax(dim=-1), torch.logsumexp(x, dim=-1)
