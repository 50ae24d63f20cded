"""Compiled Triton kernels (and flash-attn, when installed) vs the torch reference on CUDA.

CUDA-only: skipped without a GPU. Realistic shapes: Llama-style GQA 32/8 heads, head_dim 128.
"""

from __future__ import annotations

import pytest
import torch
from spindle_kernels import ops_for, reference

from tests.kernels.conftest import interpreter_active
from tests.kernels.paged_inputs import PagedCase, make_paged_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOLERANCE = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}


@pytest.fixture(autouse=True)
def _compiled_triton():
    if interpreter_active():
        pytest.fail("TRITON_INTERPRET=1 is set in this process: GPU tests need the compiled kernels")


def _case(q_lens, context_lens, dtype, block_size=16, seed=0) -> PagedCase:
    return make_paged_case(
        q_lens, context_lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=block_size,
        dtype=dtype, device="cuda", seed=seed,
    )


def _decode_reference(c: PagedCase) -> torch.Tensor:
    return reference.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)


# One compile per (dtype, block size): every context shape of a case shares a launch.
DECODE_CONTEXTS = [1, 2047, 17, 300, 1024, 33, 5, 129, 640]


@pytest.mark.parametrize(
    ("dtype", "block_size"),
    [(torch.bfloat16, 16), (torch.float16, 16), (torch.float32, 16), (torch.bfloat16, 256)],
)
def test_decode_attention(dtype, block_size):
    from spindle_kernels.attention import paged_decode_attention

    c = _case([1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, dtype, block_size)
    got = paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    torch.testing.assert_close(got, _decode_reference(c), **TOLERANCE[dtype])
    # batch 1 (64 splits) and a single long context: the split path at its widest
    one = _case([1], [2047], dtype, block_size, seed=5)
    got = paged_decode_attention(one.q, one.k_cache, one.v_cache, one.block_tables, one.context_lens, one.scale)
    torch.testing.assert_close(got, _decode_reference(one), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_attention(dtype):
    from spindle_kernels.attention import paged_attention

    # one long prompt; chunks after prefixes with a decode row and an empty slot; a chunk ending mid-tile
    for batch in (([300], [300]), ([1, 77, 0, 128, 5], [900, 77, 3, 1000, 64]), ([513, 1], [700, 2])):
        c = _case(*batch, dtype)
        args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
        torch.testing.assert_close(paged_attention(*args), reference.paged_attention(*args), **TOLERANCE[dtype])


def _num_compiled(kernel) -> int:
    # JITFunction.device_caches: device -> (compiled kernels by specialization key, ...)
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def test_varying_batches_and_tables_compile_nothing_new():
    # Eager steps change the batch size and the block-table width every step: after one call of each
    # kernel, none of these may compile again (a compile on a live request stalls every stream for seconds).
    from spindle_kernels import attention

    kernels = (attention._decode_kernel, attention._merge_splits_kernel, attention._prefill_kernel)

    def run(batch: int, extra_columns: int, seed: int) -> None:
        lens = [(37 * i + 11) % 500 + 1 for i in range(batch)]
        c = _case([1] * batch, lens, torch.bfloat16, seed=seed)
        tables = torch.cat([c.block_tables, c.block_tables[:, :1].repeat(1, extra_columns)], 1).contiguous()
        got = attention.paged_decode_attention(c.q, c.k_cache, c.v_cache, tables, c.context_lens, c.scale)
        torch.testing.assert_close(got, _decode_reference(c), **TOLERANCE[torch.bfloat16])
        q_lens = [min(n, 1 + i % 70) for i, n in enumerate(lens)]
        p = _case(q_lens, lens, torch.bfloat16, seed=seed)
        tables = torch.cat([p.block_tables, p.block_tables[:, :1].repeat(1, extra_columns)], 1).contiguous()
        args = (p.q, p.k_cache, p.v_cache, p.cu_seqlens_q, p.context_lens)
        attention.paged_attention(*args, tables, p.scale)

    run(3, 0, 0)
    before = [_num_compiled(k) for k in kernels]
    for seed, (batch, extra) in enumerate([(1, 5), (16, 1), (40, 16), (7, 3)]):  # 64, 32, 8, 64 splits
        run(batch, extra, seed + 1)
    assert [_num_compiled(k) for k in kernels] == before


def test_decode_attention_replays_in_a_cuda_graph():
    # The split count depends on shapes only and nothing syncs: a captured step stays correct when
    # the tables and lengths change in place between replays.
    from spindle_kernels.attention import paged_decode_attention

    c = _case([1] * 4, [50, 700, 3, 1500], torch.bfloat16, seed=1)
    q, tables, lens = c.q.clone(), c.block_tables.clone(), c.context_lens.clone()
    paged_decode_attention(q, c.k_cache, c.v_cache, tables, lens, c.scale)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, c.k_cache, c.v_cache, tables, lens, c.scale)
    # Every table column holds a valid block id, so any length up to the table's width is in range.
    for perm, new_lens in (([3, 2, 1, 0], [1500, 3, 700, 50]), ([1, 0, 3, 2], [9, 1200, 1, 1504])):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        tables.copy_(c.block_tables[perm])
        graph.replay()
        want = reference.paged_decode_attention(q, c.k_cache, c.v_cache, tables, lens, c.scale)
        torch.testing.assert_close(out, want, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_elementwise_ops_match_reference_exactly_or_closely(dtype):
    from spindle_kernels.activation import silu_and_mul
    from spindle_kernels.kv_store import reshape_and_cache
    from spindle_kernels.norm import rms_norm
    from spindle_kernels.rotary import rotary_embedding

    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden = 37, 2048
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    residual = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    weight = torch.rand(hidden, device="cuda", generator=g).to(dtype) + 0.5
    normed, res = rms_norm(x, weight, 1e-5, residual)
    want_normed, want_res = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(res, want_res)
    torch.testing.assert_close(normed, want_normed, atol=2e-2, rtol=2e-2)

    gate_up = torch.randn(tokens, 2 * 8192, device="cuda", generator=g).to(dtype)
    torch.testing.assert_close(silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=2e-2, rtol=2e-2)

    qkv = torch.randn(tokens, (32 + 16) * 128, device="cuda", generator=g).to(dtype)
    want = qkv.clone()
    angles = torch.rand(tokens, 64, device="cuda", generator=g) * 100
    for t, fn in ((qkv, rotary_embedding), (want, reference.rotary_embedding)):
        fn(t[:, : 32 * 128].view(tokens, 32, 128), t[:, 32 * 128 : 40 * 128].view(tokens, 8, 128),
           angles.cos(), angles.sin())
    torch.testing.assert_close(qkv, want, atol=2e-2, rtol=2e-2)

    k_cache = torch.zeros(64, 16, 8, 128, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    key = qkv[:, 32 * 128 : 40 * 128].view(tokens, 8, 128)
    value = qkv[:, 40 * 128 :].view(tokens, 8, 128)
    slots = torch.randperm(64 * 16, device="cuda")[:tokens].to(torch.int32)
    slots[3] = -1
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    reference.reshape_and_cache(key, value, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_ops_match_reference(dtype):
    pytest.importorskip("flash_attn")
    ops = ops_for("cuda", block_size=256)
    assert ops.name == "flash_attn"
    c = _case([1] * 3, [5, 600, 1300], dtype, block_size=256)
    got = ops.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    torch.testing.assert_close(got, _decode_reference(c), **TOLERANCE[dtype])
    c = _case([40, 1, 300], [300, 600, 300], dtype, block_size=256)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    torch.testing.assert_close(ops.paged_attention(*args), reference.paged_attention(*args), **TOLERANCE[dtype])


def test_ops_for_cuda_names_the_backend():
    assert ops_for("cuda", block_size=16).name == "triton"


# Windows (Mistral 4096-style, Gemma 3's 512, one shorter than a tile) with Gemma 2's soft cap on one.
WINDOW_CASES = [(37, None), (512, None), (4096, None), (512, 50.0)]


@pytest.mark.parametrize(
    ("dtype", "window", "softcap"),
    [(torch.bfloat16, 37, None), (torch.bfloat16, 4096, None), (torch.bfloat16, 512, 50.0), (torch.float32, 512, None)],
)
def test_windowed_attention(dtype, window, softcap):
    from spindle_kernels.attention import paged_attention, paged_decode_attention

    kw = {"window": window, "softcap": softcap}
    c = _case([1] * 5, [1, 40, 700, 5000, 513], dtype, seed=3)
    got = paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, **kw)
    want = reference.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, **kw)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    c = _case([1, 77, 600, 300], [900, 77, 5000, 300], dtype, seed=4)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    torch.testing.assert_close(paged_attention(*args, **kw), reference.paged_attention(*args, **kw), **TOLERANCE[dtype])


@pytest.mark.parametrize(("window", "softcap"), WINDOW_CASES)
def test_flash_attn_windows_match_reference(window, softcap):
    pytest.importorskip("flash_attn")
    ops = ops_for("cuda", block_size=256)
    kw = {"window": window, "softcap": softcap}
    c = _case([1] * 3, [5, 600, 1300], torch.bfloat16, block_size=256)
    got = ops.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, **kw)
    want = reference.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, **kw)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])
    c = _case([40, 1, 300], [300, 600, 300], torch.bfloat16, block_size=256)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    got = ops.paged_attention(*args, **kw)
    torch.testing.assert_close(got, reference.paged_attention(*args, **kw), **TOLERANCE[torch.bfloat16])


