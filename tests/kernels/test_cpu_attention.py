"""The CPU attention (`spindle_kernels.cpu`) against the torch reference it re-shapes."""

from __future__ import annotations

import pytest
import torch
from spindle_kernels import cpu, cpu_native, reference

from tests.kernels.paged_inputs import make_paged_case

# (num_heads, num_kv_heads, head_dim): MHA, GQA 2 and 4, MQA, a non-power-of-two head_dim
HEADS = [(2, 2, 16), (4, 2, 16), (4, 1, 32), (8, 2, 16), (2, 1, 24)]
TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference(dtype, heads, block_size):
    num_heads, num_kv_heads, head_dim = heads
    c = make_paged_case([1] * 5, [1, 9, 33, 16, 70], num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, block_size=block_size, dtype=dtype, seed=block_size)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    got = cpu.paged_decode_attention(*args)
    assert got.dtype == dtype and got.shape == c.q.shape
    torch.testing.assert_close(got, reference.paged_decode_attention(*args), **TOLERANCE[dtype])


# Head sizes the C++ decode kernel takes (the ones above fall back to the torch path).
NATIVE_HEADS = [(2, 2, 32), (4, 2, 64), (9, 3, 64), (4, 1, 128), (2, 1, 80)]


def test_native_kernels_load():
    # The CPU fast path: a host with a C++ compiler (as every supported one has) must build and load it.
    assert cpu_native.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", NATIVE_HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_native_decode_matches_reference(dtype, heads, block_size):
    num_heads, num_kv_heads, head_dim = heads
    c = make_paged_case([1] * 6, [1, 9, 33, 16, 70, 200], num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, block_size=block_size, dtype=dtype, seed=block_size + head_dim)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    got = torch.ops.spindle_cpu.paged_decode_attention(*args)
    assert got.dtype == dtype and got.shape == c.q.shape
    torch.testing.assert_close(got, reference.paged_decode_attention(*args), **TOLERANCE[dtype])
    torch.testing.assert_close(cpu.paged_decode_attention(*args), got, rtol=0, atol=0)  # the dispatch picks it


def test_native_decode_rejects_what_it_cannot_take():
    c = make_paged_case([1], [5], num_heads=2, num_kv_heads=1, head_dim=64, block_size=4)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.spindle_cpu.paged_decode_attention(c.q.half(), c.k_cache.half(), c.v_cache.half(),
                                                      c.block_tables, c.context_lens, c.scale)
    short_table = c.block_tables[:, :1]
    with pytest.raises(RuntimeError, match="longer than its block table"):
        torch.ops.spindle_cpu.paged_decode_attention(c.q, c.k_cache, c.v_cache, short_table, c.context_lens,
                                                      c.scale)


@pytest.mark.parametrize("head_dim", [16, 64])  # the torch path and the C++ kernel
def test_decode_padding_row_is_zero(head_dim):
    c = make_paged_case([1, 1], [3, 7], num_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=4)
    context_lens = torch.tensor([0, 7], dtype=torch.int32)  # row 0 pads a batch to a captured size
    got = cpu.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, context_lens, c.scale)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.isfinite(got).all()


