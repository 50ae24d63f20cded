"""Fused MoE: the Triton grouped GEMM (interpreter) against the torch reference, and the reference against
a plain per-token loop written here (so the reference is checked too, not only copied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from spindle_kernels import reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int = 0):
    g = _gen(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=g), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    return x, w13, w2, topk_weights, topk_ids


def _per_token_loop(x, w13, w2, topk_weights, topk_ids):
    """The definition, one token and one expert at a time."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate_up = w13[e] @ x[t]
            out[t] += topk_weights[t, k] * (w2[e] @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (9, 8, 2), (13, 4, 3)])
def test_reference_matches_the_per_token_definition(num_tokens, num_experts, top_k):
    inputs = _inputs(num_tokens, 32, 24, num_experts, top_k, seed=num_tokens)
    out = reference.fused_moe(*inputs)
    torch.testing.assert_close(out, _per_token_loop(*inputs), atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1  # not trivially zero


def test_reference_with_no_tokens_and_unused_experts():
    x, w13, w2, tw, ti = _inputs(0, 16, 8, 4, 2)
    assert reference.fused_moe(x, w13, w2, tw, ti).shape == (0, 16)
    # Every token routed to expert 3 alone: experts 0-2 never run, and their weights cannot matter.
    x, w13, w2, tw, ti = _inputs(5, 16, 8, 4, 1, seed=3)
    ti = torch.full_like(ti, 3)
    poisoned = w13.clone()
    poisoned[:3] = float("nan")
    torch.testing.assert_close(reference.fused_moe(x, poisoned, w2, tw, ti), _per_token_loop(x, w13, w2, tw, ti))


@pytest.mark.triton_interpreter
@pytest.mark.parametrize(
    "num_tokens,hidden,inter,num_experts,top_k",
    [
        (1, 32, 16, 4, 2),  # decode: most experts idle
        (7, 32, 24, 8, 2),  # Mixtral-like routing; 2I=48 and I=24 are not powers of two (masked tiles)
        (21, 48, 16, 4, 3),  # more pairs than one 16-row tile per expert
        (37, 32, 16, 2, 2),  # prefill-sized: 64-row tiles
    ],
)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_triton_matches_reference(num_tokens, hidden, inter, num_experts, top_k, ids_dtype):
    from spindle_kernels.moe import fused_moe

    x, w13, w2, tw, ti = _inputs(num_tokens, hidden, inter, num_experts, top_k, seed=num_tokens)
    out = fused_moe(x, w13, w2, tw, ti.to(ids_dtype))
    torch.testing.assert_close(out, reference.fused_moe(x, w13, w2, tw, ti), atol=1e-5, rtol=1e-5)


@pytest.mark.triton_interpreter
def test_triton_sorting_pads_each_expert_to_whole_tiles():
    from spindle_kernels.moe import _sort_pairs_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5 -> experts 2 0 2 1 0 2
    sorted_pairs, block_expert, num_padded = _sort_pairs_by_expert(ids, num_experts=4, block_m=4)
    pad = 6
    assert sorted_pairs.tolist()[:12] == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert block_expert.tolist()[:3] == [0, 1, 2] and set(block_expert.tolist()[3:]) == {4}
    assert num_padded.tolist() == [12]


@pytest.mark.triton_interpreter
def test_triton_half_precision_and_empty_and_bad_inputs():
    from spindle_kernels.moe import fused_moe

    # float16: the interpreter's tl.dot mishandles bfloat16 (test_gpu.py checks bfloat16 compiled).
    x, w13, w2, tw, ti = _inputs(6, 32, 16, 4, 2, seed=5)
    out = fused_moe(x.half(), w13.half(), w2.half(), tw, ti)
    want = reference.fused_moe(x.half(), w13.half(), w2.half(), tw, ti)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want.float(), atol=5e-3, rtol=5e-3)
    assert fused_moe(x[:0], w13, w2, tw[:0], ti[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w2[:, :, :8], tw, ti)
    with pytest.raises(ValueError, match="topk_weights dtype"):
        fused_moe(x, w13, w2, tw.double(), ti)
    with pytest.raises(ValueError, match=r"must both be \[6, top_k\]"):
        fused_moe(x, w13, w2, tw[:5], ti[:5])
    with pytest.raises(ValueError, match="x, w13, w2 must share one dtype"):
        fused_moe(x.bfloat16(), w13, w2, tw, ti)
