"""Triton RMSNorm with the residual add fused in: one program per row, the whole row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spindle_kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_same_device


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out, ResidualOut,
    stride_x, stride_r, stride_o, stride_ro,
    eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like torch's x + r
        tl.store(ResidualOut + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    w = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
    # Round the normed value to x's dtype before the weight, as the reference does.
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (normed * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.rms_norm`; x [..., hidden], weight [hidden] of x's dtype."""
    check_dtype("x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., hidden] with hidden > 0, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(
            f"weight must be [{hidden}] of dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    tensors = [x, weight]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
            )
        check_last_dim_contiguous("residual", residual)
        tensors.append(residual)
    check_same_device("x, weight, residual", *tensors)

    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else x
    if rows == 0:
        return out, residual_out
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    ro2 = residual_out.view(-1, hidden) if residual is not None else x2
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out.view(-1, hidden), ro2,
        x2.stride(0), r2.stride(0), hidden, ro2.stride(0),
        float(eps),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, residual_out
