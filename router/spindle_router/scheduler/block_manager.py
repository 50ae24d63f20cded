"""Block tables of requests: on-demand growth, prefix-cache reuse, release.

Joins the allocator (ids and refcounts) and the radix cache (which full prompt blocks are shared) for the
planner and the loop. A request's table covers exactly the positions computed so far plus this step's:

    blocks:  [ 7 ][ 3 ][ 12 ][ 40 ]          block_size 4, computed 13 + scheduled 1 = 14 positions
              cached    own   own (grown when the request crossed a block boundary)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from spindle_router.scheduler.block_allocator import BlockAllocator
from spindle_router.scheduler.radix_cache import PrefixNode, RadixCache
from spindle_router.scheduler.request import ScheduledRequest


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.cache = RadixCache(self.allocator, block_size) if prefix_caching else None

    @property
    def num_available_blocks(self) -> int:
        """Free now, or freeable by evicting unlocked prefix-cache blocks."""
        evictable = self.cache.num_evictable_blocks if self.cache else 0
        return self.allocator.num_free_blocks + evictable

    @property
    def num_cached_blocks(self) -> int:
        return self.cache.num_cached_blocks if self.cache else 0

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def attach_prefix(self, sr: ScheduledRequest) -> None:
        """Start `sr` on the longest cached prefix of its prompt (locked while it runs).

        At least one context token must be computed (the step that completes the context samples), so a
        prefix covering the whole context gives back its last block. Requests asking for prompt
        log-probs compute every prompt token themselves.
        """
        assert not sr.blocks and sr.prefix_node is None, "request already holds blocks"
        sr.cached_tokens = sr.computed_tokens = 0
        if self.cache is None or sr.request.prefill_logprobs:
            return
        match = self.cache.match(sr.request.input_ids)
        blocks, node = list(match.blocks), match.node
        if len(blocks) * self.block_size >= sr.context_len:
            blocks.pop()
            node = node.parent if node.parent is not None else node
        if not blocks:
            return
        self.cache.lock(node)
        self.allocator.incref(blocks)
        sr.prefix_node = node
        sr.blocks = blocks
        sr.shared_blocks = len(blocks)
        sr.cached_tokens = sr.computed_tokens = len(blocks) * self.block_size

    def waits_for_prefix(self, sr: ScheduledRequest, running: Iterable[ScheduledRequest]) -> bool:
        """True when a running request is still computing full blocks of `sr`'s prompt that the cache does
        not hold yet: admitted now, `sr` would compute them a second time. Blocks enter the cache as soon
        as they are computed (`cache_prompt` after every step), so `sr` starts once the blocks it shares
        are in, while the other request may still be prefilling the rest of its own prompt. A request
        that leaves (finished, cancelled, preempted) is no longer waited for: what it computed is cached,
        and `sr` computes the rest itself."""
        if self.cache is None or sr.request.prefill_logprobs:
            return False
        ids, bs = sr.request.input_ids, self.block_size
        usable = (sr.context_len - 1) // bs  # attach_prefix leaves at least one token to compute
        shared = 0
        for r in running:
            if r.shared_blocks >= r.prompt_len // bs:
                continue  # every full block of its prompt is cached already
            other = r.request.input_ids
            limit = min(usable, r.prompt_len // bs)
            n = 0
            while n < limit and ids[n * bs : (n + 1) * bs] == other[n * bs : (n + 1) * bs]:
                n += 1
            shared = max(shared, n)
        return shared > 0 and shared > len(self.cache.match(ids).blocks)

    def grow(self, sr: ScheduledRequest, num_tokens: int) -> list[int] | None:
        """Append blocks so `sr` covers `num_tokens` positions, evicting cached prefixes if need be.

        Returns the new blocks, or None (and changes nothing) when even eviction cannot make room.
        """
        need = self.blocks_for(num_tokens) - len(sr.blocks)
        if need <= 0:
            return []
        if need > self.num_available_blocks:
            return None
        short = need - self.allocator.num_free_blocks
        if short > 0:
            assert self.cache is not None
            self.cache.evict(short)
        new = self.allocator.allocate(need)
        sr.blocks.extend(new)
        return new

    def cache_prompt(self, sr: ScheduledRequest) -> None:
        """Share the full prompt blocks `sr` has computed so far (and keep them locked while it runs).

        Called after every step, so a block is shared as soon as its K/V are on the shards, not when the
        whole prompt is: a request waiting for that prefix starts earlier, and a request cancelled or
        preempted half-way through its prompt leaves what it computed to its waiters (and to itself when
        it resumes). Never a block still being computed: `computed_tokens` counts finished steps only.
        """
        if self.cache is None:
            return
        num_full = min(sr.computed_tokens, sr.prompt_len) // self.block_size
        if num_full <= sr.shared_blocks:
            return
        node = self.cache.insert(sr.request.input_ids, sr.blocks[:num_full])
        self.cache.lock(node)  # lock the new path before dropping the old lock: nothing becomes evictable
        if isinstance(sr.prefix_node, PrefixNode):
            self.cache.unlock(sr.prefix_node)
        sr.prefix_node = node
        sr.shared_blocks = num_full

    def release(self, sr: ScheduledRequest) -> None:
        """Drop every block reference and prefix lock `sr` holds (cached blocks stay in the cache)."""
        if isinstance(sr.prefix_node, PrefixNode) and self.cache is not None:
            self.cache.unlock(sr.prefix_node)
        self.allocator.decref(sr.blocks)
        sr.blocks = []
        sr.prefix_node = None
        sr.shared_blocks = 0

    def num_request_blocks(self, requests: Iterable[ScheduledRequest]) -> int:
        """Distinct blocks held by `requests` (shared prefix blocks counted once)."""
        return len({b for sr in requests for b in sr.blocks})

    def check_integrity(self, requests: Iterable[ScheduledRequest]) -> None:
        """Every block's refcount equals its holders (cache + request tables); see RadixCache.check_integrity."""
        requests = list(requests)
        if self.cache is not None:
            self.cache.check_integrity([sr.blocks for sr in requests])
            return
        self.allocator.check_integrity()
        holders: dict[int, int] = {}
        for sr in requests:
            assert len(set(sr.blocks)) == len(sr.blocks), "a block table lists a block twice"
            for b in sr.blocks:
                holders[b] = holders.get(b, 0) + 1
        for b in range(1, self.allocator.num_blocks):
            assert self.allocator.refcount(b) == holders.get(b, 0), f"block {b} refcount disagrees"
