"""KV block ids and their reference counts. Nothing else: who holds a block is the caller's business.

Block 0 is reserved (the shards may use it for padding / health checks) and is never handed out, so the
usable ids are 1 .. num_blocks-1. A block is free exactly when its refcount is 0. Holders are the prefix
cache (one reference per tree node) and requests (one reference per entry of their block table).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

RESERVED_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """`allocate` was asked for more blocks than are free (callers check `can_allocate` first)."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        # FIFO reuse: a freed block goes to the back, so recently freed (maybe still cached elsewhere) last.
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def can_allocate(self, num: int) -> bool:
        return 0 <= num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        """`num` fresh blocks, each with refcount 1."""
        if num < 0:
            raise ValueError(f"cannot allocate {num} blocks")
        if num > len(self._free):
            raise OutOfBlocksError(f"asked for {num} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num)]
        for b in blocks:
            self._refcounts[b] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        """Another holder of already-allocated blocks (a request sharing prefix-cache blocks)."""
        blocks = list(blocks)
        for b in blocks:
            self._check_held(b)
        for b in blocks:
            self._refcounts[b] += 1

    def decref(self, blocks: Iterable[int]) -> list[int]:
        """Drop one reference to each block; returns the blocks that became free."""
        blocks = list(blocks)
        pending: dict[int, int] = {}
        for b in blocks:  # validate the whole call first: a bad call changes nothing
            self._check_held(b)
            pending[b] = pending.get(b, 0) + 1
            if pending[b] > self._refcounts[b]:
                raise ValueError(f"block {b} released more times than it is held ({self._refcounts[b]})")
        freed = []
        for b in blocks:
            self._refcounts[b] -= 1
            if self._refcounts[b] == 0:
                self._free.append(b)
                freed.append(b)
        return freed

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refcounts[block]

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range [0, {self.num_blocks})")

    def _check_held(self, block: int) -> None:
        self._check_id(block)
        if block == RESERVED_BLOCK:
            raise ValueError("block 0 is reserved")
        if self._refcounts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")

    def check_integrity(self) -> None:
        """Raise AssertionError unless: free list = exactly the usable blocks with refcount 0, no duplicates."""
        free = list(self._free)
        assert len(set(free)) == len(free), "a block is on the free list twice"
        assert RESERVED_BLOCK not in free, "block 0 is on the free list"
        assert self._refcounts[RESERVED_BLOCK] == 0, "block 0 was handed out"
        assert all(r >= 0 for r in self._refcounts), "negative refcount"
        zero = {b for b in range(1, self.num_blocks) if self._refcounts[b] == 0}
        assert zero == set(free), f"free list {sorted(set(free) ^ zero)} disagrees with refcounts"
        assert self.num_free_blocks + self.num_used_blocks == self.num_usable_blocks
