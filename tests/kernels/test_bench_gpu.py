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


def test_cache_copies_exceed_twice_the_l2():
    bench = _bench()
    l2 = 60 << 20  # an H200's
    for kv_bytes in (1 << 20, 2 << 20, 50 << 20, 119 << 20, 600 << 20):
        copies = bench.num_copies(kv_bytes, l2)
        # every call reads a copy the previous 2 x L2 bytes of reads have pushed out
        assert (copies - 1) * kv_bytes >= 2 * l2 or copies == 1 and kv_bytes > 2 * l2
    assert bench.num_copies(600 << 20, l2) == 2 and bench.num_copies(2 << 20, l2) == 61


def test_rotated_tables_use_disjoint_blocks():
    bench = _bench()
    tables = bench.rotated_tables(batch=3, context_len=20, block_size=8, copies=4, device=torch.device("cpu"))
    assert [t.shape for t in tables] == [(3, 3)] * 4 and all(t.dtype == torch.int32 for t in tables)
    for c, t in enumerate(tables):  # copy c owns blocks 9c .. 9c + 8, each once
        assert sorted(t.flatten().tolist()) == list(range(9 * c, 9 * c + 9))
