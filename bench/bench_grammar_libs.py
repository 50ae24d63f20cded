"""Grammar-library choice (issue 12): compile time of a JSON schema and per-token mask time, on one
tokenizer, for llguidance, xgrammar and outlines-core. Offline: pass a tokenizer.json (a real-size one can
be trained locally, see --help). Each library walks the same random valid path through its grammar."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def schema_20() -> dict:
    """20 properties: nested objects, bounded arrays, enums, const, anyOf, pattern, string lengths."""
    props: dict = {}
    for i in range(20):
        kind = i % 7
        if kind == 0:
            props[f"name_{i}"] = {"type": "string", "minLength": 1, "maxLength": 12}
        elif kind == 1:
            props[f"count_{i}"] = {"type": "integer", "minimum": 0, "maximum": 1000}
        elif kind == 2:
            props[f"color_{i}"] = {"enum": ["red", "green", "blue"]}
        elif kind == 3:
            props[f"tags_{i}"] = {"type": "array", "items": {"type": "string", "maxLength": 8},
                                  "minItems": 1, "maxItems": 3}
        elif kind == 4:
            props[f"point_{i}"] = {"type": "object", "additionalProperties": False,
                                   "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                   "required": ["x", "y"]}
        elif kind == 5:
            props[f"code_{i}"] = {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}
        else:
            props[f"either_{i}"] = {"anyOf": [{"type": "boolean"}, {"const": "none"}]}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def walk(step_mask, consume, vocab: int, steps: int, eos: int, seed: int = 0) -> list[float]:
    """Per-step mask seconds along a random allowed path (stops at EOS)."""
    rng = random.Random(seed)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        allowed = step_mask()
        times.append(time.perf_counter() - t0)
        ids = [i for i in torch.nonzero(allowed[:vocab]).flatten().tolist()]
        if not ids:
            break
        non_eos = [i for i in ids if i != eos]
        tok = rng.choice(non_eos) if non_eos and rng.random() > 0.02 else (eos if eos in ids else ids[0])
        if tok == eos:
            break
        consume(tok)
    return times


def unpack(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (mask.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def run_llguidance(tok_json: str, schema: dict, steps: int, eos: int) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch as lt

    tok = llguidance.LLTokenizer(tok_json, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    t0 = time.perf_counter()
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t0
    assert not m.is_error(), m.get_error()
    bm = lt.allocate_token_bitmask(1, tok.vocab_size)

    def mask():
        lt.fill_next_token_bitmask(m, bm, 0)
        return unpack(bm[0], tok.vocab_size)

    return compile_s, walk(mask, lambda t: m.consume_token(t), tok.vocab_size, steps, eos)


def run_xgrammar(tok_json: str, schema: dict, steps: int, eos: int) -> tuple[float, list[float]]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(tok_json))
    info = xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bm = xgr.allocate_token_bitmask(1, info.vocab_size)

    def mask():
        m.fill_next_token_bitmask(bm, 0)
        return unpack(bm[0], info.vocab_size)

    return compile_s, walk(mask, lambda t: m.accept_token(t), info.vocab_size, steps, eos)


def run_outlines(tok_json: str, schema: dict, steps: int, eos: int) -> tuple[float, list[float]]:
    import tokenizers
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    tk = tokenizers.Tokenizer.from_str(tok_json)
    dec = tokenizers.decoders.ByteLevel()
    vocab: dict[str, list[int]] = {}
    for t, i in tk.get_vocab().items():
        if i != eos:
            vocab.setdefault(dec.decode([t]), []).append(i)
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(schema))
    index = Index(regex, Vocabulary(eos, vocab))
    compile_s = time.perf_counter() - t0
    g = Guide(index)
    n = tk.get_vocab_size()

    def mask():
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[torch.tensor(g.get_tokens(), dtype=torch.int64)] = True
        return allowed

    return compile_s, walk(mask, lambda t: g.advance(t), n, steps, eos)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("tokenizer_json")
    p.add_argument("--eos", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    a = p.parse_args()
    tok_json = open(a.tokenizer_json).read()
    runners = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}
    for name in a.libs.split(","):
        try:
            compile_s, times = runners[name](tok_json, schema_20(), a.steps, a.eos)
        except Exception as e:  # report and go on: one library's failure is a finding too
            print(f"{name:14s} FAILED: {type(e).__name__}: {e}")
            continue
        times_us = sorted(t * 1e6 for t in times)
        print(f"{name:14s} compile {compile_s * 1e3:9.1f} ms   mask p50 {statistics.median(times_us):8.1f} us  "
              f"p99 {times_us[int(len(times_us) * 0.99) - 1]:8.1f} us  over {len(times_us)} steps")


if __name__ == "__main__":
    main()
