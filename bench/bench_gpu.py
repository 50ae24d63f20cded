"""GPU decode throughput of Spindle's kernels on a random 1B-class Llama (bf16), with its yardsticks.

    python bench/bench_gpu.py [--batches 1,2,4,...,256] [--context-len 1024] [--json out.json]

Measured in one run, on one GPU:
  copy      the device's copy bandwidth: torch copy of a large tensor (bytes read + written per second);
            every bandwidth below is given as a fraction of it and of the spec sheet's (--spec-gbps,
            4800 GB/s for an H200).
  attention one layer's paged decode attention (ops_for(cuda)), KV bytes read per second; beside it
            torch SDPA over a dense (unpaged) cache of the same size, as a comparison point.
  step      a full decode step (embedding, every layer, lm head) built from the KernelOps and torch
            matmuls, eager and replayed as a CUDA graph; tokens/s and (weights + KV) bytes per second.

How it times (so that neither launch overhead nor the L2 cache flatters the kernels): attention is a
CUDA graph of N calls, timed as one replay / N, over enough copies of the KV cache (distinct blocks of
one pool, by block table) that the copies together exceed twice the L2 (an H200's is 60 MB), each call
reading the next copy; a step reads 2.5 GB of weights, far beyond the L2, and is timed as N calls
(or N graph replays) issued back to back between two events.
  hf        transformers `generate` of the same random model (if transformers is installed): decode
            tokens/s from the difference of a 1-token and an N-token generate (prefill excluded).

Needs only torch + triton (transformers optional); exits with a message when CUDA is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from spindle_kernels import REFERENCE_OPS, KernelOps, ops_for


@dataclass(frozen=True)
class LlamaShape:
    """Llama-3.2-1B's shape (tied embeddings); the weights are random."""

    hidden: int = 2048
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 8192
    vocab: int = 128256
    rope_theta: float = 500000.0
    eps: float = 1e-5


@dataclass(frozen=True)
class PagedBatch:
    """One decode step's inputs: every sequence has `context_len` tokens, the newest being decoded."""

    token_ids: torch.Tensor  # [batch] int64
    positions: torch.Tensor  # [batch] int64, = context_len - 1
    block_tables: torch.Tensor  # [batch, blocks_per_seq] int32, a random permutation of the pool
    context_lens: torch.Tensor  # [batch] int32
    slot_mapping: torch.Tensor  # [batch] int32, where the new token's K/V go


