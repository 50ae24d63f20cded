"""BlockAllocator: ids and refcounts, block 0 never handed out, randomized with an integrity check per op."""

from __future__ import annotations

import random

import pytest
from spindle_router.scheduler.block_allocator import BlockAllocator, OutOfBlocksError


def test_block_zero_is_reserved_and_everything_else_is_handed_out_once() -> None:
    alloc = BlockAllocator(9)
    blocks = alloc.allocate(8)
    assert sorted(blocks) == list(range(1, 9))
    assert alloc.num_free_blocks == 0 and not alloc.can_allocate(1)
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(1)
    alloc.check_integrity()


def test_bad_calls_change_nothing() -> None:
    alloc = BlockAllocator(5)
    a = alloc.allocate(2)
    with pytest.raises(ValueError):
        alloc.decref([a[0], 4])  # 4 is free: the whole call is refused
    assert alloc.refcount(a[0]) == 1
    with pytest.raises(ValueError):
        alloc.decref([a[0], a[0]])  # released twice, held once
    assert alloc.refcount(a[0]) == 1
    with pytest.raises(ValueError):
        alloc.incref([0])
    with pytest.raises(ValueError):
        alloc.incref([99])
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError):
        BlockAllocator(1)
    alloc.check_integrity()
    assert alloc.num_free_blocks == 2


def test_shared_block_is_freed_by_its_last_holder() -> None:
    alloc = BlockAllocator(4)
    (b,) = alloc.allocate(1)
    alloc.incref([b])
    assert alloc.decref([b]) == []
    assert alloc.refcount(b) == 1
    assert alloc.decref([b]) == [b]
    alloc.check_integrity()


@pytest.mark.parametrize("seed", range(5))
def test_randomized_against_a_model(seed: int) -> None:
    rng = random.Random(seed)
    alloc = BlockAllocator(rng.randint(2, 40))
    held: list[int] = []  # one entry per reference
    for _ in range(500):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 6)
            if alloc.can_allocate(n):
                new = alloc.allocate(n)
                assert not set(new) & set(held) and 0 not in new
                held.extend(new)
            else:
                with pytest.raises(OutOfBlocksError):
                    alloc.allocate(n)
        elif op < 0.6 and held:
            b = rng.choice(held)
            alloc.incref([b])
            held.append(b)
        elif held:
            b = held.pop(rng.randrange(len(held)))
            freed = alloc.decref([b])
            assert freed == ([] if b in held else [b])
        alloc.check_integrity()
        for b in set(held):
            assert alloc.refcount(b) == held.count(b)
        assert alloc.num_used_blocks == len(set(held))
