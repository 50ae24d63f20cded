"""The paged KV cache: per layer, one K and one V tensor of [num_blocks, block_size, kv_heads_per_rank, head_dim].

A token at position p of a request lives in slot `block_table[p // block_size] * block_size + p % block_size`,
i.e. row `p % block_size` of block `block_table[p // block_size]` in every layer. The router owns block ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spindle_server.distributed import Distributed

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_KV_CACHE_BYTES_CAP = 4 << 30  # the CPU default is min(25% of RAM, 4 GiB)


@dataclass(frozen=True)
class KVCacheShape:
    """Everything but the block count: what one block costs on this rank."""

    num_layers: int
    block_size: int
    kv_heads_per_rank: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if min(self.num_layers, self.block_size, self.kv_heads_per_rank, self.head_dim) < 1:
            raise ValueError(f"every KV cache dimension must be positive: {self}")

    @property
    def bytes_per_block(self) -> int:
        """K and V, every layer."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.kv_heads_per_rank * self.head_dim * element


class KVCache:
    """The K/V tensors of every layer, allocated once (zeros) for `num_blocks` blocks."""

    def __init__(self, shape: KVCacheShape, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.shape = shape
        self.num_blocks = num_blocks
        dims = (num_blocks, shape.block_size, shape.kv_heads_per_rank, shape.head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(dims, dtype=shape.dtype, device=device),
                torch.zeros(dims, dtype=shape.dtype, device=device),
            )
            for _ in range(shape.num_layers)
        ]

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.shape.bytes_per_block


def default_cpu_kv_cache_bytes() -> int:
    """min(25% of physical RAM, 4 GiB): leaves the host room for weights, activations and other processes."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 30
    return min(ram // 4, DEFAULT_CPU_KV_CACHE_BYTES_CAP)


def cache_budget_bytes(
    device: torch.device, kv_cache_bytes: int | None, cuda_memory_fraction: float, reserved_bytes: int = 0
) -> int:
    """Bytes this rank may give the KV cache, measured after the model is resident (activations freed).

    CUDA: what is still free once (1 - fraction) of the device is held back and `reserved_bytes` (the
    activations of the largest forward and the decode graphs' pool, which come back once the cache exists)
    are set aside, so the fraction bounds the process's total use; at most `kv_cache_bytes` when given.
    CPU: `kv_cache_bytes`, or the default.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = max(0, int(free - total * (1.0 - cuda_memory_fraction)) - reserved_bytes)
        return budget if kv_cache_bytes is None else min(budget, kv_cache_bytes)
    return kv_cache_bytes if kv_cache_bytes is not None else default_cpu_kv_cache_bytes()


def activation_reserve_bytes(prefill_peak_bytes: int, prefill_tokens: int, max_graph_batch: int) -> int:
    """What to hold back from the KV cache for activations: the warmup prefill's measured peak (the largest
    forward the router may send), plus the decode graphs' memory pool, estimated as the same activations
    scaled to the largest graph's tokens (one each; the graphs of all sizes share one pool)."""
    if prefill_peak_bytes <= 0:
        return 0
    graph_pool = prefill_peak_bytes * min(1.0, max_graph_batch / max(prefill_tokens, 1))
    return int(prefill_peak_bytes + graph_pool)


def agree_num_blocks(local_num_blocks: int, dist: Distributed, device: torch.device) -> int:
    """The minimum over ranks, so every rank (and the router) uses the same block ids."""
    return dist.agree([local_num_blocks], "min", device)[0]
