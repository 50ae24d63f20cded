"""`--dtype auto`: the dtype a shard computes in when none is asked for.

CUDA: the checkpoint's own (`torch_dtype` in config.json; float16 when it says float32 or nothing, as
tensor cores want half precision). CPU: bfloat16 where the CPU multiplies bfloat16 natively
(AVX512-BF16 or AMX: 2.5x float32's matmul rate on Zen 4), float32 elsewhere (Zen 1 / AVX2 runs
bfloat16 about 6x slower than float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def checkpoint_dtype(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("torch_dtype") or config.get("dtype")
    return name if name in DTYPES else None


def resolve_dtype(name: str, device: torch.device, model_dir: Path, flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for `--dtype name` on `device`; `name` is a DTYPES key or "auto"."""
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        found = checkpoint_dtype(model_dir)
        if found in ("bfloat16", "float16"):
            return found, "the checkpoint's"
        return "float16", f"the checkpoint says {found or 'nothing'}; half precision on CUDA"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU multiplies bfloat16 natively ({native[0]})"
    return "float32", "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"
