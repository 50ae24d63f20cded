"""bench/bench_gpu.py: its decode step is checked on CPU (Triton interpreter vs torch reference ops), and
without CUDA it exits with a message instead of a traceback. The GPU numbers come from running it on one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from spindle_kernels import REFERENCE_OPS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_exits_with_a_message_without_cuda(capsys):
    assert _bench().main(["--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.triton_interpreter
def test_decode_step_on_triton_ops_matches_reference_ops():
    import spindle_kernels

    bench = _bench()
    shape = bench.LlamaShape(
        hidden=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=96, vocab=97
    )
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    batch = bench.make_batch(3, context_len=9, block_size=4, vocab=shape.vocab, device=cpu)
    models = [
        bench.RandomLlamaDecoder(shape, ops, cpu, torch.float32, num_blocks=9, block_size=4)
        for ops in (spindle_kernels.triton_ops(), REFERENCE_OPS)
    ]
    got, want = (m.step(batch) for m in models)
    assert got.shape == (3, shape.vocab)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k_got, k_want in zip(models[0].k_caches, models[1].k_caches, strict=True):
        torch.testing.assert_close(k_got, k_want)  # the new token's K landed in the same slots
    assert models[0].kv_bytes_read(batch) == 2 * 2 * 27 * 2 * 16 * 4
