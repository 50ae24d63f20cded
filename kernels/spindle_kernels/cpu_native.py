"""The C++ CPU kernels (csrc/), compiled for this host on first use and loaded as torch ops.

`load()` builds `csrc/cpu_kernels.cpp` with the system C++ compiler against the installed torch
(`-march=native`: the build is keyed by the source, the torch version and the CPU's flags, so a cache
carried to another CPU builds again rather than running instructions that CPU lacks). The shared
object lands in `$SPINDLE_KERNEL_CACHE` (default `~/.cache/spindle/kernels`), written to a temporary
name and renamed, so ranks starting together never load a half-written file. When no compiler is
found or the build fails, `load()` returns False with the reason logged once; callers keep the torch
path (same results, slower). `SPINDLE_CPU_KERNELS=torch` chooses the torch path on purpose (benchmarks
compare the two in one run).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# -mprefer-vector-width=512: GCC's Intel tunings vectorize plain loops (silu, rms_norm) with 256-bit ymm even
# where zmm exists; at 512 bits silu_and_mul over 512 x 1536 bf16 takes 345 instead of 495 us on Sapphire
# Rapids. The attention kernels use explicit 64-byte vectors either way; without AVX-512 it changes nothing.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("SPINDLE_KERNEL_CACHE", Path.home() / ".cache" / "spindle" / "kernels"))


def _compile(out: Path) -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=spindle_cpu"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        result = subprocess.run(cmd + [str(partial), *libs], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, out)


@functools.cache
def load() -> bool:
    """Builds (if needed) and loads the C++ CPU ops; False, with the reason logged, if they cannot load."""
    if os.environ.get("SPINDLE_CPU_KERNELS", "native") == "torch":
        logger.info("SPINDLE_CPU_KERNELS=torch: the C++ CPU kernels are off")
        return False
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(FLAGS).encode())
    key.update(torch.__version__.encode())
    key.update(sys.version.encode())
    key.update(_cpu_flags().encode())
    path = _cache_dir() / f"spindle_cpu_{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            logger.info("compiling the C++ CPU kernels for this CPU into %s (once)", path)
            _compile(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        logger.warning("C++ CPU kernels unavailable, using the torch path (slower): %s", exc)
        return False
    return True
