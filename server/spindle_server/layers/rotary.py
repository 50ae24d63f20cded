"""Rotary position embeddings, with the rope scalings Llama-family checkpoints use.

Frequencies follow transformers' `modeling_rope_utils` exactly (float32 throughout) for the types
default, linear, dynamic (NTK) and llama3. cos/sin of a token depend only on its absolute position, except
for dynamic NTK, where transformers rescales the base from the sequence length: we use each sequence's
length in this forward (its context_len), which equals transformers for a whole prompt and for every decode
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from spindle_kernels import KernelOps

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, dynamic, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3; 0 = max_position_embeddings

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta} and {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> RopeConfig:
        """From config.json: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older)."""
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ValueError(f"rope parameters must be an object, got {params!r}")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope parameters are not supported by Llama-family models")
        if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported by Llama-family models")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        original = params.get("original_max_position_embeddings", 0)
        if rope_type == "llama3" and "original_max_position_embeddings" in cfg:
            # transformers gives the top-level value priority over the one inside the rope parameters
            original = cfg["original_max_position_embeddings"]
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original or 0),
        )


def inv_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies at the model's trained scale."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq  # default; dynamic equals default up to max_position_embeddings


class RotaryEmbedding(torch.nn.Module):
    """Rotates q [T, heads, d] and k [T, kv_heads, d] in place at each token's position."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_position_embeddings: int,
        ops: KernelOps,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.ops = ops
        inv_freq = inv_frequencies(rope, head_dim, max_position_embeddings)
        angles = torch.arange(max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_positions, d/2] float32 tables; not parameters, not in the checkpoint.
        self.register_buffer("cos_table", angles.cos().to(device), persistent=False)
        self.register_buffer("sin_table", angles.sin().to(device), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, d/2] float32 for each token."""
        if self.rope.rope_type == "dynamic":
            return self._dynamic_cos_sin(positions, cu_seqlens_q, context_lens)
        return self.cos_table.index_select(0, positions), self.sin_table.index_select(0, positions)

    def _dynamic_cos_sin(
        self, positions: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Sequence length seen by each token, never below the trained length (below it, NTK is the default rope).
        q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        seq_len = torch.repeat_interleave(context_lens.long(), q_lens, output_size=positions.shape[0])
        max_len = self.max_position_embeddings
        seq_len = seq_len.clamp(min=max_len).float()
        dim, factor = self.head_dim, self.rope.factor
        base = self.rope.theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))  # [T]
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (base[:, None] ** exponents[None, :])  # [T, d/2]
        angles = positions.float()[:, None] * inv_freq
        return angles.cos(), angles.sin()

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> None:
        cos, sin = self.cos_sin(positions, cu_seqlens_q, context_lens)
        self.ops.rotary_embedding(q, k, cos, sin)