def _moe_inputs(tokens: int, dtype: torch.dtype, seed: int = 0):
    # Mixtral-like routing (8 experts, top-2) at a smaller width: hidden 1024, expert intermediate 1792.
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden, inter, experts = 1024, 1792, 8
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).to(dtype)
    probs = torch.softmax(torch.randn(tokens, experts, device="cuda", generator=g), dim=-1)
    weights, ids = torch.topk(probs, 2, dim=-1)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_matches_reference(dtype):
    from spindle_kernels.moe import fused_moe

    for tokens in (1, 37, 600):  # decode-sized (16-row tiles) and prefill-sized (64-row tiles)
        inputs = _moe_inputs(tokens, dtype)
        torch.testing.assert_close(fused_moe(*inputs), reference.fused_moe(*inputs), **TOLERANCE[dtype])


def test_fused_moe_replays_in_a_cuda_graph():
    # Nothing reads routing back to the host: a captured decode step follows new routing on replay.
    from spindle_kernels.moe import fused_moe

    x, w13, w2, weights, ids = _moe_inputs(8, torch.bfloat16)
    fused_moe(x, w13, w2, weights, ids)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for seed in (1, 2):
        new_x, _, _, new_weights, new_ids = _moe_inputs(8, torch.bfloat16, seed=seed)
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.testing.assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), **TOLERANCE[torch.bfloat16])
