"""Triton reshape_and_cache, RMSNorm, rotary and SiLU-and-mul vs the torch reference (interpreter)."""

from __future__ import annotations

import pytest
import torch
from spindle_kernels import reference

pytestmark = pytest.mark.triton_interpreter

# The interpreter rounds fp32 -> bf16 toward zero where GPUs (and torch) round to nearest even, so
# bf16 results here may differ from the reference by an ulp per rounding; the GPU tests check them
# exactly where the kernel promises it.
BF16_ULPS = {"atol": 1e-2, "rtol": 2 * 2**-7}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- reshape_and_cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 16, 4), (3, 24, 16), (1, 32, 4)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_reshape_and_cache_matches_reference(num_kv_heads, head_dim, block_size, slot_dtype):
    from spindle_kernels.kv_store import reshape_and_cache

    g = _gen(0)
    num_blocks, num_tokens = 6, 9
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn_like(k_cache)
    # Scattered, distinct slots plus one padding token (-1) that must be skipped.
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[4] = -1
    # key/value as strided views of a fused qkv row, as the model produces them.
    qkv = torch.randn(num_tokens, 5 * num_kv_heads * head_dim, generator=g)
    key = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 3 * num_kv_heads * head_dim : 4 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(key, value, want_k, want_v, slots.to(slot_dtype))
    reshape_and_cache(key, value, k_cache, v_cache, slots.to(slot_dtype))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # The write really happened (the reference is not a no-op) and the padding token went nowhere.
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[0]], key[0])
    assert not any(torch.equal(flat_k[s], key[4]) for s in range(flat_k.shape[0]))


def test_reshape_and_cache_casts_to_cache_dtype():
    from spindle_kernels.kv_store import reshape_and_cache

    k_cache = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([5, 0, 7], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(key, value, want_k, want_v, slots)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache.float(), want_k.float(), **BF16_ULPS)
    torch.testing.assert_close(v_cache.float(), want_v.float(), **BF16_ULPS)
    assert k_cache.view(-1, 2, 16)[[5, 0, 7]].abs().sum() > 0 and not k_cache.view(-1, 2, 16)[1].any()


def test_reshape_and_cache_rejects_bad_inputs_and_writes_nothing():
    from spindle_kernels.kv_store import reshape_and_cache

    k_cache, v_cache = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not match the cache"):
        reshape_and_cache(torch.randn(3, 4, 8), value, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="num_tokens"):
        reshape_and_cache(key, value, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        reshape_and_cache(key, value, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="contiguous head_dim"):
        reshape_and_cache(torch.randn(3, 16, 2).transpose(1, 2), value, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        reshape_and_cache(key, value, k_cache.transpose(0, 1).contiguous().transpose(0, 1), v_cache, slots)
    assert not k_cache.any() and not v_cache.any()


# ---- rms_norm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (2, 3, 48), (1, 7)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(shape, with_residual):
    from spindle_kernels.norm import rms_norm

    g = _gen(1)
    x = torch.randn(shape, generator=g) * 3
    weight = torch.rand(shape[-1], generator=g) + 0.5
    residual = torch.randn(shape, generator=g) if with_residual else None
    x_before = x.clone()
    got, got_residual = rms_norm(x, weight, 1e-5, residual)
    want, want_residual = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_residual, want_residual, atol=0, rtol=0)
    assert torch.equal(x, x_before)  # inputs are not modified
    if not with_residual:
        assert got_residual is x


def test_rms_norm_bf16_rounds_like_reference():
    from spindle_kernels.norm import rms_norm

    g = _gen(2)
    x = torch.randn(4, 96, generator=g).bfloat16()
    residual = torch.randn(4, 96, generator=g).bfloat16()
    weight = (torch.rand(96, generator=g) + 0.5).bfloat16()
    got, got_residual = rms_norm(x, weight, 1e-6, residual)
    want, want_residual = reference.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(got_residual.float(), want_residual.float(), **BF16_ULPS)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=4 * 2**-7)


def test_rms_norm_reads_strided_rows():
    from spindle_kernels.norm import rms_norm

    g = _gen(3)
    wide = torch.randn(6, 80, generator=g)
    x = wide[:, :40]  # row stride 80
    weight = torch.rand(40, generator=g)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5)[0], reference.rms_norm(x, weight, 1e-5)[0])


def test_rms_norm_rejects_bad_inputs():
    from spindle_kernels.norm import rms_norm

    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(16, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, torch.ones(16), 1e-5, torch.randn(2, 16))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm(torch.randn(16, 3).t(), torch.ones(16), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(16), -1.0)


# ---- rotary_embedding ----------------------------------------------------------------------------


def _cos_sin(num_tokens: int, head_dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 100, (num_tokens,), generator=g).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (3, 1, 24), (2, 2, 8)])
def test_rotary_matches_reference_on_fused_qkv_views(num_heads, num_kv_heads, head_dim):
    from spindle_kernels.rotary import rotary_embedding

    g = _gen(4)
    num_tokens = 7
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    cos, sin = _cos_sin(num_tokens, head_dim, g)
    want = qkv.clone()
    for t in (qkv, want):
        q = t[:, :q_size].view(num_tokens, num_heads, head_dim)
        k = t[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
        (rotary_embedding if t is qkv else reference.rotary_embedding)(q, k, cos, sin)
    torch.testing.assert_close(qkv, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, q_size + kv_size :], want[:, q_size + kv_size :])  # v untouched


def test_rotary_rotates_something_and_rejects_bad_inputs():
    from spindle_kernels.rotary import rotary_embedding

    g = _gen(5)
    q, k = torch.randn(3, 2, 16, generator=g), torch.randn(3, 1, 16, generator=g)
    cos, sin = _cos_sin(3, 16, g)
    q_before = q.clone()
    rotary_embedding(q, k, cos, sin)
    assert not torch.allclose(q, q_before)
    with pytest.raises(ValueError, match="cos must be"):
        rotary_embedding(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="even"):
        rotary_embedding(torch.randn(3, 2, 15), torch.randn(3, 1, 15), cos, sin)
    with pytest.raises(ValueError, match="k "):
        rotary_embedding(q, torch.randn(2, 1, 16), cos, sin)
    with pytest.raises(ValueError, match="contiguous head_dim"):
        rotary_embedding(torch.randn(3, 16, 2).transpose(1, 2), k, cos, sin)


# ---- silu_and_mul --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 32), (3, 2, 40), (5, 2 * 1100)])
def test_silu_and_mul_matches_reference(shape):
    from spindle_kernels.activation import silu_and_mul

    x = torch.randn(shape, generator=_gen(6)) * 4
    got = silu_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, reference.silu_and_mul(x), atol=1e-5, rtol=1e-5)


def test_silu_and_mul_bf16_and_bad_inputs():
    from spindle_kernels.activation import silu_and_mul

    x = (torch.randn(3, 64, generator=_gen(7)) * 4).bfloat16()
    torch.testing.assert_close(silu_and_mul(x).float(), reference.silu_and_mul(x).float(), atol=2e-2, rtol=4 * 2**-7)
    with pytest.raises(ValueError, match="even last dim"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.randn(3, 8).double())
