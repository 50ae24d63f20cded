"""The CPU attention (`spindle_kernels.cpu`) against the torch reference it re-shapes."""

from __future__ import annotations

import pytest
import torch
from spindle_kernels import cpu, reference

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


def test_decode_padding_row_is_zero():
    c = make_paged_case([1, 1], [3, 7], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
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
def test_rms_norm_matches_reference(dtype, with_residual):
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, 48, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(48, generator=gen)).to(dtype)
    r = residual if with_residual else None
    got, got_res = cpu.rms_norm(x, weight, 1e-6, r)
    want, want_res = reference.rms_norm(x, weight, 1e-6, r)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
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
