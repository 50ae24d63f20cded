"""KV cache layout and sizing arithmetic."""

from __future__ import annotations

import pytest
import torch
from spindle_server.distributed import Distributed
from spindle_server.kv_cache import (
    KVCache,
    KVCacheShape,
    activation_reserve_bytes,
    agree_num_blocks,
    cache_budget_bytes,
    default_cpu_kv_cache_bytes,
)

CPU = torch.device("cpu")


def test_layout_and_bytes():
    shape = KVCacheShape(num_layers=3, block_size=16, kv_heads_per_rank=2, head_dim=8, dtype=torch.float32)
    assert shape.bytes_per_block == 2 * 3 * 16 * 2 * 8 * 4
    cache = KVCache(shape, num_blocks=5, device=CPU)
    assert len(cache.layers) == 3
    for k, v in cache.layers:
        assert k.shape == v.shape == (5, 16, 2, 8) and k.dtype == torch.float32
        assert k.data_ptr() != v.data_ptr()
    assert cache.num_bytes == sum(k.nbytes + v.nbytes for k, v in cache.layers)


def test_budget_and_agreement_on_cpu():
    assert cache_budget_bytes(CPU, 12345, 0.9) == 12345
    assert 0 < cache_budget_bytes(CPU, None, 0.9) == default_cpu_kv_cache_bytes() <= 4 << 30
    assert agree_num_blocks(17, Distributed(rank=0, world_size=1, group=None), CPU) == 17


def test_rejects_nonsense():
    with pytest.raises(ValueError):
        KVCacheShape(num_layers=0, block_size=16, kv_heads_per_rank=2, head_dim=8, dtype=torch.float32)
    shape = KVCacheShape(num_layers=1, block_size=16, kv_heads_per_rank=1, head_dim=8, dtype=torch.float32)
    with pytest.raises(ValueError):
        KVCache(shape, num_blocks=0, device=CPU)


def test_cuda_budget_is_what_the_fraction_leaves_capped_by_kv_cache_bytes(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 100 * gib))  # 40 GiB in use
    cuda = torch.device("cuda", 0)
    assert cache_budget_bytes(cuda, None, 0.9) == 50 * gib  # 90 GiB for the process, 40 taken
    assert cache_budget_bytes(cuda, 2 * gib, 0.9) == 2 * gib  # the cap
    assert cache_budget_bytes(cuda, 80 * gib, 0.9) == 50 * gib  # a cap above what is free changes nothing
    assert cache_budget_bytes(cuda, None, 0.3) == 0  # the process already holds more than 30%
    # activations of the largest forward and the graph pool come back after the cache is sized: held back
    assert cache_budget_bytes(cuda, None, 0.9, reserved_bytes=3 * gib) == 47 * gib
    assert cache_budget_bytes(cuda, None, 0.9, reserved_bytes=60 * gib) == 0


def test_activation_reserve_is_the_prefill_peak_plus_a_graph_pool_estimate():
    mib = 1 << 20
    assert activation_reserve_bytes(800 * mib, 8192, 256) == 825 * mib  # graphs: 256 of 8192 tokens' worth
    assert activation_reserve_bytes(800 * mib, 8192, 0) == 800 * mib  # no graphs
    assert activation_reserve_bytes(800 * mib, 100, 256) == 1600 * mib  # at most the prefill's own peak again
    assert activation_reserve_bytes(0, 8192, 256) == 0  # CPU: nothing measured
