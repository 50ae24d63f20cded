"""Triton SiLU-and-multiply for gated MLPs: x [..., 2 * I] = [gate | up] -> silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spindle_kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the input dtype before the product, as torch does for F.silu(g) * u.
    act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `reference.silu_and_mul`."""
    check_dtype("x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2 * intermediate] with an even last dim, got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, 2 * inter)
    rows = x2.shape[0]
    if rows == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x2, out.view(-1, inter), x2.stride(0), inter, INTER=inter, BLOCK=block,
    )
    return out
