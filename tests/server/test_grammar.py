"""Grammar-constrained decoding on real shard processes with a random-weight model, where only the
constraint can make the output valid: every output parses and validates (JSON Schema) or fullmatches (regex),
greedy and sampled at temperature 1.5, alone and batched together, after a preemption, on 1 and 2 ranks."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
import tokenizers
import torch
from spindle_proto import generate_pb2 as pb
from spindle_server.sampling.grammar import GrammarCompiler, GrammarSpec, GrammarType, MaskJob, apply_bitmask

from tests.helpers.tiny_model import EOS_ID, TinyModelSpec, build_tokenizer, make_tiny_model
from tests.server.shard_harness import MiniRouter, Req, ShardGroup, warmup

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "kind": {"const": "car"}},
     "required": ["color", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "boolean"}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "boolean"},
                                                       {"type": "null"}]}},
     "required": ["v"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"t": {"enum": ["a", "b"]}}, "required": ["t"],
        "additionalProperties": False}}}, "required": ["tags"], "additionalProperties": False},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 3}},
     "required": ["ok"], "additionalProperties": False},
]
REGEXES = [r"(yes|no|maybe)", r"[0-9]{3}-[a-z]{2}", r"\((a|b)+\)"]
MAX_NEW = 96


def json_grammar(schema: dict) -> pb.Grammar:
    return pb.Grammar(type=pb.GRAMMAR_TYPE_JSON_SCHEMA, value=json.dumps(schema))


def sampled(seed: int) -> pb.NextTokenChooserParameters:
    return pb.NextTokenChooserParameters(temperature=1.5, top_p=1.0, typical_p=1.0, repetition_penalty=1.0,
                                         do_sample=True, seed=seed)


def prompt(k: int) -> list[int]:
    return [1] + [(13 * k + 7 * i) % 480 + 3 for i in range(5 + k % 7)]


def requests(start_id: int = 0) -> list[Req]:
    """Every schema and regex, greedy and sampled (3 seeds), as one batch."""
    grammars = [json_grammar(s) for s in SCHEMAS] + [pb.Grammar(type=pb.GRAMMAR_TYPE_REGEX, value=r)
                                                     for r in REGEXES]
    reqs, rid = [], start_id
    for g in grammars:
        for params in (None, sampled(1), sampled(2), sampled(3)):
            req = Req(id=rid, prompt=prompt(rid), max_new_tokens=MAX_NEW, grammar=g, ignore_eos=False)
            if params is not None:
                req.params = params
            reqs.append(req)
            rid += 1
    return reqs


def check_output(req: Req, text: str) -> None:
    assert req.grammar is not None
    if req.grammar.type == pb.GRAMMAR_TYPE_REGEX:
        assert re.fullmatch(req.grammar.value, text), (req.grammar.value, text)
    else:
        jsonschema.validate(json.loads(text), json.loads(req.grammar.value))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("grammar") / "m", TinyModelSpec(seed=21))


@pytest.fixture(scope="module")
def group(model_dir):
    g = ShardGroup(model_dir)
    g.num_blocks = warmup(g, max_total_tokens=256).num_blocks
    yield g
    g.close()


def router(group: ShardGroup) -> MiniRouter:
    group.call("ClearCache", pb.ClearCacheRequest())
    return MiniRouter(group, group.num_blocks)


@pytest.mark.slow
def test_every_output_follows_its_grammar_batched(group):
    reqs = router(group).run(requests())
    for req in reqs:
        assert req.finished is not None
        assert req.finished.finish_reason == pb.FINISH_REASON_EOS_TOKEN, (req.id, req.finished)
        assert req.tokens[-1] == EOS_ID  # EOS only where the grammar may end, and then it comes
        check_output(req, req.finished.text)
    # Sampling at 1.5 explores: the seeds of one grammar do not all give the same text.
    texts = {r.finished.text for r in reqs if r.params.do_sample}
    assert len(texts) > len(SCHEMAS)


@pytest.mark.slow
def test_alone_equals_batched_and_preempted_request_still_validates(group):
    """Preempted mid-object and recomputed in chunks: the grammar state is replayed, the tokens are the same."""
    batched = {r.id: r.tokens for r in router(group).run(requests())}
    for rid in (0, 5, 14):  # greedy, sampled
        full = requests()[rid]
        alone = router(group).run([full])[0]
        assert alone.tokens == batched[rid]
        # Preempted mid-object: resumed with its first tokens, it must continue exactly (grammar state replayed).
        cut = max(1, len(alone.tokens) // 2)
        resumed = requests()[rid]
        resumed.resumed = alone.tokens[:cut]
        resumed.chunk = 4  # and recomputed in chunked prefill
        rest = router(group).run([resumed])[0]
        assert alone.tokens[:cut] + rest.tokens == alone.tokens
        check_output(rest, rest.finished.text)


@pytest.mark.slow
def test_grammar_that_cannot_finish_ends_with_length(group):
    req = Req(id=1, prompt=prompt(1), max_new_tokens=3, ignore_eos=False,
              grammar=json_grammar({"type": "object", "properties": {"long": {"const": "abcdefghijklmnop"}},
                                    "required": ["long"]}))
    done = router(group).run([req])[0]
    assert done.finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(done.tokens) == 3


@pytest.mark.slow
def test_invalid_grammar_is_invalid_argument_and_changes_nothing(group):
    r = router(group)
    bad = Req(id=7, prompt=prompt(7), max_new_tokens=4, grammar=pb.Grammar(type=pb.GRAMMAR_TYPE_REGEX, value="[a-"))
    with pytest.raises(grpc.RpcError) as err:
        r.step([bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regex" in err.value.details()
    ok = router(group).run([requests()[0]])[0]
    check_output(ok, ok.finished.text)


@pytest.mark.slow
def test_two_ranks_pick_the_same_tokens(model_dir, group):
    one = {r.id: r.tokens for r in router(group).run(requests()[:16])}
    two = ShardGroup(model_dir, world_size=2)
    try:
        two.num_blocks = warmup(two, max_total_tokens=256).num_blocks
        got = {r.id: r.tokens for r in router(two).run(requests()[:16])}
    finally:
        two.close()
    assert got == one


# ---- in-process pieces --------------------------------------------------------------------------------


def test_compiler_caches_by_grammar_and_reports_errors():
    tok = build_tokenizer(300)
    compiler = GrammarCompiler(tok, 304, [EOS_ID])  # a model vocabulary padded past the tokenizer's
    spec = GrammarSpec(GrammarType.JSON_SCHEMA, json.dumps(SCHEMAS[0]))
    a = compiler.matcher(spec)
    first = compiler.take_compile_ns()
    b = compiler.matcher(spec)
    assert first > 0 and compiler.take_compile_ns() == 0  # the second one came from the cache
    assert a is not b  # each request gets its own state
    assert a.consume_token(tok.token_to_id("{"))
    assert b.consume_tokens([tok.token_to_id("{")])  # b did not move when a did
    with pytest.raises(ValueError, match="Unknown format"):
        compiler.matcher(GrammarSpec(GrammarType.JSON_SCHEMA, '{"type": "string", "format": "nope"}'))


def test_mask_allows_exactly_the_grammar_tokens_and_blocks_padding():
    tok = build_tokenizer(300)
    vocab = 304
    compiler = GrammarCompiler(tok, vocab, [EOS_ID])
    m = compiler.matcher(GrammarSpec(GrammarType.REGEX, "ab"))
    job = MaskJob([m, None], vocab, EOS_ID)  # row 1: unconstrained
    scores = torch.randn(2, vocab)
    by_bits = apply_bitmask(scores.clone(), job.wait())  # the device path (CUDA)
    expected = scores.clone()
    scores = job.apply(scores)  # the host path: an additive bias built on the worker
    assert torch.equal(scores, by_bits)
    assert torch.equal(scores[1], expected[1])  # unconstrained rows unchanged, bit for bit
    scores = torch.where(torch.isinf(scores), scores, torch.zeros_like(scores))
    allowed = [i for i in range(vocab) if scores[0, i] == 0]
    texts = [tok.decode([i]) for i in allowed]
    assert allowed and all("ab".startswith(t) and t for t in texts), texts
    assert EOS_ID not in allowed
    assert bool((scores[1] == 0).all())
    m.consume_tokens(tok.encode("ab", add_special_tokens=False).ids)
    scores = MaskJob([m], vocab, EOS_ID).apply(torch.zeros(1, vocab))
    assert [i for i in range(vocab) if scores[0, i] == 0] == [EOS_ID]  # finished: EOS is forced
    assert isinstance(tok, tokenizers.Tokenizer)
