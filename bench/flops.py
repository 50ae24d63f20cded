"""The machine's matmul peak over shapes like the model's own: the denominator of MFU."""

from __future__ import annotations

import time

import torch


def model_matmul_shapes(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, vocab: int):
    """(K, N) of every weight a forward multiplies by: fused qkv, o, gate_up, down, lm head."""
    head_dim = hidden // num_heads
    qkv = hidden + 2 * num_kv_heads * head_dim
    return [(hidden, qkv), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden), (hidden, vocab)]


def matmul_peak_flops(shapes, rows=(32, 256, 1024), dtype=torch.float32, min_time_s: float = 0.3) -> float:
    """Best FLOP/s of x[M, K] @ w[K, N] over the given (K, N) shapes and row counts M."""
    best = 0.0
    for k, n in shapes:
        w = torch.randn(k, n, dtype=dtype)
        for m in rows:
            x = torch.randn(m, k, dtype=dtype)
            for _ in range(2):
                x @ w
            reps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < min_time_s:
                x @ w
                reps += 1
            best = max(best, 2.0 * m * k * n * reps / elapsed)
    return best


if __name__ == "__main__":
    from bench_model import SMOLLM2_135M as c

    shapes = model_matmul_shapes(
        c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    )
    print(f"threads={torch.get_num_threads()} peak={matmul_peak_flops(shapes) / 1e9:.1f} GFLOP/s")
