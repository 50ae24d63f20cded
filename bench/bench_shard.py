"""Decode step time and MFU of the shard engine, in process (no gRPC), on a random SmolLM2-135M-shaped Llama.

For each batch size: prefill B prompts, then time `--steps` decode steps (forward + sample + stop +
detokenize, exactly what a decode Step runs). MFU = tokens x 2 x params / wall time / peak, where the peak
is the best matmul rate this script measures on shapes like the model's own (bench/flops.py).

    .venv/bin/python bench/bench_shard.py                       # the full model, batch 1, 8, 32
    .venv/bin/python bench/bench_shard.py --layers 2 --steps 3  # a quick check that it works
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import DEFAULT_DIR, SMOLLM2_135M, build, num_parameters  # noqa: E402
from flops import matmul_peak_flops, model_matmul_shapes  # noqa: E402


def make_engine(model_dir: Path, dtype: torch.dtype, block_size: int, kv_cache_bytes: int):
    import tokenizers
    from spindle_kernels import ops_for
    from spindle_server.distributed import init_distributed
    from spindle_server.engine.shard import CacheSettings, ShardEngine, WarmupSpec
    from spindle_server.models.registry import load_model, read_model_config

    device = torch.device("cpu")
    dist = init_distributed(device)
    config = read_model_config(model_dir)
    ops = ops_for(device)
    model = load_model(model_dir, dtype, device, dist, ops)
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    settings = CacheSettings(block_size=block_size, kv_cache_bytes=kv_cache_bytes)
    engine = ShardEngine(model, config, tokenizer, dist, device, dtype, ops.name, settings)
    engine.warmup(WarmupSpec(max_input_tokens=512, max_prefill_tokens=512, max_total_tokens=512))
    return engine


def time_decode(engine, batch_size: int, prompt_len: int, steps: int, vocab: int) -> list[float]:
    """Seconds per decode step for a batch of `batch_size` greedy requests."""
    from spindle_proto import generate_pb2 as pb
    from spindle_server.engine.batch import StepCall, request_from_proto

    bs = engine.settings.block_size
    blocks_each = math.ceil((prompt_len + steps + 2) / bs)
    requests = []
    for i in range(batch_size):
        ids = [1] + [(97 * i + 31 * j) % (vocab - 3) + 3 for j in range(prompt_len - 1)]
        requests.append(pb.Request(
            id=i, input_ids=ids, blocks=list(range(i * blocks_each, (i + 1) * blocks_each)),
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                     repetition_penalty=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps + 2, ignore_eos_token=True),
        ))
    engine.clear()
    ctx = engine.batch_context()
    new = tuple(request_from_proto(r, ctx) for r in requests)
    engine.step(StepCall(requests=new, num_requests=batch_size))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outcome = engine.step(StepCall(num_requests=batch_size))
        times.append(time.perf_counter() - start)
        assert len(outcome.generations) == batch_size
    engine.clear()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = dict(SMOLLM2_135M)
    out = DEFAULT_DIR
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
        out = DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}-{args.layers}layers")
    model_dir = build(out, **config)
    params = num_parameters(config)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    blocks_needed = sum(math.ceil((args.prompt_len + args.steps + 2) / 16) for _ in range(max(batch_sizes)))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * 16 * config["num_key_value_heads"] * head_dim * 4
    engine = make_engine(model_dir, torch.float32, 16, (max(blocks_needed, 32) + 8) * block_bytes)

    shapes = model_matmul_shapes(config["hidden_size"], config["intermediate_size"],
                                 config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"])
    peak = matmul_peak_flops(shapes, rows=tuple(sorted(set(batch_sizes) | {256})))
    print(f"model: {params / 1e6:.1f}M parameters, {config['num_hidden_layers']} layers, float32, "
          f"{torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'batch':>5} | {'step ms (median)':>16} | {'step ms (min)':>13} | {'tokens/s':>9} | {'MFU':>6}")
    print("-" * 62)
    for b in batch_sizes:
        times = time_decode(engine, b, args.prompt_len, args.steps, config["vocab_size"])
        median = statistics.median(times)
        mfu = b * 2 * params / median / peak
        print(f"{b:>5} | {median * 1e3:>16.2f} | {min(times) * 1e3:>13.2f} | {b / median:>9.1f} | {mfu:>6.1%}")


if __name__ == "__main__":
    main()
