"""Clients that hang up mid-stream: 100 concurrent /generate_stream requests on a 2-shard stack, every third
one closed by its client after its first tokens.

What must hold: the streams nobody closed are unaffected (every token, equal to transformers' greedy
continuation, and a final event with generated_text); each hang-up is counted once as a dropped request;
and the scheduler gives back every KV block, so /metrics settles at spindle_kv_blocks_used 0 (also when
the hang-up empties the batch, so no later step would update the gauges).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.tiny_model import _CORPUS_WORDS

NUM_REQUESTS = 100
MAX_NEW_TOKENS = 48
TOKENS_BEFORE_HANGUP = 2
SETTLE_TIMEOUT_S = 10.0


def candidate_prompts(n: int) -> list[str]:
    """`n` distinct prompts of 3 to 12 words from the tokenizer's corpus."""
    words = _CORPUS_WORDS
    return [" ".join(words[(7 * k + 3 * j) % len(words)] for j in range(3 + k % 10)) for k in range(n)]


def pick_prompts(greedy, want: int) -> dict[str, list[int]]:
    """`want` prompts whose greedy continuation runs the full MAX_NEW_TOKENS (no early EOS: a stream must
    still be running when its client hangs up), with that continuation."""
    chosen = {}
    for prompt in candidate_prompts(3 * want):
        expected = greedy.continuation(greedy.encode(prompt), MAX_NEW_TOKENS)
        if len(expected) == MAX_NEW_TOKENS:
            chosen[prompt] = expected
        if len(chosen) == want:
            return chosen
    raise AssertionError(f"only {len(chosen)} of {3 * want} prompts run {MAX_NEW_TOKENS} tokens without EOS")


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, hang_up: bool,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """The events of one /generate_stream; with `hang_up`, close the connection after the first tokens."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    events: list[dict] = []
    async with session.post(f"{url}/generate_stream", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data:"):
                events.append(json.loads(line[len(b"data:"):]))
                if hang_up and len(events) == TOKENS_BEFORE_HANGUP:
                    resp.close()  # drops the connection: the server sees the client go
                    break
    return events


async def run_all(url: str, prompts: list[str]) -> list[list[dict]]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        return await asyncio.gather(*(
            stream(session, url, prompts[i % len(prompts)], hang_up=i % 3 == 0) for i in range(NUM_REQUESTS)
        ))


@pytest.fixture(scope="module")
def stack(start_launcher, tiny_model_dir: Path) -> Iterator:
    with start_launcher(tiny_model_dir, num_shard=2, args=["--max-concurrent-requests", "128"]) as s:
        yield s


def settled(metrics_of, url: str) -> dict[str, float]:
    """/metrics once no request holds a KV block, or after SETTLE_TIMEOUT_S (polled every 0.1 s): the
    scheduler learns of a hang-up at the stream's next write."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    samples = metrics_of(url)
    while samples["spindle_kv_blocks_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        samples = metrics_of(url)
    return samples


def test_a_lone_hang_up_frees_its_blocks(stack, greedy, metrics_of):
    prompt = candidate_prompts(1)[0]
    before = metrics_of(stack.base_url)

    async def hang_up() -> list[dict]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return await stream(session, stack.base_url, prompt, hang_up=True, max_new_tokens=1000)

    assert len(asyncio.run(hang_up())) == TOKENS_BEFORE_HANGUP
    after = settled(metrics_of, stack.base_url)
    # Nothing else runs: the cancellation itself must bring the gauges back, not some later step.
    assert after["spindle_kv_blocks_used"] == 0, after
    assert after["tgi_batch_current_size"] == 0 and after["tgi_queue_size"] == 0
    assert after['tgi_request_failure{err="dropped"}'] - before.get('tgi_request_failure{err="dropped"}', 0.0) == 1
    # ... and the next request runs on a clean batch.
    events = asyncio.run(run_one(stack.base_url, prompt))
    assert [e["token"]["id"] for e in events] == greedy.continuation(greedy.encode(prompt), MAX_NEW_TOKENS)


async def run_one(url: str, prompt: str) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await stream(session, url, prompt, hang_up=False)


def test_hung_up_streams_are_dropped_and_free_their_blocks(stack, greedy, metrics_of):
    references = pick_prompts(greedy, 10)
    prompts = list(references)
    hung_up = [i for i in range(NUM_REQUESTS) if i % 3 == 0]
    before = metrics_of(stack.base_url)
    results = asyncio.run(run_all(stack.base_url, prompts))

    for i, events in enumerate(results):
        expected = references[prompts[i % len(prompts)]]
        if i in hung_up:
            assert len(events) == TOKENS_BEFORE_HANGUP, i
            assert [e["token"]["id"] for e in events] == expected[:TOKENS_BEFORE_HANGUP], i
            continue
        assert all("error" not in e for e in events), (i, events[-1])
        assert [e["token"]["id"] for e in events] == expected, i
        assert all(e["generated_text"] is None for e in events[:-1]), i
        final = events[-1]
        assert final["generated_text"] == greedy.text(expected), i
        assert final["details"]["generated_tokens"] == MAX_NEW_TOKENS, i
        assert final["details"]["finish_reason"] == "length", i

    after = settled(metrics_of, stack.base_url)
    assert after["spindle_kv_blocks_used"] == 0, after
    assert after["spindle_kv_blocks_total"] > 0
    assert after["tgi_batch_current_size"] == 0 and after["tgi_queue_size"] == 0

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('tgi_request_failure{err="dropped"}') == len(hung_up)
    assert delta("tgi_request_success") == NUM_REQUESTS - len(hung_up)
    assert delta("tgi_request_count") == NUM_REQUESTS
    assert stack.proc.poll() is None and stack.health_status() == 200
