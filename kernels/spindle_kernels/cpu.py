"""CPU ops: the reference's attention, norm and rotary, shaped for what CPUs are fast at.

The reference decode path gathers every sequence's blocks with advanced indexing, transposes them to
[batch, kv_heads, len, d] and runs a masked `scaled_dot_product_attention` for one query row: on 2 Zen 4
cores that is 5.4 ms per layer in float32 and 10 ms in bfloat16 at batch 32 x 272 tokens, a third of
the step. Here the blocks are gathered with one `index_select` (contiguous block copies) and left as
[batch, len, kv_heads * d]; the scores come from one `bmm` against block-diagonal queries (query head
(h, j) carries q[h, j] in KV head h's columns, zeros elsewhere), so no transpose is ever copied. The
zeros cost kv_heads x the score FLOPs, which are tiny next to the gather: 1.8 ms (float32) and 1.0 ms
(bfloat16) for the same case. Same signatures and results as `reference` (float32 softmax).

With the C++ kernels loaded (`cpu_native`, compiled for the host on first use), decode attention reads
the paged cache in place instead: no gather copy, no wasted columns, one op per layer (1.5-6x faster
than the torch path here, most at long contexts and batch 1); a sliding window starts each row's sweep at
its first visible position, and Gemma 2's soft cap is applied to the scores. The torch path stays for what the C++
kernel does not take (other head sizes and dtypes) and when no compiler is available.

Prefill chunks of SDPA_MIN_ROWS rows or more may instead attend through torch's CPU flash attention over
their gathered context, where `chunks_by_sdpa` times it faster for the model's shape: on CPUs with AMX its
bf16 tiles run through oneDNN's brgemm at ~4x the C++ kernel's rate. Decode rows and short chunks stay on
the C++ kernel, in one call.

The KV cache write (`reshape_and_cache`) is one C++ op too. q, k and v reach these ops as strided views
of the QKV projection's output (`KernelOps.takes_strided_qkv`): the C++ kernels read them in place, the
torch fallbacks copy where they need to; no three copies per layer.

Matmuls of one to four rows may run in the C++ `linear_rows` over the plain weight, and bf16 ones of up to 32
rows in the AMX `linear_tiles` over the same weight (`layers/linear.py` keeps it beside oneDNN's packed copy
where that measures faster).

RMSNorm (with its residual add), rotary and SiLU-and-mul are one C++ op each (a decode step at batch 1
is mostly per-op overhead outside its matmuls: the torch versions take 6-12 ops with their dtype round
trips). Without the C++ kernels: torch's fused `rms_norm`, and rotary in the activations' dtype.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spindle_kernels import cpu_native, reference

logger = logging.getLogger(__name__)

NATIVE_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
# A chunk this long or longer may attend through torch's flash attention (see `chunks_by_sdpa`); below,
# its fixed cost (a context gather, a mask) outweighs its faster tiles (measured crossover: 8-16 rows).
SDPA_MIN_ROWS = 16
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


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
    """One query token per sequence, q [batch, num_heads, head_dim]; see `reference.paged_decode_attention`."""
    reference.check_window(window)
    reference.check_softcap(softcap)
    if _native(q):
        return torch.ops.spindle_cpu.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, window or 0, softcap or 0.0
        )
    q = q.contiguous()  # the layer may pass a strided view (KernelOps.takes_strided_qkv)
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return torch.empty_like(q)
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    # Under a window, blocks before the shortest sequence's window hold nothing any row sees: skip them.
    first_block = 0 if window is None else max(int(context_lens.min()) - window, 0) // block_size
    length = (num_blocks - first_block) * block_size
    index = block_tables[:, first_block:num_blocks].reshape(-1).long()
    k = k_cache.index_select(0, index).view(batch, length, num_kv_heads * head_dim)
    v = v_cache.index_select(0, index).view(batch, length, num_kv_heads * head_dim)

    heads = torch.arange(num_kv_heads, device=q.device)
    q_diag = q.new_zeros(batch, num_kv_heads, group, num_kv_heads, head_dim)
    q_diag[:, heads, :, heads, :] = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1)
    scores = torch.bmm(q_diag.view(batch, num_heads, num_kv_heads * head_dim), k.transpose(1, 2)).float()
    scores.mul_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    positions = torch.arange(first_block * block_size, num_blocks * block_size, device=q.device)[None, :]
    lens = context_lens[:, None].to(q.device)
    hidden = positions >= lens
    if window is not None:
        hidden |= positions < lens - window
    scores.masked_fill_(hidden[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with no context (padding) attends to nothing: zeros rather than NaN.
    probs = probs.nan_to_num_(0.0).to(q.dtype)
    out = torch.bmm(probs, v).view(batch, num_kv_heads, group, num_kv_heads, head_dim)
    return out[:, heads, :, heads, :].transpose(0, 1).reshape(batch, num_heads, head_dim)


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
    """Varlen chunks over paged context; see `reference.paged_attention`. With the C++ kernels, every row of
    every chunk attends from the cache in one call (each over the context up to its own position); else
    decode rows take the path above and each chunk torch's SDPA over its gathered context."""
    if _native(q):
        reference.check_window(window)
        reference.check_softcap(softcap)
        row_seqs, row_lens = _rows_of(cu_seqlens_q, context_lens, q.shape[0])
        chunks = [] if softcap is not None else _sdpa_chunks(q, k_cache, cu_seqlens_q)
        if not chunks:
            return torch.ops.spindle_cpu.attention_rows(
                q, k_cache, v_cache, block_tables, row_seqs, row_lens, scale, window or 0, softcap or 0.0
            )
        out = torch.empty(q.shape, dtype=q.dtype)
        lens = context_lens.tolist()
        fresh = [_is_fresh(lens[b], end - start, window) for b, start, end in chunks]
        for seqs, start, end in _fresh_runs([c for c, f in zip(chunks, fresh) if f]):
            out[start:end] = _fresh_attention(q[start:end], k_cache, v_cache, block_tables[seqs], scale)
        for b, start, end in [c for c, f in zip(chunks, fresh) if not f]:
            k, v = reference.chunk_context(k_cache, v_cache, block_tables[b], lens[b], end - start, window)
            out[start:end] = _chunk_attention(q[start:end], k, v, scale, window=window)
        gaps = _gaps(chunks, q.shape[0])
        if gaps:  # one range in the usual mixed step (its decode rows first, then the chunks): a slice
            rows = slice(*gaps[0]) if len(gaps) == 1 else torch.cat([torch.arange(a, b) for a, b in gaps])
            out[rows] = torch.ops.spindle_cpu.attention_rows(
                q[rows], k_cache, v_cache, block_tables, row_seqs[rows], row_lens[rows], scale, window or 0, 0.0
            )
        return out
    return reference.varlen_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                      paged_decode_attention, _chunk_attention, window=window, softcap=softcap)


