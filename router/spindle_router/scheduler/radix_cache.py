"""The prefix cache: a radix tree over prompt token ids at block granularity.

Each node below the root stands for one full KV block: its key is the `block_size` token ids the block
holds, its path from the root is the prefix those ids continue. A block's K/V depend only on the tokens
before and in it, so any request whose prompt starts with a node's path can read the node's block.

    root ─ [1 5 9 2] blk 7 ─ [4 4 8 0] blk 3          prompt 1 5 9 2 4 4 8 0 6 ... matches blocks (7, 3)
                      └──── [4 6 1 1] blk 12

References: the tree holds one allocator reference per node. A request that reads cached blocks takes its
own references (its block table) and locks the deepest node it uses; `lock_ref` of a node counts the locks
at or below it, so an unlocked node has no locked descendant and no request reading its block: evicting
it frees the block. Eviction takes unlocked leaves, least recently used first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from spindle_router.scheduler.block_allocator import RESERVED_BLOCK, BlockAllocator


@dataclass(eq=False)
class PrefixNode:
    """One cached block (the root holds none). Opaque to callers: pass it back to lock / unlock."""

    key: tuple[int, ...]
    block: int | None
    parent: PrefixNode | None
    children: dict[tuple[int, ...], PrefixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class MatchResult:
    """The longest block-aligned cached prefix of a token sequence."""

    blocks: tuple[int, ...]  # KV blocks holding the prefix, in position order
    num_tokens: int  # len(blocks) * block_size
    node: PrefixNode  # the deepest node matched (the root when nothing matched): lock it while in use


class RadixCache:
    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.root = PrefixNode(key=(), block=None, parent=None)
        self._by_block: dict[int, PrefixNode] = {}
        self._num_locked = 0  # nodes (not the root) with lock_ref > 0
        self._clock = itertools.count(1)

    # ---- queries --------------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_block)

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks that `evict` could free now (unlocked nodes; their subtrees are unlocked too)."""
        return len(self._by_block) - self._num_locked

    def match(self, token_ids: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `token_ids` in whole blocks; marks the path recently used."""
        node, blocks = self.root, []
        now = next(self._clock)
        for key in self._keys(token_ids):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            node.last_access = now
            blocks.append(child.block)
        return MatchResult(blocks=tuple(blocks), num_tokens=len(blocks) * self.block_size, node=node)

    # ---- updates --------------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> PrefixNode:
        """Cache `blocks`, holding `token_ids[: len(blocks) * block_size]`; returns the deepest node.

        Where a node for the same tokens exists already (another request computed that prefix too),
        the tree keeps its own block and the caller's stays the caller's. New nodes take an allocator
        reference on their block. The caller should lock the returned node while it reads those blocks.
        """
        if len(token_ids) < len(blocks) * self.block_size:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) * self.block_size} token ids, got {len(token_ids)}")
        keys = list(self._keys(token_ids))[: len(blocks)]
        node, now = self.root, next(self._clock)
        # Check first, so a bad call changes nothing.
        probe = self.root
        for key, block in zip(keys, blocks):
            child = probe.children.get(key) if probe is not None else None
            if child is None:
                if block == RESERVED_BLOCK or self.allocator.refcount(block) < 1:
                    raise ValueError(f"block {block} is not allocated")
                if block in self._by_block:
                    raise ValueError(f"block {block} is cached already under another prefix")
            probe = child
        for key, block in zip(keys, blocks):
            child = node.children.get(key)
            if child is None:
                child = PrefixNode(key=key, block=block, parent=node)
                node.children[key] = child
                self._by_block[block] = child
                self.allocator.incref([block])
            child.last_access = now
            node = child
        return node

    def lock(self, node: PrefixNode) -> None:
        """Protect `node` and its ancestors from eviction."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._num_locked += 1
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: PrefixNode) -> None:
        path = []
        n = node
        while n.parent is not None:
            if n.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            path.append(n)
            n = n.parent
        if n is not self.root:
            raise ValueError("node is not in this cache")
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_locked -= 1

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` blocks, least recently used unlocked leaves first; returns how many."""
        heap = [(n.last_access, id(n), n) for n in self._by_block.values() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            del self._by_block[node.block]
            freed += len(self.allocator.decref([node.block]))
            if not parent.is_root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _keys(self, token_ids: Sequence[int]) -> Iterable[tuple[int, ...]]:
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            yield tuple(token_ids[i * bs : (i + 1) * bs])

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self, request_tables: Iterable[Sequence[int]] | None = None) -> None:
        """Raise AssertionError when the tree (and, given the block tables of every live request, the
        whole block accounting) is inconsistent: free + cached + in use == total, each block's refcount
        equals its holders, no negative lock count, no block owned twice."""
        self.allocator.check_integrity()
        seen: dict[int, PrefixNode] = {}
        num_locked = 0
        stack = list(self.root.children.values())
        assert self.root.lock_ref == 0 and self.root.block is None
        while stack:
            n = stack.pop()
            assert n.block is not None and n.block != RESERVED_BLOCK, "node without a block"
            assert len(n.key) == self.block_size, "key is not one block"
            assert n.block not in seen, f"block {n.block} held by two nodes"
            seen[n.block] = n
            assert n.lock_ref >= 0, "negative lock count"
            assert n.lock_ref >= sum(c.lock_ref for c in n.children.values()), "child locked, parent not"
            assert self.allocator.refcount(n.block) >= 1, f"cached block {n.block} is free"
            num_locked += n.lock_ref > 0
            for key, c in n.children.items():
                assert c.parent is n and c.key == key, "broken parent link"
            stack.extend(n.children.values())
        assert seen.keys() == self._by_block.keys() and all(seen[b] is self._by_block[b] for b in seen)
        assert num_locked == self._num_locked, "lock counter drifted"
        if request_tables is None:
            return
        tables = [list(t) for t in request_tables]
        holders: dict[int, int] = dict.fromkeys(seen, 1)
        for table in tables:
            assert len(set(table)) == len(table), "a block table lists a block twice"
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        for b in range(1, self.allocator.num_blocks):
            assert self.allocator.refcount(b) == holders.get(b, 0), (
                f"block {b}: refcount {self.allocator.refcount(b)}, holders {holders.get(b, 0)}"
            )
        # Every cached block a request reads is locked, so eviction can never free it under the request.
        for table in tables:
            for b in table:
                if b in seen:
                    assert seen[b].lock_ref > 0, f"block {b} is read by a request but evictable"
