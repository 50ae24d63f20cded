"""Output throughput of the shard engine under a JSON schema vs unconstrained, in process (no gRPC).

B requests decode together for `--max-new-tokens` each (ignore_eos: a finished grammar then only allows EOS,
so both runs do the same steps at the same batch size): once unconstrained and once under a 20-property
schema, and output tokens / second are compared. Also prints where the grammar time goes: mask time on the worker thread (overlapping the
forward) and the step time around it.

    .venv/bin/python bench/bench_grammar.py                      # the demo model, batch 32
    .venv/bin/python bench/bench_grammar.py --model models/demo --batch 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import tokenizers
import torch
from spindle_kernels import ops_for
from spindle_proto import generate_pb2 as pb
from spindle_server.distributed import Distributed
from spindle_server.engine.batch import StepCall, request_from_proto
from spindle_server.engine.shard import CacheSettings, ShardEngine, WarmupSpec
from spindle_server.models.registry import load_model, read_model_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grammar_libs import schema_20  # noqa: E402


def run(engine: ShardEngine, batch: int, max_new: int, grammar: pb.Grammar | None) -> tuple[int, float, int, int]:
    """(tokens generated, seconds, mask ns, forward ns) for one batch run to completion."""
    bs = engine.settings.block_size
    reqs, next_block = [], 0
    for i in range(batch):
        prompt = [1] + [(17 * i + 5 * j) % 3000 + 3 for j in range(15)]
        n = math.ceil((len(prompt) + max_new) / bs)
        r = pb.Request(id=i, input_ids=prompt, blocks=list(range(next_block, next_block + n)),
                       parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                                repetition_penalty=1.0, do_sample=True, seed=i),
                       stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new,
                                                                         ignore_eos_token=True))
        if grammar is not None:
            r.grammar.CopyFrom(grammar)
        reqs.append(r)
        next_block += n
    engine.clear()
    start = time.perf_counter()
    ctx = engine.batch_context()
    out = engine.step(StepCall(requests=tuple(request_from_proto(r, ctx) for r in reqs), num_requests=len(reqs)))
    tokens, mask_ns, forward_ns = len(out.generations), out.grammar_mask_ns, out.forward_ns
    live = len(reqs) - sum(g.generated_text is not None for g in out.generations)
    while live:
        done = [g.request_id for g in out.generations if g.generated_text is not None]
        out = engine.step(StepCall(dropped_ids=tuple(done), num_requests=live))
        tokens += len(out.generations)
        live -= sum(g.generated_text is not None for g in out.generations)
        mask_ns += out.grammar_mask_ns
        forward_ns += out.forward_ns
    return tokens, time.perf_counter() - start, mask_ns, forward_ns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/demo"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    device = torch.device("cpu")
    dist = Distributed(rank=0, world_size=1, group=None)
    ops = ops_for(device)
    model = load_model(a.model, torch.float32, device, dist, ops)
    tok = tokenizers.Tokenizer.from_file(str(a.model / "tokenizer.json"))
    engine = ShardEngine(model, read_model_config(a.model), tok, dist, device, torch.float32, ops.name,
                         CacheSettings(kv_cache_bytes=256 << 20))
    engine.warmup(WarmupSpec(max_input_tokens=255, max_prefill_tokens=2048, max_total_tokens=512))
    grammar = pb.Grammar(type=pb.GRAMMAR_TYPE_JSON_SCHEMA, value=json.dumps(schema_20()))
    run(engine, 2, 8, grammar)  # compile once (cached), as a served schema would be
    for rep in range(a.repeats):
        n0, s0, _, f0 = run(engine, a.batch, a.max_new_tokens, None)  # f0: forward ns, the noise gauge
        n1, s1, m1, f1 = run(engine, a.batch, a.max_new_tokens, grammar)
        print(f"[{rep}] unconstrained {n0 / s0:8.1f} tok/s   json schema {n1 / s1:8.1f} tok/s   "
              f"ratio {(n1 / s1) / (n0 / s0):.2f}   mask {m1 / max(n1, 1) / 1e3:.1f} us/token "
              f"({m1 / 1e6:.0f} ms on the worker thread; forward {f0 / 1e6:.0f} vs {f1 / 1e6:.0f} ms)")


if __name__ == "__main__":
    main()
