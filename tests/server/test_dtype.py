"""`--dtype auto`: bfloat16 on CPUs that multiply it natively, float32 on others, half precision on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spindle_server.dtype import cpu_flags, resolve_dtype

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def _model_dir(tmp_path: Path, torch_dtype: str | None) -> Path:
    config = {"model_type": "llama"} | ({"torch_dtype": torch_dtype} if torch_dtype else {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
    ({"avx2", "fma"}, "float32"),  # Zen 1: bfloat16 would be emulated, ~6x slower
    (set(), "float32"),
])
def test_auto_on_cpu_follows_native_bf16(tmp_path, flags, expected):
    name, why = resolve_dtype("auto", CPU, _model_dir(tmp_path, "bfloat16"), flags)
    assert name == expected
    assert why


@pytest.mark.parametrize(("checkpoint", "expected"), [
    ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float16"), (None, "float16"),
])
def test_auto_on_cuda_follows_the_checkpoint(tmp_path, checkpoint, expected):
    assert resolve_dtype("auto", CUDA, _model_dir(tmp_path, checkpoint), set())[0] == expected


def test_an_explicit_dtype_wins(tmp_path):
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(name, CPU, _model_dir(tmp_path, "bfloat16"), {"avx512_bf16"}) == (name, "asked for")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_shard_picks_its_kernels_knowing_block_size_and_dtype(tmp_path, monkeypatch):
    # flash-attn serves only 256k-token blocks in half precision: ops_for must know both, or Info would name
    # flash_attn while every call fell back to Triton (issue 15 point 2).
    import spindle_kernels
    from spindle_server import cli

    from tests.helpers.tiny_model import TinyModelSpec, make_tiny_model

    seen = {}

    class Stop(Exception):
        pass

    def recording_ops_for(device, **kwargs):
        seen.update(kwargs, device=device)
        raise Stop

    monkeypatch.setattr(spindle_kernels, "ops_for", recording_ops_for)
    model_dir = make_tiny_model(tmp_path / "m", TinyModelSpec())
    args = cli.ServeArgs(model_dir=model_dir, uds_path=str(tmp_path / "s"), dtype="float32", device="cpu",
                         kv_cache_bytes=None, cuda_memory_fraction=0.9, block_size=32, otlp_endpoint=None)
    with pytest.raises(Stop):
        cli.build_engine(args, CPU)
    assert seen == {"device": CPU, "block_size": 32, "dtype": torch.float32}