# A fresh prompt, a chunk after a prefix beside a decode and an empty slot, chunks longer than a block.
BATCHES = [([5], [5]), ([7, 1, 0, 3], [7, 20, 6, 11]), ([19, 2, 21], [23, 2, 40])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("batch", BATCHES, ids=["one-prompt", "mixed", "long-chunks"])
def test_varlen_matches_reference(dtype, heads, batch):
    q_lens, context_lens = batch
    num_heads, num_kv_heads, head_dim = heads
    c = make_paged_case(q_lens, context_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        block_size=4, dtype=dtype, seed=len(q_lens))
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    torch.testing.assert_close(cpu.paged_attention(*args), reference.paged_attention(*args), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("width", [48, 40])  # whole 16-lane vectors (bf16's vector path), and not
def test_rms_norm_matches_reference(dtype, with_residual, width):
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, width, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    r = residual if with_residual else None
    got, got_res = cpu.rms_norm(x, weight, 1e-6, r)
    want, want_res = reference.rms_norm(x, weight, 1e-6, r)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    if dtype == torch.bfloat16:
        assert (got == want).float().mean() > 0.95
    assert torch.equal(got_res, want_res) and got.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(6, 4, 32, generator=gen).to(dtype), torch.randn(6, 2, 32, generator=gen).to(dtype)
    angles = torch.arange(6.0)[:, None] * torch.rand(16, generator=gen)[None, :]
    q_ref, k_ref = q.clone(), k.clone()
    reference.rotary_embedding(q_ref, k_ref, angles.cos(), angles.sin())
    cpu.rotary_embedding(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(q, q_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(k, k_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_views_of_the_qkv_projection(dtype):
    # The attention layer rotates q and k in place as views into one [T, (H + 2 * KVH) * d] output.
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads, d = 5, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    angles = torch.arange(tokens, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=gen)[None, :]
    want = qkv.clone()
    q_ref, k_ref = want[:, : heads * d].view(tokens, heads, d), want[:, heads * d : (heads + kv_heads) * d]
    reference.rotary_embedding(q_ref, k_ref.view(tokens, kv_heads, d), angles.cos(), angles.sin())
    q, k = qkv[:, : heads * d].view(tokens, heads, d), qkv[:, heads * d : (heads + kv_heads) * d]
    cpu.rotary_embedding(q, k.view(tokens, kv_heads, d), angles.cos(), angles.sin())
    torch.testing.assert_close(qkv, want, **TOLERANCE[dtype])  # v untouched, q and k rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
def test_native_decode_reads_q_as_a_view_of_the_qkv_projection(dtype, block_size):
    # The layer hands q over as a strided view (KernelOps.takes_strided_qkv): same answer as a contiguous q.
    c = make_paged_case([1] * 4, [1, 17, 40, 200], num_heads=9, num_kv_heads=3, head_dim=64,
                        block_size=block_size, dtype=dtype, seed=11)
    qkv = torch.cat([c.q.reshape(4, -1), torch.randn(4, 2 * 3 * 64).to(dtype)], dim=1)
    q_view = qkv[:, : 9 * 64].view(4, 9, 64)
    assert not q_view.is_contiguous()
    args = (c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    got = cpu.paged_decode_attention(q_view, *args)
    assert torch.equal(got, cpu.paged_decode_attention(c.q, *args))
    torch.testing.assert_close(got, reference.paged_decode_attention(c.q, *args), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv-views"])
def test_reshape_and_cache_matches_reference(dtype, strided):
    gen = torch.Generator().manual_seed(6)
    tokens, kv_heads, d, heads = 6, 2, 64, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
    if not strided:
        k, v = k.contiguous(), v.contiguous()
    slots = torch.tensor([3, 17, -1, 0, 30, 9])  # -1: a padding token writes nothing
    k_cache, v_cache = (torch.randn(4, 8, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    k_want, v_want = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(k, v, k_want, v_want, slots)
    cpu.reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    cpu.reshape_and_cache(k, v, k_cache, v_cache, slots.int())  # int32 slots: the same writes
    assert torch.equal(k_cache, k_want)


def test_native_reshape_and_cache_rejects_slots_outside_the_cache():
    k = torch.randn(2, 1, 64)
    k_cache, v_cache = torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.spindle_cpu.reshape_and_cache(k, k, k_cache, v_cache, torch.tensor([1, 8]))
    assert not k_cache.any()  # checked before anything is written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("inter", [96, 100])  # whole 16-lane vectors (bf16's vector path), and a tail
def test_silu_and_mul_matches_reference(dtype, rows, inter):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * inter, generator=gen) * 6).to(dtype)  # wide enough to reach exp's clamps
    x[0, :4] = torch.tensor([100.0, -100.0, 0.0, 88.5])
    got = cpu.silu_and_mul(x)
    want = reference.silu_and_mul(x)
    assert got.shape == (rows, inter) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    if dtype == torch.bfloat16:  # rounded where transformers rounds: mostly the same bits
        assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference_on_3d_rows(dtype):
    gen = torch.Generator().manual_seed(6)
    x, r = torch.randn(2, 9, 576, generator=gen).to(dtype), torch.randn(2, 9, 576, generator=gen).to(dtype)
    weight = torch.rand(576, generator=gen).to(dtype)
    got, got_res = cpu.rms_norm(x, weight, 1e-5, r)
    want, want_res = reference.rms_norm(x, weight, 1e-5, r)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.equal(got_res, want_res)
    alone, same = cpu.rms_norm(x, weight, 1e-5)
    assert same is x  # without a residual, x itself is the next residual
    torch.testing.assert_close(alone, reference.rms_norm(x, weight, 1e-5)[0], **TOLERANCE[dtype])


def _naive_attention(c, window: int | None, softcap: float | None = None) -> torch.Tensor:
    """Token by token over each sequence's gathered context: what every path must compute, float32."""
    out = torch.empty_like(c.q, dtype=torch.float32)
    num_heads, num_kv_heads = c.q.shape[1], c.k_cache.shape[2]
    cu, lens = c.cu_seqlens_q.tolist(), c.context_lens.tolist()
    for b, ctx in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        blocks = c.block_tables[b].long()
        k = c.k_cache[blocks].flatten(0, 1)[:ctx].float()
        v = c.v_cache[blocks].flatten(0, 1)[:ctx].float()
        for i in range(q_len):
            p = ctx - q_len + i
            lo = 0 if window is None else max(p - window + 1, 0)
            for h in range(num_heads):
                kv = h // (num_heads // num_kv_heads)
                scores = (k[lo : p + 1, kv] @ c.q[cu[b] + i, h].float()) * c.scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[cu[b] + i, h] = torch.softmax(scores, 0) @ v[lo : p + 1, kv]
    return out


# Windows shorter than the contexts, one block long, one token, and longer than every context.
WINDOWS = [None, 1, 4, 7, 100]


@pytest.mark.parametrize("softcap", [None, 0.5], ids=["no-cap", "softcap"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("impl", [reference, cpu], ids=["reference", "cpu"])
def test_sliding_window_and_softcap_match_naive(impl, window, softcap):
    c = make_paged_case([7, 1, 0, 19, 1], [7, 20, 6, 40, 13], num_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=4, seed=9)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    want = _naive_attention(c, window, softcap)
    got = impl.paged_attention(*args, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    d = make_paged_case([1] * 4, [1, 5, 17, 33], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=10)
    got = impl.paged_decode_attention(d.q, d.k_cache, d.v_cache, d.block_tables, d.context_lens, d.scale,
                                      window=window, softcap=softcap)
    torch.testing.assert_close(got, _naive_attention(d, window, softcap), atol=2e-5, rtol=1e-5)


def test_window_changes_the_answer_and_bad_windows_are_rejected():
    c = make_paged_case([1, 1], [30, 9], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=11)
    args = (c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    full, windowed = cpu.paged_decode_attention(*args), cpu.paged_decode_attention(*args, window=10)
    assert not torch.allclose(full[0], windowed[0])  # context 30 > window 10
    torch.testing.assert_close(full[1], windowed[1])  # context 9 fits in the window
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            cpu.paged_decode_attention(*args, window=bad)
    capped = cpu.paged_decode_attention(*args, softcap=0.5)  # cap 0.5 on logits of size ~1: a real change
    assert not torch.allclose(full, capped)
    with pytest.raises(ValueError, match="softcap"):
        cpu.paged_decode_attention(*args, softcap=0.0)


@pytest.mark.parametrize("window", [1, 4, 9])
def test_decode_skips_blocks_before_every_window(window):
    # Every context is longer than the window: the CPU decode gathers only the blocks a window reaches.
    d = make_paged_case([1] * 3, [20, 33, 41], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=13)
    got = cpu.paged_decode_attention(d.q, d.k_cache, d.v_cache, d.block_tables, d.context_lens, d.scale,
                                     window=window, softcap=0.5 if window == 4 else None)
    torch.testing.assert_close(got, _naive_attention(d, window, 0.5 if window == 4 else None), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("window", "softcap"), [(6, None), (None, 0.5), (6, 0.5), (1, None)])
def test_windowed_decode_at_a_native_head_dim(window, softcap):
    # head_dim 64 is one the C++ kernel takes: it applies the window and the soft cap itself.
    d = make_paged_case([1] * 3, [20, 33, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, seed=14)
    got = cpu.paged_decode_attention(d.q, d.k_cache, d.v_cache, d.block_tables, d.context_lens, d.scale,
                                     window=window, softcap=softcap)
    torch.testing.assert_close(got, _naive_attention(d, window, softcap), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (300, None), (7, 0.5)])
def test_native_decode_splits_long_rows_and_merges_them(threads, window, softcap):
    # Few sequences and long contexts: the C++ kernel cuts each sequence's visible rows into splits (how many
    # follows the thread count) and merges their partial softmaxes; a padding row and a row shorter than a
    # split ride along. Any split count must give the unsplit answer.
    d = make_paged_case([1] * 4, [700, 1, 3, 259], num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                        seed=threads)
    want = _naive_attention(d, window, softcap)
    want[1] = 0.0
    d.context_lens[1] = 0  # a padding row: attends to nothing
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.spindle_cpu.paged_decode_attention(d.q, d.k_cache, d.v_cache, d.block_tables,
                                                            d.context_lens, d.scale, window or 0, softcap or 0.0)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.fixture(params=["native", "sdpa"])
def chunk_path(request, monkeypatch):
    """Both routes a long chunk can take at native head sizes, whichever this CPU measured faster."""
    monkeypatch.setattr(cpu, "chunks_by_sdpa", lambda *shape: request.param == "sdpa")
    return request.param


@pytest.mark.parametrize("softcap", [None, 0.5], ids=["no-cap", "softcap"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("heads", NATIVE_HEADS)
@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_chunk_rows_match_naive(heads, window, softcap, block_size, dtype, chunk_path):
    # At head sizes the C++ kernels take, chunks attend row by row from the cache (`attention_rows`): a fresh
    # prompt, a chunk after cached context, decode rows and an empty slot in one call. A chunk's rows share
    # transposed K tiles (a last group of one row, 17 = 2 x 8 + 1, takes the decode path); blocks of 5 rows
    # end tiles part-way. bfloat16 scores come from pairs of bf16 products (VDPBF16PS where the CPU has it),
    # checked against float32 arithmetic on the same bf16 values: only the output's rounding differs.
    # On the sdpa path the 17- and 40-row chunks (without a soft cap) go to torch's flash attention over
    # their gathered context, the 7-row prompt and the decode rows to the C++ kernel, in one call.
    num_heads, num_kv_heads, head_dim = heads
    c = make_paged_case([7, 1, 0, 17, 1, 40], [7, 20, 6, 40, 13, 75], num_heads=num_heads, dtype=dtype,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, seed=head_dim)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    got = cpu.paged_attention(*args, window=window, softcap=softcap)
    want = _naive_attention(c, window, softcap)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want, atol=8e-3, rtol=8e-3)


@pytest.mark.parametrize("window", [None, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prompts_of_one_length_attend_in_one_sdpa_call(dtype, window, monkeypatch):
    # Adjacent whole prompts of one length (the three of 20, then the two of 20 after a 17) go to torch's flash
    # attention as one batch; a 17-row prompt alone, a 20-row chunk after cached context and a decode row
    # their own ways. q is a view of a wider projection, as the layer passes it. Under a 7-token window no
    # prompt is fresh (the window cuts it): every chunk on the gathered-context path.
    monkeypatch.setattr(cpu, "chunks_by_sdpa", lambda *shape: True)
    calls = []
    real = cpu._fresh_attention
    monkeypatch.setattr(cpu, "_fresh_attention", lambda q, *a: calls.append(a[2].shape[0]) or real(q, *a))
    c = make_paged_case([20, 20, 20, 1, 17, 20, 20, 20], [20, 20, 20, 9, 17, 20, 20, 45], num_heads=6,
                        num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, seed=21)
    wide = torch.cat([c.q, torch.randn_like(c.q)], dim=1)
    q = wide[:, :6]
    got = cpu.paged_attention(q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale,
                              window=window)
    want = _naive_attention(c, window)
    assert calls == ([] if window == 7 else [3, 1, 2])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want, atol=8e-3, rtol=8e-3)


def test_attention_rows_rejects_rows_outside_the_tables():
    c = make_paged_case([3], [5], num_heads=2, num_kv_heads=1, head_dim=64, block_size=4)
    lens = torch.tensor([3, 4, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="row_seqs out of range"):
        torch.ops.spindle_cpu.attention_rows(c.q, c.k_cache, c.v_cache, c.block_tables,
                                             torch.tensor([0, 0, 1], dtype=torch.int32), lens, c.scale)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        torch.ops.spindle_cpu.attention_rows(c.q, c.k_cache, c.v_cache, c.block_tables,
                                             torch.zeros(3, dtype=torch.int32), lens * 10, c.scale)


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (300, None), (5, 0.5)])
def test_native_chunk_rows_split_deep_contexts(threads, window, softcap, monkeypatch):
    # A chunk deep into a long context: its rows share K/V reads in groups, and with few groups each is cut
    # into splits (by thread count) whose partial softmaxes merge; rows of one group see different spans.
    c = make_paged_case([11, 1, 3], [700, 90, 260], num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                        seed=threads)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    monkeypatch.setattr(cpu, "chunks_by_sdpa", lambda *shape: False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.paged_attention(*args, window=window, softcap=softcap)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, _naive_attention(c, window, softcap), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 17, 49152, 100003])
def test_argmax_logsumexp_matches_torch(dtype, vocab):
    # What greedy sampling reads of each row: the first of equal maxima (ties across vector lanes and in the
    # scalar tail), and a log-normalizer whose scores - lse is torch's log_softmax; a row of -inf has none.
    torch.manual_seed(vocab)
    scores = (torch.randn(5, vocab) * 4).to(dtype)
    scores[1, vocab // 2] = scores[1, -1] = scores[1].max() + 1  # a tie: the earlier wins
    scores[2] = float("-inf")
    scores[3, : vocab // 2] = float("-inf")  # a grammar mask
    ids, lse = cpu.argmax_logsumexp(scores)
    assert ids.tolist() == scores.float().argmax(dim=-1).tolist()
    chosen = scores.float().gather(1, ids[:, None])[:, 0] - lse
    want = torch.log_softmax(scores.float(), dim=-1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(chosen[[0, 1, 3, 4]], want[[0, 1, 3, 4]], atol=1e-5, rtol=1e-5)
    assert lse[2].item() == float("-inf") and ids[2].item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_logsumexp_takes_the_first_nan_like_torch(dtype):
    scores = torch.randn(2, 40).to(dtype)
    scores[0, 7] = scores[0, 30] = float("nan")
    scores[1] = float("-inf")
    scores[1, 21] = float("nan")
    ids, lse = cpu.argmax_logsumexp(scores)
    assert ids.tolist() == scores.float().argmax(dim=-1).tolist() == [7, 21]
    assert torch.isnan(lse).all()


def test_chunk_route_is_measured_once_or_fixed_by_the_environment(monkeypatch, caplog):
    shape = (torch.bfloat16, 9, 3, 64)
    for fixed in ("native", "sdpa"):
        monkeypatch.setenv("SPINDLE_CPU_CHUNK_ATTENTION", fixed)
        cpu.chunks_by_sdpa.cache_clear()
        assert cpu.chunks_by_sdpa(*shape) is (fixed == "sdpa")
    monkeypatch.setenv("SPINDLE_CPU_CHUNK_ATTENTION", "fast")
    cpu.chunks_by_sdpa.cache_clear()
    with pytest.raises(ValueError, match="auto, native or sdpa"):
        cpu.chunks_by_sdpa(*shape)
    monkeypatch.delenv("SPINDLE_CPU_CHUNK_ATTENTION")
    cpu.chunks_by_sdpa.cache_clear()
    with caplog.at_level("INFO", logger="spindle_kernels.cpu"):
        choice = cpu.chunks_by_sdpa(*shape)
        assert cpu.chunks_by_sdpa(*shape) is choice  # measured once per shape
    assert len([r for r in caplog.records if "attend through" in r.message]) == 1
    cpu.chunks_by_sdpa.cache_clear()
