"""RMSNorm with the residual add fused in (one kernel call per norm).

Gemma's norms scale by `1 + w`: `weight_offset=1.0` adds the one at load time, so the kernels stay the same.
"""

from __future__ import annotations

import torch
from spindle_kernels import KernelOps

from spindle_server.weights import Weights


class RMSNorm(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        eps: float,
        ops: KernelOps,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        weight_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.ops = ops
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def load(self, weights: Weights, name: str) -> None:
        """name: the full tensor name, e.g. "model.norm.weight" (replicated on every rank)."""
        value = weights.get(name)
        if value.shape != self.weight.shape:
            raise ValueError(
                f"weight {name!r} has shape {tuple(value.shape)}, expected {tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            # the offset is added in float32 (as Gemma computes 1 + w), then cast
            self.weight.copy_(value.float() + self.weight_offset if self.weight_offset else value)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without `residual`, (norm(x), x)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
