"""Soak a running Spindle: saturating mixed traffic with random cancellations for --duration seconds, then
check that nothing was lost and nothing leaked.

    python bench/soak.py --url http://127.0.0.1:3000 --launcher-pid PID --duration 3600

Workers (--concurrency, all the time) loop over a mix of requests: TGI /generate and /generate_stream,
OpenAI chat and completions, streamed or not, some invalid on purpose; --cancel-fraction of the streams
are hung up by their client at a random point (before the first byte, or after a few events). Every
request must end one way or another: a complete answer, an error the client can read (a 4xx JSON body,
an error event, a 429), or its own hang-up. A request with no ending (a read timeout, a dropped
connection, a 5xx, a stream that stops without its final event) counts as lost.

At the end the server must be idle with every KV block back (spindle_kv_blocks_used 0), healthy, and the
resident memory of the router and of each shard (children of --launcher-pid, read from /proc) must be
flat after warm-up: the anonymous part of the sample at the end (RssAnon: what a leak grows; file pages come
and go with host memory pressure) at most --rss-tolerance-mib above the one taken after the first
--warmup-fraction of the run. The tolerance is absolute, so the longer the run, the smaller the leak it
catches: the summary gives the requests served after warm-up, the growth per 100 of them, and the smallest
leak (MiB per 100 requests) this run would have caught. The summary is one JSON object on the last line of
stdout; exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards hum softly near old stone walls and "
         "rivers carry leaves past quiet towns at dusk").split()
READ_TIMEOUT_S = 120.0  # one read of a live server never waits this long, even saturated on a busy CPU


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # outcome -> count
    lost: list[str] = field(default_factory=list)  # what each lost request was, for the report

    def note(self, outcome: str, what: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome.startswith("lost"):
            self.lost.append(f"{outcome}: {what}"[:300])


def _prompt(rng: random.Random) -> str:
    stem = " ".join(WORDS[: rng.choice((0, 4, 8))])  # shared stems: the prefix cache takes part
    return (stem + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))).strip()


def make_request(rng: random.Random) -> tuple[str, dict, bool, bool]:
    """(path, body, streams, valid)."""
    n = rng.randint(1, 24)
    kind = rng.choice(("generate", "generate_stream", "chat", "chat_stream", "completions", "invalid"))
    sampling = {"do_sample": True, "seed": rng.randint(0, 2**32), "temperature": 0.8} if rng.random() < 0.5 else {}
    if kind in ("generate", "generate_stream"):
        return (f"/{kind}", {"inputs": _prompt(rng), "parameters": {"max_new_tokens": n, **sampling}},
                kind == "generate_stream", True)
    if kind.startswith("chat"):
        body = {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": n,
                "stream": kind == "chat_stream", "temperature": 0 if not sampling else 0.8}
        return "/v1/chat/completions", body, kind == "chat_stream", True
    if kind == "completions":
        stream = rng.random() < 0.5
        return "/v1/completions", {"prompt": _prompt(rng), "max_tokens": n, "stream": stream}, stream, True
    bad = rng.choice(({"inputs": "x", "parameters": {"top_p": 1.0}}, {"inputs": 5}, {"parameters": {}},
                      {"inputs": "x", "parameters": {"max_new_tokens": 10**7}}))
    return "/generate_stream", bad, True, False


async def one_request(session: aiohttp.ClientSession, url: str, rng: random.Random, cancel_fraction: float,
                      tally: Tally) -> None:
    path, body, streams, valid = make_request(rng)
    hang_up_after = rng.choice((0, 1, 2, 5)) if streams and valid and rng.random() < cancel_fraction else None
    what = f"{path} {json.dumps(body)[:120]}"
    try:
        async with session.post(url + path, json=body) as resp:
            if hang_up_after == 0:
                resp.close()  # gone right after the headers
                tally.note("hung up")
                return
            if resp.status >= 500:
                tally.note("lost: 5xx", f"{resp.status} {what}")
                return
            if resp.status >= 400:
                payload = await resp.json()
                readable = "error" in payload and "error_type" in payload
                tally.note(("rejected (429)" if resp.status == 429 else "rejected (4xx)") if readable
                           else "lost: unreadable 4xx", what)
                if valid and resp.status != 429:
                    tally.note("lost: a valid request refused", f"{resp.status} {payload} {what}")
                return
            if not valid:
                tally.note("lost: an invalid request accepted", what)
                return
            if not streams:
                await resp.json()
                tally.note("answered")
                return
            events = 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    tally.note("answered")
                    return
                event = json.loads(payload)
                events += 1
                if "error" in event:
                    tally.note("error event")
                    return
                if path == "/generate_stream" and event.get("generated_text") is not None:
                    tally.note("answered")
                    return
                if hang_up_after is not None and events >= hang_up_after:
                    resp.close()
                    tally.note("hung up")
                    return
            tally.note("lost: stream ended without its final event", what)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        tally.note(f"lost: {type(e).__name__}", f"{e} {what}")


def memory_bytes(pid: int) -> dict[str, int]:
    """{"rss": resident bytes, "anon": the anonymous part of them} from /proc/PID/status. A leak grows the
    anonymous part; the rest is file pages (the libraries' code and data) that the kernel pages in on first use
    and reclaims under host memory pressure, so the whole RSS can move by tens of MiB with no leak at all."""
    fields = {"VmRSS": "rss", "RssAnon": "anon"}
    out = {"rss": 0, "anon": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) * 1024
    return out


def stack_processes(launcher_pid: int) -> dict[str, int]:
    """{"router": pid, "shard 0": pid, ...}: the launcher's children, by their command line."""
    found: dict[str, int] = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    shards = 0
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spindle_router.cli" in cmdline:
            found["router"] = pid
        elif b"spindle_server.cli" in cmdline:
            found[f"shard {shards}"] = pid
            shards += 1
    return found


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def soak(args: argparse.Namespace) -> dict:
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT_S)
    tally = Tally()
    procs = stack_processes(args.launcher_pid) if args.launcher_pid else {}
    rss: dict[str, dict[str, dict[str, int]]] = {}  # mark -> process -> {"rss": bytes, "anon": bytes}
    requests_at: dict[str, int] = {}  # requests ended by each RSS sample
    start = time.monotonic()
    stop_at = start + args.duration
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(k: int) -> None:
            rng = random.Random(args.seed * 1000 + k)
            while time.monotonic() < stop_at:
                await one_request(session, url, rng, args.cancel_fraction, tally)

        async def sample_rss() -> None:
            marks = {"start": 0.0, "warm": args.warmup_fraction, "middle": 0.5 + args.warmup_fraction / 2}
            marks.update({f"{int(100 * f)}%": f for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)})
            for name, fraction in sorted(marks.items(), key=lambda kv: kv[1]):
                await asyncio.sleep(max(0.0, start + fraction * args.duration - time.monotonic()))
                rss[name] = {p: memory_bytes(pid) for p, pid in procs.items()}
                requests_at[name] = sum(tally.outcomes.values())

        sampler = asyncio.ensure_future(sample_rss())
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        await sampler
        wall_s = time.monotonic() - start
        rss["end"] = {p: memory_bytes(pid) for p, pid in procs.items()}
        requests_at["end"] = sum(tally.outcomes.values())
        settle_until = time.monotonic() + 30
        m = await metrics(session, url)
        while (m["spindle_kv_blocks_used"] or m["tgi_queue_size"] or m["tgi_batch_current_size"]) \
                and time.monotonic() < settle_until:
            await asyncio.sleep(0.2)
            m = await metrics(session, url)
        async with session.get(url + "/health") as resp:
            healthy = resp.status == 200
    total = sum(tally.outcomes.values())
    lost = sum(v for k, v in tally.outcomes.items() if k.startswith("lost"))
    growth_mib = {p: (rss["end"][p]["anon"] - rss["warm"][p]["anon"]) / 2**20 for p in procs}
    after_warmup = requests_at["end"] - requests_at["warm"]
    checks = {
        "nothing lost": lost == 0,
        "kv blocks back to 0": m["spindle_kv_blocks_used"] == 0,
        "idle (no queue, no batch)": m["tgi_queue_size"] == 0 and m["tgi_batch_current_size"] == 0,
        "healthy": healthy,
        **{f"anonymous rss flat after warm-up: {p}": g <= args.rss_tolerance_mib for p, g in growth_mib.items()},
    }
    return {
        "duration_s": round(wall_s, 1),
        "requests": total,
        "requests_per_s": round(total / wall_s, 2),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "lost_examples": tally.lost[:10],
        "kv_blocks_used_end": m["spindle_kv_blocks_used"],
        "kv_blocks_total": m.get("spindle_kv_blocks_total"),
        "rss_mib": {mark: {p: round(v["rss"] / 2**20, 1) for p, v in by.items()} for mark, by in rss.items()},
        "anon_rss_mib": {mark: {p: round(v["anon"] / 2**20, 1) for p, v in by.items()} for mark, by in rss.items()},
        "requests_at_rss_sample": requests_at,
        "requests_after_warmup": after_warmup,
        "anon_rss_growth_after_warmup_mib": {p: round(g, 1) for p, g in growth_mib.items()},
        "anon_rss_mib_per_100_requests_after_warmup": {p: round(100 * g / max(1, after_warmup), 3)
                                                  for p, g in growth_mib.items()},
        # a leak of at least this many MiB per 100 requests would have failed the flatness check
        "smallest_leak_caught_mib_per_100_requests": round(100 * args.rss_tolerance_mib / max(1, after_warmup), 3),
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the router, e.g. http://127.0.0.1:3000")
    p.add_argument("--launcher-pid", type=int, help="the launcher's pid: its router and shards' RSS is sampled")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (hours elsewhere)")
    p.add_argument("--concurrency", type=int, default=24, help="requests in flight at all times")
    p.add_argument("--cancel-fraction", type=float, default=0.25, help="share of streams hung up early")
    p.add_argument("--warmup-fraction", type=float, default=0.25,
                   help="share of the run before the RSS baseline is taken")
    p.add_argument("--rss-tolerance-mib", type=float, default=8.0,
                   help="largest anonymous RSS growth (MiB) of each process from the warm-up sample to the end; what is "
                        "left after warm-up is allocator noise of a few MiB (oneDNN's per-shape primitives are "
                        "bounded by the shard's row bucketing, layers/linear.py)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = asyncio.run(soak(args))
    for name, ok in summary["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
