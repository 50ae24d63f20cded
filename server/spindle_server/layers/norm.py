"""RMSNorm with the residual add fused in (one kernel call per norm)."""

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
    ) -> None:
        super().__init__()
        self.eps = eps
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
            self.weight.copy_(value)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without `residual`, (norm(x), x)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