def make_batch(batch: int, context_len: int, block_size: int, vocab: int, device: torch.device) -> PagedBatch:
    blocks_per_seq = math.ceil(context_len / block_size)
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq).int()
    last = context_len - 1
    return PagedBatch(
        token_ids=torch.randint(0, vocab, (batch,), device=device),
        positions=torch.full((batch,), last, dtype=torch.int64, device=device),
        block_tables=tables,
        context_lens=torch.full((batch,), context_len, dtype=torch.int32, device=device),
        slot_mapping=(tables[:, last // block_size] * block_size + last % block_size).int(),
    )


class RandomLlamaDecoder:
    """A random-weight Llama whose decode step runs on `KernelOps`: the shard's hot path, no bookkeeping."""

    def __init__(
        self, shape: LlamaShape, ops: KernelOps, device: torch.device, dtype: torch.dtype,
        num_blocks: int, block_size: int, seed: int = 0,
    ) -> None:
        self.shape, self.ops = shape, ops
        gen = torch.Generator(device=device).manual_seed(seed)
        s = shape

        def weight(*size: int) -> torch.Tensor:
            return (torch.randn(*size, generator=gen, device=device) / math.sqrt(size[-1])).to(dtype)

        def norm() -> torch.Tensor:
            return (1.0 + 0.1 * torch.randn(s.hidden, generator=gen, device=device)).to(dtype)

        self.q_size, self.kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.embed = weight(s.vocab, s.hidden)  # also the lm head (tied)
        self.layers = [
            {
                "input_norm": norm(),
                "qkv": weight(self.q_size + 2 * self.kv_size, s.hidden),
                "o": weight(s.hidden, self.q_size),
                "post_norm": norm(),
                "gate_up": weight(2 * s.intermediate, s.hidden),
                "down": weight(s.hidden, s.intermediate),
            }
            for _ in range(s.num_layers)
        ]
        self.final_norm = norm()
        cache_shape = (num_blocks, block_size, s.num_kv_heads, s.head_dim)
        self.k_caches = [torch.randn(cache_shape, generator=gen, device=device).to(dtype) for _ in self.layers]
        self.v_caches = [torch.randn(cache_shape, generator=gen, device=device).to(dtype) for _ in self.layers]
        self.inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim)

    @property
    def weight_bytes(self) -> int:
        tensors = [self.embed, self.final_norm, *(w for layer in self.layers for w in layer.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_bytes_read(self, batch: PagedBatch) -> int:
        """K and V bytes attention reads in one step, all layers."""
        s, elem = self.shape, self.k_caches[0].element_size()
        tokens = int(batch.context_lens.sum())
        return 2 * s.num_layers * tokens * s.num_kv_heads * s.head_dim * elem

    def step(self, b: PagedBatch) -> torch.Tensor:
        """Logits [batch, vocab] for the newest token of each sequence; writes its K/V into the cache."""
        s, ops = self.shape, self.ops
        n = b.token_ids.shape[0]
        angles = b.positions[:, None].float() * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        h, residual = F.embedding(b.token_ids, self.embed), None
        for layer, k_cache, v_cache in zip(self.layers, self.k_caches, self.v_caches, strict=True):
            x, residual = ops.rms_norm(h, layer["input_norm"], s.eps, residual)
            qkv = F.linear(x, layer["qkv"])
            q = qkv[:, : self.q_size].view(n, s.num_heads, s.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, s.num_kv_heads, s.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(n, s.num_kv_heads, s.head_dim)
            ops.rotary_embedding(q, k, cos, sin)
            ops.reshape_and_cache(k, v, k_cache, v_cache, b.slot_mapping)
            attn = ops.paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.context_lens, s.head_dim**-0.5)
            h = F.linear(attn.reshape(n, self.q_size), layer["o"])
            x, residual = ops.rms_norm(h, layer["post_norm"], s.eps, residual)
            h = F.linear(ops.silu_and_mul(F.linear(x, layer["gate_up"])), layer["down"])
        x, _ = ops.rms_norm(h, self.final_norm, s.eps, residual)
        return F.linear(x, self.embed)


# ---- timing ------------------------------------------------------------------------------------------


def time_back_to_back(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call: the best of `repeats` runs of `calls` calls issued back to back between two events.

    No sync between calls, so the GPU never idles waiting for the host (unless the host is the bottleneck,
    which is then what the figure shows: eager steps are launch-bound).
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def time_graph_of_calls(calls: list[Callable[[], object]], repeats: int = 5) -> float:
    """Seconds per call of a CUDA graph that runs every one of `calls` in order (compiled outside it)."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for call in calls:
                call()
    except RuntimeError as exc:  # a figure is still worth having: time the calls eagerly, and say so
        print(f"(could not capture, timed eagerly: {str(exc).splitlines()[0][:120]})", file=sys.stderr)
        torch.cuda.synchronize()
        return time_back_to_back(lambda: [call() for call in calls], calls=1, repeats=repeats) / len(calls)
    seconds = time_back_to_back(graph.replay, calls=1, repeats=repeats)
    del graph
    return seconds / len(calls)


def num_copies(bytes_per_copy: int, l2_bytes: int) -> int:
    """Copies of a working set that together exceed twice the L2, so no call finds its data cached."""
    return max(1, math.ceil(2 * l2_bytes / max(bytes_per_copy, 1)) + 1)


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 60 << 20)


def copy_bandwidth(device: torch.device, num_bytes: int = 2 << 30) -> float:
    """Bytes per second of dst.copy_(src) on a large tensor, counting both the read and the write."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / time_back_to_back(lambda: dst.copy_(src), calls=10)


def rotated_tables(batch: int, context_len: int, block_size: int, copies: int, device: torch.device) -> list[torch.Tensor]:
    """`copies` block tables [batch, blocks_per_seq], each over its own blocks of one pool (copy c: blocks
    c * per_copy ..), scattered within the copy as a real cache's are."""
    blocks_per_seq = math.ceil(context_len / block_size)
    per_copy = batch * blocks_per_seq
    return [
        (torch.randperm(per_copy, device=device) + c * per_copy).view(batch, blocks_per_seq).int()
        for c in range(copies)
    ]


def bench_attention(
    ops: KernelOps, shape: LlamaShape, batch: int, context_len: int, block_size: int,
    dtype: torch.dtype, device: torch.device, l2: int, num_splits: int | None = None,
) -> dict[str, float]:
    """Our paged decode attention (with `num_splits` forced, when given: Triton only) and, when no split
    count is forced, SDPA over a dense cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * batch * context_len * shape.num_kv_heads * shape.head_dim * elem
    copies = num_copies(kv_bytes, l2)
    tables = rotated_tables(batch, context_len, block_size, copies, device)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)
    num_blocks = copies * tables[0].numel()
    cache_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, device=device, dtype=dtype)
    q = torch.randn(batch, shape.num_heads, shape.head_dim, device=device, dtype=dtype)
    scale = shape.head_dim**-0.5
    calls = max(20, copies)
    attend = ops.paged_decode_attention
    if num_splits is not None:
        from spindle_kernels.attention import decode_attention_splits

        def attend(q, k, v, tables, lens, scale):  # type: ignore[no-redef]
            return decode_attention_splits(q, k, v, tables, lens, scale, num_splits)

    paged_s = time_graph_of_calls([
        (lambda t=tables[i % copies]: attend(q, k_cache, v_cache, t, context_lens, scale))
        for i in range(calls)
    ])
    if num_splits is not None:
        return {"paged_s": paged_s, "kv_bytes": kv_bytes, "cache_copies": copies}
    # Comparison point: SDPA over a dense cache of the same tokens (no paging, GQA expanded by SDPA).
    k_dense = torch.randn(copies, batch, shape.num_kv_heads, context_len, shape.head_dim, device=device, dtype=dtype)
    v_dense = torch.randn_like(k_dense)
    q4 = q.unsqueeze(2)
    sdpa_s = time_graph_of_calls([
        (lambda c=i % copies: F.scaled_dot_product_attention(q4, k_dense[c], v_dense[c], scale=scale, enable_gqa=True))
        for i in range(calls)
    ])
    return {"paged_s": paged_s, "sdpa_dense_s": sdpa_s, "kv_bytes": kv_bytes, "cache_copies": copies}


def bench_step(model: RandomLlamaDecoder, b: PagedBatch, use_graph: bool) -> float:
    """Seconds per decode step: eager steps, or replays of one captured step, issued back to back."""
    if not use_graph:
        return time_back_to_back(lambda: model.step(b), calls=10)
    model.step(b)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.step(b)
    seconds = time_back_to_back(graph.replay, calls=20)
    del graph
    return seconds


def bench_transformers(
    shape: LlamaShape, batches: list[int], context_len: int, new_tokens: int, dtype: torch.dtype
) -> list[dict[str, float]]:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers not installed: skipping the generate comparison", file=sys.stderr)
        return []
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, rms_norm_eps=shape.eps,
        rope_theta=shape.rope_theta, tie_word_embeddings=True, max_position_embeddings=context_len + new_tokens,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype).eval()
    prompt_len = max(1, context_len - new_tokens // 2)  # average context during decode ~ context_len
    results = []
    for batch in batches:
        ids = torch.randint(2, shape.vocab, (batch, prompt_len), device="cuda")

        def generate(n: int, ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        try:
            t1 = time_back_to_back(lambda: generate(1), calls=1, repeats=3)
            tn = time_back_to_back(lambda: generate(new_tokens), calls=1, repeats=3)
        except torch.OutOfMemoryError:
            print(f"transformers: out of memory at batch {batch}", file=sys.stderr)
            break
        results.append({"batch": batch, "decode_tokens_per_s": batch * (new_tokens - 1) / (tn - t1)})
        torch.cuda.empty_cache()
    return results  # the model is freed with this frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--context-len", type=int, default=1024, help="tokens per sequence, newest included")
    parser.add_argument("--block-size", type=int, default=16, help="256 lets flash-attn serve attention")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph step timing")
    parser.add_argument("--hf-batches", default="1,16,64", help="'' skips the transformers comparison")
    parser.add_argument("--hf-new-tokens", type=int, default=32)
    parser.add_argument("--spec-gbps", type=float, default=4800.0,
                        help="the GPU's HBM bandwidth on its spec sheet, GB/s (default: H200, 4800)")
    parser.add_argument("--split-sweep", default="",
                        help="Triton decode attention at every split count 1,2,..,64 for these batches "
                             "(comma-separated; '' skips): what decode_num_splits should pick")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine.", file=sys.stderr)
        return 2
    device, dtype, shape = torch.device("cuda"), torch.bfloat16, LlamaShape()
    if args.backend == "torch":
        ops = REFERENCE_OPS
    elif args.backend == "triton":
        from spindle_kernels import triton_ops

        ops = triton_ops()
    else:
        ops = ops_for(device, block_size=args.block_size)
    batches = [int(x) for x in args.batches.split(",") if x]
    torch.manual_seed(0)

    copy_bw, spec_bw, l2 = copy_bandwidth(device), args.spec_gbps * 1e9, l2_bytes(device)
    print(f"device: {torch.cuda.get_device_name(device)}   ops: {ops.name}   block_size: {args.block_size}   "
          f"L2: {l2 >> 20} MiB")
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write), {copy_bw / spec_bw:.2f} of the "
          f"{spec_bw / 1e9:.0f} GB/s spec\n")
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device), "ops": ops.name, "shape": asdict(shape),
        "context_len": args.context_len, "block_size": args.block_size, "copy_bytes_per_s": copy_bw,
        "spec_bytes_per_s": spec_bw, "l2_bytes": l2, "attention": [], "step": [], "transformers": [],
    }

    print("decode attention, one layer (graph of N calls, caches rotated)   paged (ours)         sdpa dense")
    print(f"{'batch':>6} {'copies':>6} {'us':>10} {'GB/s':>8} {'of copy':>8} {'of spec':>8} {'us':>10} {'GB/s':>8}")
    for batch in batches:
        r = bench_attention(ops, shape, batch, args.context_len, args.block_size, dtype, device, l2)
        bw, sdpa_bw = r["kv_bytes"] / r["paged_s"], r["kv_bytes"] / r["sdpa_dense_s"]
        print(f"{batch:>6} {r['cache_copies']:>6} {r['paged_s'] * 1e6:>10.1f} {bw / 1e9:>8.0f} {bw / copy_bw:>8.2f} "
              f"{bw / spec_bw:>8.2f} {r['sdpa_dense_s'] * 1e6:>10.1f} {sdpa_bw / 1e9:>8.0f}")
        report["attention"].append({"batch": batch, **r, "fraction_of_copy": bw / copy_bw,
                                    "fraction_of_spec": bw / spec_bw})
        torch.cuda.empty_cache()

    sweep_batches = [int(x) for x in args.split_sweep.split(",") if x]
    if sweep_batches:
        from spindle_kernels.attention import MAX_DECODE_SPLITS, _num_sms, decode_num_splits

        report["split_sweep"] = []
        print("\nTriton decode attention by split count (one layer, us; * = decode_num_splits' pick)")
        counts = [1 << i for i in range(MAX_DECODE_SPLITS.bit_length())]
        print(f"{'batch':>6} " + " ".join(f"{n:>8}" for n in counts))
        for batch in sweep_batches:
            pick = decode_num_splits(batch, shape.num_kv_heads, _num_sms(device))
            cells = []
            for n in counts:
                r = bench_attention(ops, shape, batch, args.context_len, args.block_size, dtype, device, l2, n)
                report["split_sweep"].append({"batch": batch, "num_splits": n, "paged_s": r["paged_s"],
                                              "fraction_of_copy": r["kv_bytes"] / r["paged_s"] / copy_bw})
                cells.append(f"{r['paged_s'] * 1e6:>7.1f}" + ("*" if n == pick else " "))
            print(f"{batch:>6} " + " ".join(cells))
            torch.cuda.empty_cache()

    max_batch = max(batches)
    num_blocks = max_batch * math.ceil(args.context_len / args.block_size)
    model = RandomLlamaDecoder(shape, ops, device, dtype, num_blocks, args.block_size)
    print(f"\nfull decode step ({shape.num_layers} layers, {model.weight_bytes / 1e9:.2f} GB of weights)")
    print(f"{'batch':>6} {'mode':>6} {'ms':>8} {'tok/s':>10} {'GB/s':>8} {'of copy':>8} {'of spec':>8}")
    for batch in batches:
        b = make_batch(batch, args.context_len, args.block_size, shape.vocab, device)
        step_bytes = model.weight_bytes + model.kv_bytes_read(b)
        for mode in ("eager",) + (() if args.no_graph else ("graph",)):
            seconds = bench_step(model, b, use_graph=mode == "graph")
            bw = step_bytes / seconds
            print(f"{batch:>6} {mode:>6} {seconds * 1e3:>8.2f} {batch / seconds:>10.0f} {bw / 1e9:>8.0f} "
                  f"{bw / copy_bw:>8.2f} {bw / spec_bw:>8.2f}")
            report["step"].append({
                "batch": batch, "mode": mode, "seconds": seconds, "tokens_per_s": batch / seconds,
                "bytes": step_bytes, "fraction_of_copy": bw / copy_bw, "fraction_of_spec": bw / spec_bw,
            })
    del model
    torch.cuda.empty_cache()

    hf_batches = [int(x) for x in args.hf_batches.split(",") if x]
    if hf_batches:
        hf = bench_transformers(shape, hf_batches, args.context_len, args.hf_new_tokens, dtype)
        print("\ntransformers generate (sdpa, dynamic cache), decode only")
        for r in hf:
            print(f"{r['batch']:>6} {r['decode_tokens_per_s']:>10.0f} tok/s")
        report["transformers"] = hf
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
