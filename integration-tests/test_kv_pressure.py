"""A KV cache far too small for the load: 50 concurrent greedy requests on a shard that holds a few dozen
blocks, so the scheduler must preempt running requests (and recompute them later) and evict prefix-cache
blocks to make room, while half the prompts share a prefix that the prefix cache can serve.

What must hold: every answer is exactly transformers' greedy continuation of its prompt (preemption and
prefix reuse change when a token is computed, never which); preemption really happened
(spindle_preemptions > 0) and the prefix cache really served tokens; afterwards no request holds a block.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import aiohttp

from tests.helpers.tiny_model import _CORPUS_WORDS

BLOCK_SIZE = 16  # the shard's default --block-size (the launcher passes none)
NUM_BLOCKS = 24  # KV blocks the shard holds (block 0 is reserved: 23 usable, 368 tokens)
NUM_REQUESTS = 50


def kv_bytes_per_block(model_dir: Path) -> int:
    """K and V of every layer for one block of float32 tokens, on a single shard (the shard's own formula)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * BLOCK_SIZE


def workload() -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) pairs: 3 to 40 words, every other one after a shared 24-word prefix."""
    words = _CORPUS_WORDS
    shared = " ".join(words[(5 * j) % len(words)] for j in range(24))
    out = []
    for k in range(NUM_REQUESTS):
        own = " ".join(words[(11 * k + 3 * j) % len(words)] for j in range(3 + (7 * k) % 17))
        prompt = f"{shared} {own}" if k % 2 == 0 else own
        out.append((prompt, 16 + (5 * k) % 17))
    return out


async def generate_all(url: str, work: list[tuple[str, int]]) -> list[list[int]]:
    async def one(session: aiohttp.ClientSession, prompt: str, n: int) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}
        async with session.post(f"{url}/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return [t["id"] for t in (await resp.json())["details"]["tokens"]]

    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        return await asyncio.gather(*(one(session, p, n) for p, n in work))


def test_preemption_and_prefix_eviction_keep_greedy_exact(start_launcher, tiny_model_dir: Path, greedy,
                                                          metrics_of):
    work = workload()
    prompt_ids = [greedy.encode(p) for p, _ in work]
    worst = max(math.ceil((len(ids) + n) / BLOCK_SIZE) for ids, (_, n) in zip(prompt_ids, work))
    demand = sum(math.ceil((len(ids) + n) / BLOCK_SIZE) for ids, (_, n) in zip(prompt_ids, work))
    # Any one request fits the cache alone; all of them together need several times what it holds.
    assert worst <= NUM_BLOCKS - 1 and demand > 4 * NUM_BLOCKS, (worst, demand)
    # The full prompt blocks the prefix cache takes in, shared prefixes counted once: more than the cache
    # can ever hold, so it has to evict to take them all.
    cacheable = {tuple(ids[: BLOCK_SIZE * (b + 1)]) for ids in prompt_ids for b in range(len(ids) // BLOCK_SIZE)}
    assert len(cacheable) > NUM_BLOCKS, len(cacheable)
    expected = [greedy.continuation(ids, n) for ids, (_, n) in zip(prompt_ids, work)]

    args = ["--kv-cache-bytes", str(NUM_BLOCKS * kv_bytes_per_block(tiny_model_dir)),
            "--max-batch-prefill-tokens", "256", "--max-concurrent-requests", "128"]
    with start_launcher(tiny_model_dir, num_shard=1, args=args) as stack:
        before = metrics_of(stack.base_url)
        assert before["spindle_kv_blocks_total"] == NUM_BLOCKS  # the byte budget gave the cache we planned

        answers = asyncio.run(generate_all(stack.base_url, work))

        for k, (got, want) in enumerate(zip(answers, expected)):
            assert got == want, (k, work[k])
        after = metrics_of(stack.base_url)
        assert after["spindle_preemptions"] - before.get("spindle_preemptions", 0.0) > 0
        assert after["spindle_prefix_cache_hit_tokens"] - before.get("spindle_prefix_cache_hit_tokens", 0.0) > 0
        assert after["spindle_prefix_cache_blocks"] <= NUM_BLOCKS - 1
        # Every /generate answered, so every request has ended: the gauge must already read 0.
        assert after["spindle_kv_blocks_used"] == 0
        assert after["tgi_batch_current_size"] == 0 and after["tgi_queue_size"] == 0
        assert after["tgi_request_success"] - before.get("tgi_request_success", 0.0) == NUM_REQUESTS