def _native(q: torch.Tensor) -> bool:
    return q.dtype in NATIVE_DTYPES and q.shape[-1] in NATIVE_HEAD_DIMS and cpu_native.load()


def _sdpa_chunks(q: torch.Tensor, k_cache: torch.Tensor, cu_seqlens_q: torch.Tensor) -> list[tuple[int, int, int]]:
    """(sequence, first row, end row) of the chunks that go to torch's flash attention: those of at least
    SDPA_MIN_ROWS rows, when `chunks_by_sdpa` measured it faster than the C++ kernel for this shape."""
    if q.shape[0] < SDPA_MIN_ROWS or not chunks_by_sdpa(q.dtype, q.shape[1], k_cache.shape[2], q.shape[2]):
        return []
    cu = cu_seqlens_q.tolist()
    return [(b, cu[b], cu[b + 1]) for b in range(len(cu) - 1) if cu[b + 1] - cu[b] >= SDPA_MIN_ROWS]


@functools.cache
def chunks_by_sdpa(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether prefill chunks of this shape attend faster through torch's flash attention (gathered
    context) than through the C++ kernel. Measured once per shape and process, on a 128-row chunk after
    384 cached positions: where oneDNN has AMX (Sapphire Rapids and later) torch's bf16 flash attention
    runs its tiles through it at 4x the C++ kernel's rate; on AVX-512 Zen 4 the C++ kernel was the faster.
    `SPINDLE_CPU_CHUNK_ATTENTION=native|sdpa` fixes the choice instead of measuring it."""
    fixed = os.environ.get("SPINDLE_CPU_CHUNK_ATTENTION", "auto")
    if fixed in ("native", "sdpa"):
        return fixed == "sdpa"
    if fixed != "auto":
        raise ValueError(f"SPINDLE_CPU_CHUNK_ATTENTION must be auto, native or sdpa, got {fixed!r}")
    block_size, rows, ctx = 16, 128, 512
    gen = torch.Generator().manual_seed(0)
    cache = [torch.randn(ctx // block_size, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
             for _ in range(2)]
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to(dtype)
    table = torch.arange(ctx // block_size, dtype=torch.int32)[None]
    row_seqs = torch.zeros(rows, dtype=torch.int32)
    row_lens = torch.arange(ctx - rows + 1, ctx + 1, dtype=torch.int32)
    k, v = (c.flatten(0, 1) for c in cache)
    scale = head_dim**-0.5

    def native() -> None:
        torch.ops.spindle_cpu.attention_rows(q, *cache, table, row_seqs, row_lens, scale, 0, 0.0)

    def sdpa() -> None:
        _chunk_attention(q, k, v, scale)

    native_s, sdpa_s = _best_time(native), _best_time(sdpa)
    choice = sdpa_s < native_s
    logger.info(
        "CPU prefill chunks (%s, %d heads over %d, head_dim %d) attend through %s: a %d-row chunk took "
        "%.2f ms there vs %.2f ms in the %s",
        dtype, num_heads, num_kv_heads, head_dim, "torch's flash attention" if choice else "the C++ kernel",
        rows, 1e3 * min(native_s, sdpa_s), 1e3 * max(native_s, sdpa_s),
        "C++ kernel" if choice else "torch's flash attention",
    )
    return choice


def _best_time(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gaps(chunks: list[tuple[int, int, int]], num_rows: int) -> list[tuple[int, int]]:
    """The row ranges [start, end) of `num_rows` that no chunk covers (chunks in row order)."""
    gaps, at = [], 0
    for _, start, end in chunks:
        if start > at:
            gaps.append((at, start))
        at = end
    if at < num_rows:
        gaps.append((at, num_rows))
    return gaps


def _is_fresh(context_len: int, q_len: int, window: int | None) -> bool:
    """Whether a chunk is a whole prompt (nothing cached before it) that no window cuts."""
    return context_len == q_len and (window is None or window >= q_len)


def _fresh_runs(chunks: list[tuple[int, int, int]]) -> list[tuple[list[int], int, int]]:
    """(sequences, first row, end row) of each run of adjacent fresh chunks of one length: one batched SDPA
    call serves a run (16 x 256 bf16 rows: 4.1 vs 4.8 ms a layer in separate calls, and one context gather
    instead of two per chunk)."""
    runs: list[tuple[list[int], int, int]] = []
    for b, start, end in chunks:
        if runs and runs[-1][2] == start and runs[-1][2] - runs[-1][1] == len(runs[-1][0]) * (end - start):
            seqs, first, _ = runs[-1]
            runs[-1] = ([*seqs, b], first, end)
        else:
            runs.append(([b], start, end))
    return runs


def _fresh_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of n whole prompts of one length L, each attending only to itself: q [n x L, heads, d],
    block_tables [n, max_blocks] -> [n x L, heads, d]."""
    n = block_tables.shape[0]
    length = q.shape[0] // n
    block_size = k_cache.shape[1]
    blocks = block_tables[:, : (length + block_size - 1) // block_size].reshape(-1).long()

    def context(cache: torch.Tensor) -> torch.Tensor:  # [n, kv_heads, L, d]
        return cache.index_select(0, blocks).view(n, -1, *cache.shape[2:])[:, :length].transpose(1, 2)

    qb = q.view(n, length, *q.shape[1:]).transpose(1, 2)
    attn = F.scaled_dot_product_attention(qb, context(k_cache), context(v_cache), is_causal=True, scale=scale,
                                          enable_gqa=True)
    return attn.transpose(1, 2).reshape(q.shape)


def _rows_of(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's sequence and visible length: a chunk's rows are the last q_len positions of its
    context, so row i of a q_len-row chunk over ctx positions sees ctx - q_len + 1 + i of them."""
    cu = cu_seqlens_q.long()
    seqs = torch.repeat_interleave(cu[1:] - cu[:-1], output_size=num_rows)
    lens = context_lens.long()[seqs] - cu[1:][seqs] + 1 + torch.arange(num_rows)
    return seqs.int(), lens.int()


# Masks of at most this many elements are kept, the last 32 shapes: 64 MiB of float32 at worst, a few MiB in use.
CHUNK_BIAS_CACHED = 1 << 19


def _chunk_bias(q_len: int, ctx_len: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`reference.chunk_mask` as SDPA's additive mask (0 or -inf) in the queries' dtype, made once per shape where
    small: every layer of a forward asks for the same ones, and a bool mask costs five ops per call, its
    conversion included (a mixed step's 96-token chunk: ~1 ms of a 60 ms step)."""
    if q_len * ctx_len <= CHUNK_BIAS_CACHED:
        return _cached_chunk_bias(q_len, ctx_len, window, dtype, device)
    return _make_chunk_bias(q_len, ctx_len, window, dtype, device)


def _make_chunk_bias(
    q_len: int, ctx_len: int, window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: a cached one may serve calls in and out of inference mode
        mask = reference.chunk_mask(q_len, ctx_len, window, device)
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


_cached_chunk_bias = functools.lru_cache(maxsize=32)(_make_chunk_bias)


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [q_len, heads, d] at the last q_len positions of k, v [ctx_len, kv_heads, d], causal, in q's dtype."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    if softcap is not None:  # SDPA has no soft cap: the reference's explicit scores
        return reference.chunk_attention(q, k, v, scale, window, softcap)
    # 4-d [1, heads, len, d]: 3-d inputs take SDPA's math path on CPU (5x slower at 1500 tokens).
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    if q_len == ctx_len and (window is None or window >= ctx_len):
        # nothing cached before the chunk and no window inside it: plain causal, no mask tensor
        attn = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
    else:  # the chunk's rows sit at the end of the context (bottom-right aligned causal mask)
        bias = _chunk_bias(q_len, ctx_len, window, q.dtype, q.device)
        attn = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=scale, enable_gqa=True)
    return attn[0].transpose(0, 1)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """See `reference.reshape_and_cache`; key/value may be strided views with unit stride in head_dim."""
    native = (
        key.dtype in NATIVE_DTYPES
        and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )
    if native and cpu_native.load():
        torch.ops.spindle_cpu.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.rms_norm`: (norm(x + residual) * weight, x + residual)."""
    if x.dtype in NATIVE_DTYPES and weight.dtype == x.dtype and cpu_native.load():
        normed, total = torch.ops.spindle_cpu.rms_norm(x, weight, eps, residual)
        return normed, (x if residual is None else total)
    if residual is not None:
        x = x + residual
    return F.rms_norm(x, (x.shape[-1],), weight, eps), x


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """See `reference.rotary_embedding`: q, k [T, heads, d] rotated in place; cos, sin [T, d // 2]."""
    if q.dtype in NATIVE_DTYPES and q.stride(-1) == 1 and k.stride(-1) == 1 and cpu_native.load():
        torch.ops.spindle_cpu.rotary_embedding(q, k, cos, sin)
        return
    half = q.shape[-1] // 2
    c = cos.to(q.dtype)[:, None, :]
    s = sin.to(q.dtype)[:, None, :]
    for t in (q, k):
        x1, x2 = t[..., :half], t[..., half:]
        rotated = x1 * c - x2 * s
        x2.mul_(c).addcmul_(x1, s)
        x1.copy_(rotated)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See `reference.silu_and_mul`: x [T, 2 * I] holding [gate | up] -> silu(gate) * up."""
    if x.dtype in NATIVE_DTYPES and cpu_native.load():
        return torch.ops.spindle_cpu.silu_and_mul(x)
    return reference.silu_and_mul(x)


def argmax_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.argmax_logsumexp`; the C++ op reads bfloat16 rows in place, twice, where torch takes a
    float32 copy and a full log-softmax (~2 ms per step at 32 x 49k rows on 2 Zen 4 cores)."""
    if scores.dim() == 2 and scores.dtype in NATIVE_DTYPES and cpu_native.load():
        return torch.ops.spindle_cpu.argmax_logsumexp(scores)
    return reference.argmax_logsumexp(scores)


# Matmuls of at most this many rows may run in the C++ `linear_rows` kernel over a plain weight.
LINEAR_ROWS = 4


def has_linear_rows(dtype: torch.dtype) -> bool:
    """Whether `linear_rows` takes weights of `dtype` on this host (the C++ kernels loaded)."""
    return dtype in NATIVE_DTYPES and cpu_native.load()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows <= LINEAR_ROWS, in] @ weight.T (+ bias) -> [rows, out], weight the plain contiguous [out, in]: each
    thread streams its output rows' weights once, in memory order (on Sapphire Rapids 1.4-1.6x oneDNN's rate
    over the SmolLM2-135M shapes at one row, 1.2-1.3x at four; `layers/linear.py` times both per model)."""
    return torch.ops.spindle_cpu.linear_rows(x, weight, bias)


# bf16 matmuls of at most this many rows may run in the C++ `linear_tiles` kernel (AMX) over a plain weight.
TILE_ROWS = 32


@functools.cache
def has_linear_tiles(dtype: torch.dtype) -> bool:
    """Whether `linear_tiles` runs here: bf16, the C++ kernels built with AMX, and the OS lending AMX state."""
    return dtype == torch.bfloat16 and cpu_native.load() and torch.ops.spindle_cpu.has_linear_tiles()


def tiles_take(weight: torch.Tensor) -> bool:
    """Whether `linear_tiles` takes this plain [out, in] weight's shape (whole 16 x 32 tiles)."""
    return weight.shape[1] % 32 == 0 and weight.shape[0] % 16 == 0


def linear_tiles(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows <= TILE_ROWS, in] @ weight.T (+ bias) -> [rows, out] in bf16 with AMX tiles, weight the plain
    contiguous [out, in] (`tiles_take`): W's rows load as tiles in place, so each byte of W is streamed once for
    all the rows (on Sapphire Rapids ~0.85x oneDNN's time over the SmolLM2-135M shapes at 1-32 rows)."""
    return torch.ops.spindle_cpu.linear_tiles(x, weight, bias)
