"""Gated MLP activations over a merged [gate | up] projection: act(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spindle_kernels import KernelOps


class SiluAndMul(torch.nn.Module):
    """SwiGLU (Llama, Mistral, Qwen, Phi-3)."""

    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * I] holding [gate | up] -> [T, I]."""
        return self.ops.silu_and_mul(x)


class GeluTanhAndMul(torch.nn.Module):
    """GeGLU with the tanh approximation (Gemma's `gelu_pytorch_tanh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * I] holding [gate | up] -> [T, I]."""
        half = x.shape[-1] // 2
        return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


def gated_activation(name: str, ops: KernelOps) -> torch.nn.Module:
    """The module for a config's `hidden_act` (the registry admits only these names)."""
    if name == "silu":
        return SiluAndMul(ops)
    if name == "gelu_pytorch_tanh":
        return GeluTanhAndMul()
    raise ValueError(f"hidden_act {name!r} is not supported (supported: silu, gelu_pytorch_tanh)")
