"""Validator unit tests: TGI's order of checks, defaults, truncation, the `parameters` quirk."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from spindle_router.config import LimitsConfig
from spindle_router.tokenizer import RouterTokenizer
from spindle_router.validation import (
    ABSENT_PARAMETERS,
    GenerateParameters,
    SchemaError,
    ValidationError,
    Validator,
    parse_generate_request,
    parse_parameters,
)

from tests.router.api_harness import write_tokenizer_dir

LIMITS = LimitsConfig(max_input_tokens=32, max_total_tokens=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = RouterTokenizer(write_tokenizer_dir(tmp_path_factory.mktemp("tok")), num_workers=2)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def validator(tokenizer):
    return Validator(LIMITS, tokenizer)


def validate(validator, inputs="hello world", **params):
    return asyncio.run(validator.validate(inputs, GenerateParameters(**params)))


def detail(validator, inputs="hello world", **params) -> str:
    with pytest.raises(ValidationError) as e:
        validate(validator, inputs, **params)
    return e.value.detail


def test_tokenizer_matches_tokenizers_library(tokenizer):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_str(tokenizer._json)
    text = "hello über 東京 🙂 world"
    assert asyncio.run(tokenizer.encode(text)) == ref.encode(text).ids
    assert (
        asyncio.run(tokenizer.encode(text, add_special_tokens=False))
        == ref.encode(text, add_special_tokens=False).ids
    )
    spans = asyncio.run(tokenizer.encode_spans(text))
    assert spans[0].id == 1 and (spans[0].start, spans[0].stop) == (0, 0)  # BOS
    raw = text.encode()
    for s in spans[1:]:
        assert raw[s.start : s.stop].decode() == s.text  # byte offsets, as TGI reports them


def test_defaults(validator):
    v = validate(validator, max_new_tokens=None)
    n = v.input_length
    assert n == 3  # <s> hello world
    assert v.request.stopping.max_new_tokens == LIMITS.max_total_tokens - n  # TGI: total - input
    s = v.request.sampling
    assert (s.temperature, s.top_k, s.top_p, s.typical_p, s.repetition_penalty, s.frequency_penalty) == (
        1.0,
        0,
        1.0,
        1.0,
        1.0,
        0.0,
    )
    assert not s.is_sampling and 0 <= s.seed < 2**64
    assert v.best_of == 1 and not v.details and not v.return_full_text


def test_parameters_quirk_absent_vs_present():
    assert parse_generate_request({"inputs": "x"}).parameters == ABSENT_PARAMETERS
    assert ABSENT_PARAMETERS.do_sample is True
    assert parse_generate_request({"inputs": "x", "parameters": {}}).parameters.do_sample is False


def test_nulls_from_tgi_client_are_accepted():
    raw = {
        k: None
        for k in (
            "best_of",
            "temperature",
            "repetition_penalty",
            "frequency_penalty",
            "top_k",
            "top_p",
            "typical_p",
            "max_new_tokens",
            "return_full_text",
            "truncate",
            "seed",
            "top_n_tokens",
            "grammar",
            "adapter_id",
        )
    }
    assert parse_parameters({**raw, "stop": [], "do_sample": False}) == GenerateParameters()
    with pytest.raises(SchemaError, match="parameters.watermark: invalid type: null"):
        parse_parameters({"watermark": None})


def test_truncate_keeps_last_tokens(validator, tokenizer):
    text = "the quick brown fox jumps over lazy dog"
    full = asyncio.run(tokenizer.encode(text))
    v = validate(validator, text, truncate=4, max_new_tokens=2)
    assert list(v.request.input_ids) == full[-4:]
    assert validate(validator, text, truncate=32, max_new_tokens=2).request.input_ids == tuple(full)


def test_order_total_check_before_input_length(validator):
    long = "hello " * 40  # > 32 input tokens
    d = detail(validator, long, max_new_tokens=40)
    assert d.startswith("`inputs` tokens + `max_new_tokens` must be <= 64. Given: ")
    assert detail(validator, long, max_new_tokens=1).startswith(
        "`inputs` must have less than 32 tokens. Given: "
    )
    # with no max_new_tokens the default fills the budget, so only the input length can fail
    assert detail(validator, long).startswith("`inputs` must have less than 32 tokens")


def test_order_of_parameter_checks(validator):
    # every parameter wrong at once: the first check in TGI's order wins, then the next, ...
    params = dict(
        temperature=0.0,
        repetition_penalty=0.0,
        frequency_penalty=3.0,
        top_p=1.0,
        typical_p=0.0,
        top_k=0,
        max_new_tokens=0,
        stop=tuple("abcde"),
        top_n_tokens=9,
        truncate=0,
    )
    expected = [
        ("temperature", "`temperature` must be strictly positive"),
        ("repetition_penalty", "`repetition_penalty` must be strictly positive"),
        ("frequency_penalty", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ("top_p", "`top_p` must be > 0.0 and < 1.0"),
        ("typical_p", "`typical_p` must be > 0.0 and < 1.0"),
        ("top_k", "`top_k` must be strictly positive"),
        ("max_new_tokens", "`max_new_tokens` must be strictly positive"),
        ("stop", "`stop` supports up to 4 stop sequences. Given: 5"),
        ("top_n_tokens", "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
        ("truncate", "`truncate` must be strictly positive and less than 32. Given: 0"),
    ]
    for name, message in expected:
        assert detail(validator, **params) == message
        params.pop(name)
    validate(validator, **params)


def test_sampling_detection_and_seed(validator):
    assert detail(validator, best_of=2) == "you must use sampling when `best_of` is > 1"
    v = validate(validator, best_of=2, top_k=5, max_new_tokens=2)  # any warper given counts as sampling
    assert v.best_of == 2 and v.request.sampling.top_k == 5
    assert detail(validator, best_of=2, do_sample=True, seed=3) == "`seed` must not be set when `best_of` > 1"
    assert validate(validator, seed=2**64 - 1, max_new_tokens=1).request.sampling.seed == 2**64 - 1


def test_empty_inputs_and_unsupported_features(validator):
    assert detail(validator, "") == "`inputs` cannot be empty"
    assert detail(validator, grammar={"type": "regex", "value": "[a-"}, max_new_tokens=1).startswith(
        "grammar is not valid: "
    )
    grammar = validate(validator, grammar={"type": "regex", "value": "a+"}, max_new_tokens=1).request.grammar
    assert grammar is not None and grammar.value == "a+"
    disabled = Validator(dataclasses.replace(LIMITS, disable_grammar_support=True), validator.tokenizer)
    assert detail(disabled, grammar={"type": "regex", "value": "a"}, max_new_tokens=1) == "grammar is not supported"
    assert "`min_tokens` cannot be used with a grammar" in detail(
        validator, grammar={"type": "regex", "value": "a+"}, max_new_tokens=4, min_tokens=2)
    assert detail(validator, watermark=True, max_new_tokens=1) == "watermark is not supported"


def test_validator_needs_resolved_limits(tokenizer):
    with pytest.raises(ValueError, match="resolved"):
        Validator(LimitsConfig(), tokenizer)
