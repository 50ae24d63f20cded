"""Spindle against naive serving, in one run, on a SmolLM2-135M-shaped random Llama (float32, CPU).

Workloads (issue 4):
  (a) 256-token prompts, 128 output tokens, concurrency 1, 8, 32
  (b) a shared 1500-token prefix with distinct 32-token suffixes: TTFT cold vs prefix cached
  (c) a 2000-token prompt arriving while 16 streams decode: their ITL, and its TTFT vs alone (the streams go
      on for STEADY_TOKENS tokens after its first)
The naive baseline (bench/naive_server.py: transformers generate, one request at a time) runs (a).
MFU = tokens processed x 2 x parameters / wall time / best matmul rate measured here (bench/flops.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_model  # noqa: E402
from flops import matmul_peak_flops, model_matmul_shapes  # noqa: E402
from loadgen import LoadResult, RequestResult, median, percentile, run_load, stream_one, wait_healthy  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group, stopped (group-wide) on exit."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def prompts(n: int, num_tokens: int, seed: int) -> list[tuple[str, int]]:
    return [(bench_model.prompt(num_tokens, seed + i), num_tokens + 1) for i in range(n)]


def row(name: str, r: LoadResult, params: int, peak: float, baseline_tps: float | None = None) -> str:
    tps = r.output_tokens / r.wall_s
    mfu = r.processed_tokens * 2 * params / r.wall_s / peak
    ratio = f"{tps / baseline_tps:6.2f}x" if baseline_tps else "      -"
    return (
        f"{name:<28} {len(r.ok):>4} {tps:>9.1f} {r.ttft(50):>8.2f} {r.ttft(99):>8.2f} "
        f"{r.itl(50) * 1e3:>8.0f} {r.itl(99) * 1e3:>8.0f} {mfu:>6.2f} {ratio}"
        + (f"  errors={len(r.errors)}" if r.errors else "")
    )


HEADER = (
    f"{'workload':<28} {'reqs':>4} {'out tok/s':>9} {'TTFT p50':>8} {'TTFT p99':>8} "
    f"{'ITL p50':>8} {'ITL p99':>8} {'MFU':>6} {'vs naive':>7}\n"
    f"{'':<28} {'':>4} {'':>9} {'(s)':>8} {'(s)':>8} {'(ms)':>8} {'(ms)':>8}"
)


async def workload_a(url: str, concurrencies: list[int], requests_per_level: int | None) -> dict[int, LoadResult]:
    out = {}
    for c in concurrencies:
        n = requests_per_level or max(c, 2)
        out[c] = await run_load(url, prompts(n, 256, seed=1000 * c), max_new_tokens=128, concurrency=c)
    return out


async def workload_b(url: str, samples: int = 3) -> tuple[list[float], list[float]]:
    """TTFT of a 1500+32-token prompt whose prefix is new (cold) vs already cached (warm)."""
    import aiohttp

    cold, warm = [], []
    async with aiohttp.ClientSession() as session:
        for s in range(samples):
            prefix = bench_model.prompt(1500, seed=50_000 + s)
            for k in range(3):
                text = prefix + " " + bench_model.prompt(32, seed=60_000 + 10 * s + k)
                r = await stream_one(session, url, text, 1533, max_new_tokens=4)
                if r.error:
                    raise RuntimeError(r.error)
                (cold if k == 0 else warm).append(r.ttft_s)
    return cold, warm


# Workload (c): the streams decode until each has this many tokens after the long prompt's first token (then the
# client closes them), so the steady window is the same length whichever server and however long its prefill.
STEADY_TOKENS = 48


async def workload_c(url: str, api: str = "tgi") -> dict[str, float]:
    """16 decoding streams, then a 2000-token prompt: the streams' ITL before/during, its TTFT vs alone."""
    import aiohttp

    long_prompt = bench_model.prompt(2000, seed=70_000)
    async with aiohttp.ClientSession() as session:
        alone = await stream_one(session, url, long_prompt, 2001, max_new_tokens=4, api=api)
        live = [RequestResult(prompt_tokens=n, sent_at=time.perf_counter()) for _, n in prompts(16, 64, seed=80_000)]
        streams = [
            asyncio.create_task(stream_one(session, url, p, n, max_new_tokens=1024, api=api, result=r))
            for (p, n), r in zip(prompts(16, 64, seed=80_000), live)
        ]
        # The long prompt arrives once every stream is decoding steadily.
        while not all(len(r.token_times) >= 16 or r.error for r in live):
            await asyncio.sleep(0.05)
        arrival = time.perf_counter()
        long_run = await stream_one(session, url, bench_model.prompt(2000, seed=70_001), 2001, max_new_tokens=4,
                                    api=api)
        first_token = long_run.token_times[0] if long_run.token_times else arrival
        # A stream that ended (EOS, error) counts with what it has.
        while not all(sum(t > first_token for t in r.token_times) >= STEADY_TOKENS or task.done()
                      for r, task in zip(live, streams)):
            await asyncio.sleep(0.05)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    steady, during = [], []
    for r in live:
        # Before the arrival the streams are still being admitted (not steady decoding): steady is after
        # the long prompt's first token, when all 16 stream on.
        for a, b in zip(r.token_times, r.token_times[1:]):
            if arrival <= b and a <= first_token:
                during.append(b - a)
            elif a > first_token:
                steady.append(b - a)
    return {
        "steady_itl_p50": percentile(steady, 50),
        "steady_itl_p99": percentile(steady, 99),
        "during_itl_p99": percentile(during, 99),
        "during_itl_max": max(during) if during else float("nan"),
        "long_ttft": long_run.ttft_s,
        "long_ttft_alone": alone.ttft_s,
    }


