"""Rotary position embeddings, with the rope scalings Llama-family checkpoints use.

Frequencies follow transformers' `modeling_rope_utils` exactly (float32 throughout) for the types
default, linear, dynamic (NTK), llama3, yarn (its attention factor scales cos/sin) and longrope (Phi-3:
per-frequency short and long factors, and an attention factor). cos/sin of a token depend only on its
absolute position, except for dynamic NTK and longrope, which transformers picks from the sequence length
(the largest position in the forward + 1): we use each sequence's length in this forward (its context_len),
which equals transformers for a whole prompt and for every decode step (a prompt prefilled in chunks across
longrope's original length gets the short factors for its first chunks, where transformers, prefilling it
whole, uses the long ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from spindle_kernels import KernelOps

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_ORIGINAL_LENGTH_TYPES = ("llama3", "yarn", "longrope")  # types that read original_max_position_embeddings


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, dynamic, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, yarn, longrope; 0 = max_position_embeddings
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn (0 = not given)
    mscale_all_dim: float = 0.0  # yarn (0 = not given)
    truncate: bool = True  # yarn
    attention_factor: float | None = None  # yarn, longrope: cos/sin scale; None = derived from the factor
    short_factor: tuple[float, ...] = ()  # longrope, one per frequency
    long_factor: tuple[float, ...] = ()  # longrope

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta} and {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope needs high_freq_factor > low_freq_factor")
        if self.rope_type == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise ValueError("longrope needs short_factor and long_factor lists of equal length")

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
        if rope_type == "su":  # Phi-3's early name for longrope, as transformers maps it
            rope_type = "longrope"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        original = params.get("original_max_position_embeddings", 0)
        if rope_type in _ORIGINAL_LENGTH_TYPES and "original_max_position_embeddings" in cfg:
            # transformers gives the top-level value priority over the one inside the rope parameters
            original = cfg["original_max_position_embeddings"]
        original = int(original or cfg.get("max_position_embeddings", 0) or 0)
        factor = params.get("factor")
        if factor is None and rope_type in ("yarn", "longrope") and original:
            factor = cfg.get("max_position_embeddings", original) / original  # transformers' implicit factor
        attention_factor = params.get("attention_factor")
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(factor if factor is not None else 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original if rope_type in _ORIGINAL_LENGTH_TYPES else 0,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=float(params.get("mscale") or 0.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            truncate=bool(params.get("truncate", True)),
            attention_factor=None if attention_factor is None else float(attention_factor),
            short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        )

    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_scaling`): 1 but for yarn and longrope."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.rope_type == "yarn":
            if self.mscale and self.mscale_all_dim:
                return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
            return _yarn_mscale(self.factor)
        if self.rope_type == "longrope" and self.factor > 1.0:
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        return 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, long: bool = False
) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies at the model's trained scale (longrope: `long` picks the
    long factors)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.rope_type == "longrope":
        if len(rope.short_factor) != head_dim // 2:
            raise ValueError(f"longrope factors have {len(rope.short_factor)} entries, head_dim / 2 is {head_dim // 2}")
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "yarn":
        return _yarn_inv_frequencies(rope, head_dim, inv_freq)
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


def _yarn_inv_frequencies(rope: RopeConfig, dim: int, extrapolation: torch.Tensor) -> torch.Tensor:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between (transformers)."""
    def correction_dim(num_rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    interpolation = extrapolation / rope.factor
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


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
        scale = rope.cos_sin_scale()
        positions = torch.arange(max_position_embeddings, dtype=torch.float32)[:, None]
        angles = positions * inv_frequencies(rope, head_dim, max_position_embeddings)[None, :]
        # [max_positions, d/2] float32 tables; not parameters, not in the checkpoint.
        self.register_buffer("cos_table", (angles.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin_table", (angles.sin() * scale).to(device), persistent=False)
        if rope.rope_type == "longrope":  # the tables for sequences past the original length
            angles = positions * inv_frequencies(rope, head_dim, max_position_embeddings, long=True)[None, :]
            self.register_buffer("long_cos_table", (angles.cos() * scale).to(device), persistent=False)
            self.register_buffer("long_sin_table", (angles.sin() * scale).to(device), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, d/2] float32 for each token."""
        if self.rope.rope_type == "dynamic":
            return self._dynamic_cos_sin(positions, cu_seqlens_q, context_lens)
        cos, sin = self.cos_table.index_select(0, positions), self.sin_table.index_select(0, positions)
        if self.rope.rope_type == "longrope":
            # a token whose sequence is longer than the original length takes the long factors
            q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
            seq_len = torch.repeat_interleave(context_lens.long(), q_lens, output_size=positions.shape[0])
            is_long = (seq_len > self.rope.original_max_position_embeddings)[:, None]
            cos = torch.where(is_long, self.long_cos_table.index_select(0, positions), cos)
            sin = torch.where(is_long, self.long_sin_table.index_select(0, positions), sin)
        return cos, sin

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
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """cos_sin: this forward's `self.cos_sin(...)` if the caller computed it once for every layer."""
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions, cu_seqlens_q, context_lens)
        self.ops.rotary_embedding(q, k, cos, sin)
