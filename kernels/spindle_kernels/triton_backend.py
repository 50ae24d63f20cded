"""The Triton implementation of every op, bundled as one `KernelOps` (importing this imports triton)."""

from __future__ import annotations

from spindle_kernels import KernelOps
from spindle_kernels.activation import silu_and_mul
from spindle_kernels.attention import paged_attention, paged_decode_attention
from spindle_kernels.kv_store import reshape_and_cache
from spindle_kernels.moe import fused_moe
from spindle_kernels.norm import rms_norm
from spindle_kernels.rotary import rotary_embedding

TRITON_OPS = KernelOps(
    name="triton",
    reshape_and_cache=reshape_and_cache,
    paged_attention=paged_attention,
    paged_decode_attention=paged_decode_attention,
    rms_norm=rms_norm,
    rotary_embedding=rotary_embedding,
    silu_and_mul=silu_and_mul,
    fused_moe=fused_moe,
)