def spindle_argv(model_dir: Path, port: int, uds: str, args) -> list[str]:
    argv = [
        str(VENV_BIN / "spindle-launcher"),
        "--model-id", str(model_dir),
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--shard-uds-path", uds,
        "--max-concurrent-requests", "256",
        "--dtype", "float32",  # the naive baseline's dtype (bench_peer.py measures the default, auto)
    ]
    if args.max_batch_prefill_tokens is not None:
        argv += ["--max-batch-prefill-tokens", str(args.max_batch_prefill_tokens)]
    return argv + args.spindle_arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default: max(c, 2))")
    parser.add_argument("--naive-requests", type=int, default=3)
    # Default: the launcher's own (what users get); the stall-free budget keeps streams at pace in (c).
    parser.add_argument("--max-batch-prefill-tokens", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "naive"])
    parser.add_argument("--spindle-arg", action="append", default=[], help="extra launcher flag (repeatable)")
    parser.add_argument("--small", action="store_true", help="a 4-layer model, for a quick check of the script")
    args = parser.parse_args()

    overrides = {"num_hidden_layers": 4} if args.small else {}
    model_dir = bench_model.build(
        bench_model.DEFAULT_DIR.with_name("small-random") if args.small else bench_model.DEFAULT_DIR, **overrides
    )
    cfg = {**bench_model.SMOLLM2_135M, **overrides}
    params = bench_model.num_parameters(cfg)
    peak = matmul_peak_flops(
        model_matmul_shapes(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                            cfg["num_key_value_heads"], cfg["vocab_size"])
    )
    print(f"model: {params / 1e6:.1f}M parameters, float32, CPU; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(best over the model's shapes, {os.cpu_count()} cores)", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="spindle-bench-"))
    lines = [HEADER]

    baseline_tps = None
    if "naive" not in args.skip:
        port = free_port()
        naive = Server([sys.executable, str(HERE / "naive_server.py"), str(model_dir), "--port", str(port)],
                       logs / "naive.log")
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(wait_healthy(url, 300, naive.proc))
            r = asyncio.run(run_load(url, prompts(args.naive_requests, 256, seed=7), 128, concurrency=args.naive_requests))
            baseline_tps = r.output_tokens / r.wall_s
            lines.append(row(f"naive (a) c={args.naive_requests}", r, params, peak))
        finally:
            naive.stop()

    port = free_port()
    spindle = Server(spindle_argv(model_dir, port, str(logs / "shard"), args), logs / "spindle.log")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_healthy(url, 600, spindle.proc))
        asyncio.run(run_load(url, prompts(2, 32, seed=3), 8, concurrency=2))  # warm the path
        if "a" not in args.skip:
            for c, r in asyncio.run(workload_a(url, args.concurrency, args.requests)).items():
                lines.append(row(f"spindle (a) c={c}", r, params, peak, baseline_tps))
        print("\n".join(lines), flush=True)
        if "b" not in args.skip:
            cold, warm = asyncio.run(workload_b(url))
            print(f"\n(b) shared 1500-token prefix: TTFT cold {median(cold):.3f} s, cached {median(warm):.3f} s, "
                  f"speed-up {median(cold) / median(warm):.1f}x", flush=True)
        if "c" not in args.skip:
            c = asyncio.run(workload_c(url))
            print(
                f"\n(c) 2000-token prompt into 16 decoding streams: stream ITL p99 steady {c['steady_itl_p99'] * 1e3:.0f} ms, "
                f"during the long prefill {c['during_itl_p99'] * 1e3:.0f} ms ({c['during_itl_p99'] / c['steady_itl_p99']:.2f}x; "
                f"max {c['during_itl_max'] * 1e3:.0f} ms); long prompt TTFT {c['long_ttft']:.2f} s vs "
                f"{c['long_ttft_alone']:.2f} s alone ({c['long_ttft'] / c['long_ttft_alone']:.2f}x)",
                flush=True,
            )
    finally:
        spindle.stop()
        print(f"\nserver logs: {logs}")


if __name__ == "__main__":
    main()
