"""RadixCache: block-granular prefix matching, locking, LRU eviction; randomized with integrity checks."""

from __future__ import annotations

import random

import pytest
from spindle_router.scheduler.block_allocator import BlockAllocator
from spindle_router.scheduler.radix_cache import RadixCache

BS = 4


def fresh(num_blocks: int = 32) -> tuple[BlockAllocator, RadixCache]:
    alloc = BlockAllocator(num_blocks)
    return alloc, RadixCache(alloc, BS)


def compute(alloc: BlockAllocator, cache: RadixCache, prompt: list[int]) -> list[int]:
    """A request computes `prompt` into fresh blocks, caches its full blocks and goes away."""
    blocks = alloc.allocate(-(-len(prompt) // BS))
    cache.insert(prompt, blocks[: len(prompt) // BS])
    alloc.decref(blocks)
    cache.check_integrity([])
    return blocks


def test_match_is_longest_block_aligned_prefix() -> None:
    alloc, cache = fresh()
    prompt = list(range(10))  # two full blocks + 2 tokens
    blocks = compute(alloc, cache, prompt)
    assert cache.num_cached_blocks == 2
    assert alloc.refcount(blocks[2]) == 0  # the partial block is not cached
    m = cache.match(list(range(8)) + [99, 98])
    assert m.blocks == tuple(blocks[:2]) and m.num_tokens == 8
    m = cache.match([0, 1, 2, 3, 4, 5, 6, 99])
    assert m.blocks == (blocks[0],) and m.num_tokens == 4
    m = cache.match([0, 1, 2])  # less than one block
    assert m.blocks == () and m.num_tokens == 0 and m.node is cache.root
    m = cache.match([7, 1, 2, 3])
    assert m.num_tokens == 0


def test_concurrent_duplicate_keeps_the_trees_block() -> None:
    alloc, cache = fresh()
    a = alloc.allocate(2)
    b = alloc.allocate(2)
    prompt = list(range(8))
    na = cache.insert(prompt, a)
    nb = cache.insert(prompt, b)
    assert na is nb and cache.match(prompt).blocks == tuple(a)
    cache.lock(na)
    cache.lock(nb)
    assert [alloc.refcount(x) for x in a] == [2, 2] and [alloc.refcount(x) for x in b] == [1, 1]
    cache.check_integrity([a, b])
    cache.unlock(na)
    cache.unlock(nb)
    alloc.decref(a)
    assert alloc.decref(b) == b  # the duplicates were the request's alone
    cache.check_integrity([])


def test_bad_insert_changes_nothing() -> None:
    alloc, cache = fresh()
    a = alloc.allocate(2)
    cache.lock(cache.insert(list(range(4)), a[:1]))
    with pytest.raises(ValueError):
        cache.insert([9, 9, 9, 9, 8, 8, 8, 8], [a[1], a[0]])  # a[0] is cached under another prefix
    with pytest.raises(ValueError):
        cache.insert([5] * 8, [a[1], 30])  # 30 is free
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], [a[1]])  # not enough tokens for a block
    assert cache.num_cached_blocks == 1
    cache.check_integrity([a])


def test_lock_protects_and_eviction_is_lru_leaves_first() -> None:
    alloc, cache = fresh(8)
    old = compute(alloc, cache, [1] * 8)  # path of 2 blocks
    new = compute(alloc, cache, [2] * 4)
    cache.match([2] * 4)  # touch
    cache.match([1] * 4)  # touches only the first block of the old path
    # LRU leaf is the old path's second block, then (now a leaf, touched at time t) ... compare times
    assert cache.evict(1) == 1
    assert cache.match([1] * 8).num_tokens == 4  # its leaf went first
    held = cache.match([2] * 4)
    cache.lock(held.node)
    alloc.incref(held.blocks)
    assert cache.num_evictable_blocks == 1
    assert cache.evict(10) == 1  # only the unlocked one
    assert cache.match([2] * 4).blocks == (new[0],)
    assert cache.match([1] * 4).num_tokens == 0
    cache.check_integrity([list(held.blocks)])
    cache.unlock(held.node)
    with pytest.raises(ValueError):
        cache.unlock(held.node)
    alloc.decref(held.blocks)
    assert cache.evict(10) == 1 and cache.num_cached_blocks == 0
    assert alloc.num_free_blocks == alloc.num_usable_blocks
    cache.check_integrity([])
    del old


@pytest.mark.parametrize("seed", range(8))
def test_randomized_requests_share_lock_and_evict(seed: int) -> None:
    """Requests with colliding prompts match, take refs, compute the rest, insert, finish; eviction
    under pressure. After every operation the whole accounting must hold (holders == refcounts)."""
    rng = random.Random(seed)
    alloc, cache = fresh(rng.randint(6, 24))
    live: list[tuple[list[int], object]] = []  # (block table, locked node)
    stems = [[rng.randint(0, 2) for _ in range(12)] for _ in range(3)]

    def tables() -> list[list[int]]:
        return [t for t, _ in live]

    for _ in range(300):
        if rng.random() < 0.55:
            prompt = rng.choice(stems)[: rng.randint(1, 12)] + [rng.randint(0, 2) for _ in range(rng.randint(0, 6))]
            m = cache.match(prompt)
            assert m.num_tokens == len(m.blocks) * BS <= len(prompt)
            assert all(alloc.refcount(b) >= 1 for b in m.blocks)
            cache.lock(m.node)
            alloc.incref(m.blocks)
            table = list(m.blocks)
            need = -(-len(prompt) // BS) - len(table)
            short = need - alloc.num_free_blocks
            if short > 0:
                cache.evict(short)
            cache.check_integrity(tables() + [table])
            if alloc.can_allocate(need):
                table += alloc.allocate(need)
                node = cache.insert(prompt, table[: len(prompt) // BS])
                cache.lock(node)
                cache.unlock(m.node)
                live.append((table, node))
                assert cache.match(prompt).num_tokens == len(prompt) // BS * BS
            else:
                cache.unlock(m.node)
                alloc.decref(table)
        elif live:
            table, node = live.pop(rng.randrange(len(live)))
            cache.unlock(node)
            alloc.decref(table)
        else:
            cache.evict(rng.randint(1, 3))
        cache.check_integrity(tables())
        request_blocks = {b for t in tables() for b in t}
        assert alloc.num_free_blocks + len(request_blocks | set(cache._by_block)) == alloc.num_usable_blocks
    for table, node in live:
        cache.unlock(node)
        alloc.decref(table)
    cache.evict(alloc.num_blocks)
    cache.check_integrity([])
    assert alloc.num_free_blocks == alloc.num_usable_blocks
