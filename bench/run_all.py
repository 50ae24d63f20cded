"""`make bench`: every CPU benchmark in one run, each printing its own table.

  1. bench_shard.py   - decode step time and MFU at batch 1/8/32 (in-process engine, no HTTP)
  2. bench_serving.py - Spindle over HTTP vs the naive transformers server: workloads (a), (b), (c)

Extra arguments go to bench_serving.py (e.g. `--small` for a quick check of the scripts).
GPU: bench_gpu.py, run on its own (`make bench-gpu`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> int:
    print(f"\n=== {script} {' '.join(args)}".rstrip(), flush=True)
    start = time.monotonic()
    code = subprocess.call([sys.executable, str(HERE / script), *args])
    print(f"=== {script}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
    return code


def main() -> int:
    serving_args = sys.argv[1:]
    shard_args = ["--layers", "4", "--steps", "5"] if "--small" in serving_args else []
    codes = [run("bench_shard.py", *shard_args), run("bench_serving.py", *serving_args)]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
