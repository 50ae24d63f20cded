"""Spindle's hot operations. Each kernel has a torch reference in `reference.py` with the same signature.

The shard picks one `KernelOps` at start-up with `ops_for(device)` and passes it to its layers, so hot
code never asks which platform it runs on.

Implementations, best first: flash-attn attention (CUDA, when `flash_attn` imports) over the Triton
ops; the Triton ops (CUDA, when `triton` imports); on CPU `cpu.py`'s attention, norm and rotary over
the reference (whose `fused_moe` groups tokens by expert); the torch reference (anywhere). Importing this
package imports neither triton nor flash_attn: they load on first use. The Triton functions are
also exported here by name (`spindle_kernels.paged_decode_attention`, ...), loaded on access.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from spindle_kernels import cpu, cpu_native, reference


@dataclasses.dataclass(frozen=True)
class KernelOps:
    name: str  # reported by the shard's Info as attention_impl: "flash_attn" | "triton" | "cpu" | "torch"
    reshape_and_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    paged_decode_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., None]
    silu_and_mul: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    # True: q/k/v may be strided [T, heads, d] views of the QKV projection's output (unit stride in d);
    # False: the layer hands them over contiguous.
    takes_strided_qkv: bool = False
    # True: a mixed step's single-token sequences attend through `paged_decode_attention` and its chunks
    # through `paged_attention`, two calls; False: `paged_attention` takes every row in one call (the CPU's
    # C++ kernel: one pass of its threads over decode rows and chunk rows alike, no concatenation).
    splits_decode_rows: bool = True


REFERENCE_OPS = KernelOps(
    name="torch",
    reshape_and_cache=reference.reshape_and_cache,
    paged_attention=reference.paged_attention,
    paged_decode_attention=reference.paged_decode_attention,
    rms_norm=reference.rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
    fused_moe=reference.fused_moe,
)

CPU_OPS = dataclasses.replace(
    REFERENCE_OPS,
    name="cpu",
    reshape_and_cache=cpu.reshape_and_cache,
    takes_strided_qkv=True,
    splits_decode_rows=False,
    paged_attention=cpu.paged_attention,
    paged_decode_attention=cpu.paged_decode_attention,
    rms_norm=cpu.rms_norm,
    rotary_embedding=cpu.rotary_embedding,
    silu_and_mul=cpu.silu_and_mul,
)


def argmax_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's greedy token and log-normalizer (`reference.argmax_logsumexp`), with the C++ op on CPU."""
    if scores.device.type == "cpu":
        return cpu.argmax_logsumexp(scores)
    return reference.argmax_logsumexp(scores)


def triton_ops() -> KernelOps:
    """The Triton ops (imports triton; on CPU they run only under TRITON_INTERPRET=1)."""
    from spindle_kernels.triton_backend import TRITON_OPS

    return TRITON_OPS


def flash_attn_ops(base: KernelOps) -> KernelOps:
    """`base` with attention served by flash-attn; calls flash-attn cannot serve fall back to `base`."""
    from spindle_kernels import flash

    return dataclasses.replace(
        base,
        name="flash_attn",
        paged_attention=functools.partial(flash.paged_attention, fallback=base.paged_attention),
        paged_decode_attention=functools.partial(
            flash.paged_decode_attention, fallback=base.paged_decode_attention
        ),
    )


def ops_for(
    device: torch.device | str, *, block_size: int | None = None, dtype: torch.dtype | None = None
) -> KernelOps:
    """The fastest available implementation for `device`.

    CPU (or any non-CUDA device): the CPU ops, with their C++ kernels built and loaded here (once per
    host; seconds) so no request waits for a compiler. CUDA: flash-attn attention over the Triton ops
    when `flash_attn` imports and every call can go to it: `block_size` (if given) a multiple of 256,
    which flash-attn's paged cache requires, and `dtype` (if given) float16 or bfloat16; else the
    Triton ops; else (no triton) the reference. A shard passes both, so the name it reports (Info's
    attention_impl) is what runs.
    """
    device = torch.device(device)
    if device.type != "cuda":
        cpu_native.load()
        return CPU_OPS
    try:
        base = triton_ops()
    except ImportError:
        base = REFERENCE_OPS
    if block_size is not None and block_size % 256 != 0:
        return base
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return base
    try:
        return flash_attn_ops(base)
    except ImportError:  # not installed, or built for another torch
        return base


_TRITON_EXPORTS = {
    "paged_attention": "spindle_kernels.attention",
    "paged_decode_attention": "spindle_kernels.attention",
    "reshape_and_cache": "spindle_kernels.kv_store",
    "rms_norm": "spindle_kernels.norm",
    "rotary_embedding": "spindle_kernels.rotary",
    "silu_and_mul": "spindle_kernels.activation",
    "fused_moe": "spindle_kernels.moe",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the Triton kernels load (and import triton) only when first asked for.
    if name in _TRITON_EXPORTS:
        return getattr(importlib.import_module(_TRITON_EXPORTS[name]), name)
    raise AttributeError(f"module 'spindle_kernels' has no attribute {name!r}")


__all__ = [
    "CPU_OPS",
    "KernelOps",
    "REFERENCE_OPS",
    "argmax_logsumexp",
    "flash_attn_ops",
    "ops_for",
    "reference",
    "triton_ops",
]  # the Triton names are left out so `import *` never imports triton
