"""An async load generator for streaming text-generation servers.

Sends prompts over TGI's `/generate_stream` or OpenAI's `/v1/completions` (stream: true), at a fixed
concurrency, and records for every request when each token event arrived. Summaries are computed
from those timestamps only, so the same code measures Spindle and the naive baseline.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestResult:
    prompt_tokens: int
    sent_at: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token event
    error: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.sent_at

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class LoadResult:
    wall_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None and r.token_times]

    @property
    def output_tokens(self) -> int:
        return sum(len(r.token_times) for r in self.ok)

    @property
    def processed_tokens(self) -> int:
        return self.output_tokens + sum(r.prompt_tokens for r in self.ok)

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error is not None]

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok], q)

    def itl(self, q: float) -> float:
        return percentile([x for r in self.ok for x in r.itls_s], q)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def stream_one(
    session: aiohttp.ClientSession,
    base_url: str,
    prompt: str,
    prompt_tokens: int,
    max_new_tokens: int,
    api: str = "tgi",
    result: RequestResult | None = None,
) -> RequestResult:
    """Stream one request; every `data:` event that carries a token counts as one token.

    Pass `result` to watch its token_times grow while the request streams.
    """
    if api == "tgi":
        url = f"{base_url}/generate_stream"
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": False}}
    else:
        url = f"{base_url}/v1/completions"
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True}
    if result is None:
        result = RequestResult(prompt_tokens=prompt_tokens, sent_at=time.perf_counter())
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = str(event["error"])
                    break
                if api == "tgi" or event.get("choices"):
                    result.token_times.append(time.perf_counter())
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(
    base_url: str,
    prompts: Sequence[tuple[str, int]],
    max_new_tokens: int,
    concurrency: int,
    api: str = "tgi",
) -> LoadResult:
    """Send every (prompt, prompt_tokens) with at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(item: tuple[str, int]) -> RequestResult:
            async with semaphore:
                return await stream_one(session, base_url, item[0], item[1], max_new_tokens, api)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return LoadResult(wall_s=time.perf_counter() - start, results=list(results))


async def wait_healthy(base_url: str, timeout_s: float, process=None) -> None:
    """Poll GET /health until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before becoming healthy")
            try:
                async with session.get(f"{base_url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base_url} not healthy after {timeout_s}s")
