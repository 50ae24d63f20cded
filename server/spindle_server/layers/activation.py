"""SwiGLU's activation: silu(gate) * up over a merged [gate | up] projection."""

from __future__ import annotations

import torch
from spindle_kernels import KernelOps


class SiluAndMul(torch.nn.Module):
    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * I] holding [gate | up] -> [T, I]."""
        return self.ops.silu_and_mul(x)
