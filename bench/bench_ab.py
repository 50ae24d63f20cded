"""Serving throughput of two or three variants of Spindle, alternating in one run, and where a step's time goes.

A variant is a checkout (its packages go first on PYTHONPATH; default: this one) plus launcher flags. Each
round starts each variant's launcher in turn (the order alternates between rounds, so drift on a shared
machine hits both), runs workload (a) of bench_serving.py (256-token prompts, 128 output tokens) at one
concurrency, scrapes /metrics, and stops it. Absolute numbers on a shared machine are noise: read the
ratios to A.

    .venv/bin/python bench/bench_ab.py --a-path ../main             # main vs this checkout
    .venv/bin/python bench/bench_ab.py --b-arg=--some-flag --rounds 3  # a flag off vs on
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bench_model
from bench_serving import Server, free_port, prompts, spindle_argv
from loadgen import run_load, wait_healthy

PACKAGES = ("proto", "kernels", "server", "router")


@dataclass
class Variant:
    name: str
    path: Path | None  # a checkout whose packages shadow the installed ones; None: the installed ones
    args: list[str]
    runs: list[dict[str, float]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.path is not None:
            extra = [str(self.path / p) for p in PACKAGES]
            env["PYTHONPATH"] = os.pathsep.join(extra + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env


def scrape(text: str) -> dict[str, float]:
    """Sums and counts of the step histograms, by name and label value."""
    out: dict[str, float] = {}
    pattern = re.compile(r'^(tgi_batch_\w+_duration|spindle_step_phase_duration)_(sum|count)\{(\w+)="(\w+)"\} (\S+)$')
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            name, kind, _, label, value = m.groups()
            key = f"{name.removesuffix('_duration').removeprefix('tgi_batch_').removeprefix('spindle_step_')}" \
                  f"[{label}].{kind}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


def mean_ms(metrics: dict[str, float], family: str) -> dict[str, float]:
    """Mean ms per observation of each label of a histogram family."""
    labels = {k.split("[")[1].split("]")[0] for k in metrics if k.startswith(family + "[")}
    return {
        label: 1e3 * metrics[f"{family}[{label}].sum"] / metrics[f"{family}[{label}].count"]
        for label in sorted(labels) if metrics.get(f"{family}[{label}].count")
    }


async def one_run(url: str, concurrency: int, requests: int) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as r:
            before = scrape(await r.text())
    load = await run_load(url, prompts(requests, 256, seed=1000 * concurrency), max_new_tokens=128,
                          concurrency=concurrency)
    if load.errors:
        raise RuntimeError(f"{len(load.errors)} requests failed: {load.errors[:3]}")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as r:
            after = scrape(await r.text())
    result = {"tok_s": load.output_tokens / load.wall_s, "itl_p50_ms": load.itl(50) * 1e3,
              "itl_p99_ms": load.itl(99) * 1e3, "ttft_p50_s": load.ttft(50)}
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    for family in ("forward", "decode", "inference", "phase"):
        for label, ms in mean_ms(delta, family).items():
            result[f"{family}[{label}]_ms"] = ms
    steps = sum(v for k, v in delta.items() if k.startswith("inference[") and k.endswith(".count"))
    result["steps"] = steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-path", type=Path, default=None, help="checkout of variant A (default: this one)")
    parser.add_argument("--b-path", type=Path, default=None, help="checkout of variant B (default: this one)")
    parser.add_argument("--a-arg", action="append", default=[], help="launcher flag of A (repeatable)")
    parser.add_argument("--b-arg", action="append", default=[], help="launcher flag of B (repeatable)")
    parser.add_argument("--c-path", type=Path, default=None, help="checkout of an optional variant C")
    parser.add_argument("--c-arg", action="append", default=[], help="launcher flag of C (repeatable; gives a C)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a 4-layer model, for a quick check of the script")
    args = parser.parse_args()

    overrides = {"num_hidden_layers": 4} if args.small else {}
    model_dir = bench_model.build(
        bench_model.DEFAULT_DIR.with_name("small-random") if args.small else bench_model.DEFAULT_DIR, **overrides
    )
    variants = [Variant("A", args.a_path, args.a_arg), Variant("B", args.b_path, args.b_arg)]
    if args.c_path is not None or args.c_arg:
        variants.append(Variant("C", args.c_path, args.c_arg))
    for v in variants:
        print(f"{v.name}: {v.path or 'this checkout'} {' '.join(v.args)}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="spindle-ab-"))
    launcher_args = argparse.Namespace(max_batch_prefill_tokens=None, spindle_arg=[])
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            port = free_port()
            launcher_args.spindle_arg = v.args
            argv = spindle_argv(model_dir, port, str(logs / f"shard-{v.name}{r}"), launcher_args)
            server = Server(argv, logs / f"{v.name}{r}.log", env=v.env())
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(wait_healthy(url, 900, server.proc))
                asyncio.run(run_load(url, prompts(2, 32, seed=3), 8, concurrency=2))  # warm the path
                result = asyncio.run(one_run(url, args.concurrency, args.requests))
            finally:
                server.stop()
            v.runs.append(result)
            print(f"round {r} {v.name}: " + ", ".join(f"{k}={x:.1f}" for k, x in result.items()), flush=True)

    a = variants[0]
    print(f"\nconcurrency {args.concurrency}, {args.requests} requests, {args.rounds} rounds (medians; ratios to A)")
    keys = list(dict.fromkeys(k for v in variants for run in v.runs for k in run))
    for k in keys:
        meds = {v.name: statistics.median(run[k] for run in v.runs) if all(k in run for run in v.runs)
                else float("nan") for v in variants}
        cells = "  ".join(f"{n} {m:9.2f}" for n, m in meds.items())
        ratios = "  ".join(f"{n}/A {meds[n] / meds[a.name]:6.3f}" for n in meds if n != a.name)
        print(f"  {k:<24} {cells}   {ratios}")
    print(f"\nserver logs: {logs}")


if __name__ == "__main__":
    main()
