"""Spindle's hot operations. Each kernel has a torch reference in `reference.py` with the same signature.

The shard picks one `KernelOps` at start-up with `ops_for(device)` and passes it to its layers, so hot
code never asks which platform it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spindle_kernels import reference


@dataclass(frozen=True)
class KernelOps:
    name: str  # reported by the shard's Info as attention_impl
    reshape_and_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    paged_decode_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., None]
    silu_and_mul: Callable[..., torch.Tensor]


REFERENCE_OPS = KernelOps(
    name="torch",
    reshape_and_cache=reference.reshape_and_cache,
    paged_attention=reference.paged_attention,
    paged_decode_attention=reference.paged_decode_attention,
    rms_norm=reference.rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
)


def ops_for(device: torch.device) -> KernelOps:
    """The fastest available implementation for `device`: torch reference on CPU."""
    return REFERENCE_OPS


__all__ = ["KernelOps", "REFERENCE_OPS", "ops_for", "reference"]
