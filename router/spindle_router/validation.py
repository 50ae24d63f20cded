"""HTTP body -> `ValidRequest`: TGI's parameter checks, with TGI's messages.

Two kinds of failure, both HTTP 422 (spindle_router.errors): `SchemaError` when the JSON does not fit the
request type (what serde rejects in TGI), `ValidationError` for TGI's validation (`router/src/validation.rs`).
`Validator.validate` runs one check per concern: sampling, stopping, top-n, unsupported features, then the
prompt (tokenize, truncate) and the token budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from spindle_router.config import LimitsConfig
from spindle_router.errors import SchemaError, ValidationError
from spindle_router.grammar import Grammar, GrammarChecker, GrammarError, parse_grammar
from spindle_router.scheduler.request import SamplingParams, StoppingParams, ValidRequest
from spindle_router.tokenizer import RouterTokenizer

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
GRAMMAR_TYPES = ("json", "json_object", "regex", "json_schema", "lark")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    return "map"


class Fields:
    """Typed reads from one JSON object, raising SchemaError the way serde would (`path` names the object)."""

    def __init__(self, obj: Any, path: str = "") -> None:
        if not isinstance(obj, dict):
            raise SchemaError(f"{path or 'body'}: invalid type: {_kind(obj)}, expected a map")
        self.obj = obj
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _bad(self, key: str, value: Any, expected: str) -> SchemaError:
        return SchemaError(f"{self._name(key)}: invalid type: {_kind(value)}, expected {expected}")

    def has(self, key: str) -> bool:
        return key in self.obj

    def raw(self, key: str) -> Any:
        return self.obj.get(key)

    def required(self, key: str) -> Any:
        if key not in self.obj:
            raise SchemaError(f"missing field `{key}`" + (f" in `{self.path}`" if self.path else ""))
        return self.obj[key]

    def int(self, key: str, *, lo: int = 0, hi: int = U32_MAX, optional: bool = True) -> int | None:
        value = self.obj.get(key)
        if value is None:
            if key in self.obj and not optional:
                raise self._bad(key, value, "an integer")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, "an integer")
        if not lo <= value <= hi:
            raise SchemaError(f"{self._name(key)}: invalid value: integer `{value}`, expected {lo}..={hi}")
        return value

    def float(self, key: str) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, "f32")
        return float(value)

    def bool(self, key: str, default: bool | None) -> bool | None:
        """`default` None: an Option<bool> (null accepted). Otherwise a defaulted bool: null is rejected."""
        if key not in self.obj:
            return default
        value = self.obj[key]
        if value is None and default is None:
            return None
        if not isinstance(value, bool):
            raise self._bad(key, value, "a boolean")
        return value

    def str(self, key: str, *, optional: bool = True) -> str | None:
        value = self.obj.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def str_list(self, key: str, *, null_ok: bool) -> list[str] | None:
        if key not in self.obj:
            return None
        value = self.obj[key]
        if value is None and null_ok:
            return None
        if not isinstance(value, list):
            raise self._bad(key, value, "a sequence")
        for item in value:
            if not isinstance(item, str):
                raise self._bad(key, item, "a string")
        return value


@dataclass(frozen=True)
class GenerateParameters:
    """TGI's `GenerateParameters`, as parsed (None = not given)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None
    # OpenAI / vLLM extensions (the OpenAI routes set them)
    presence_penalty: float | None = None
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


# Quirk (TGI): with no `parameters` key at all, the built-in default samples; a present but partial
# `parameters` object defaults `do_sample` to false.
ABSENT_PARAMETERS = GenerateParameters(do_sample=True)


def parse_parameters(raw: Any, path: str = "parameters") -> GenerateParameters:
    f = Fields(raw, path)
    grammar = f.raw("grammar")
    if grammar is not None:
        g = Fields(grammar, f"{path}.grammar")
        kind = g.str("type", optional=False)
        if kind not in GRAMMAR_TYPES:
            raise SchemaError(
                f"{path}.grammar.type: unknown variant `{kind}`, expected one of {GRAMMAR_TYPES}"
            )
        g.required("value")
    return GenerateParameters(
        best_of=f.int("best_of", hi=U64_MAX),
        temperature=f.float("temperature"),
        repetition_penalty=f.float("repetition_penalty"),
        frequency_penalty=f.float("frequency_penalty"),
        top_k=f.int("top_k", lo=-(2**31), hi=2**31 - 1),
        top_p=f.float("top_p"),
        typical_p=f.float("typical_p"),
        do_sample=bool(f.bool("do_sample", False)),
        max_new_tokens=f.int("max_new_tokens"),
        return_full_text=f.bool("return_full_text", None),
        stop=tuple(f.str_list("stop", null_ok=False) or ()),
        truncate=f.int("truncate", hi=U64_MAX),
        watermark=bool(f.bool("watermark", False)),
        details=bool(f.bool("details", False)),
        decoder_input_details=bool(f.bool("decoder_input_details", False)),
        seed=f.int("seed", hi=U64_MAX),
        top_n_tokens=f.int("top_n_tokens"),
        grammar=grammar,
        adapter_id=f.str("adapter_id"),
    )


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters
    stream: bool = False  # only read by the compat route POST /


def parse_generate_request(body: Any) -> GenerateRequest:
    f = Fields(body)
    inputs = f.required("inputs")
    if not isinstance(inputs, str):
        raise SchemaError(f"inputs: invalid type: {_kind(inputs)}, expected a string")
    params = parse_parameters(f.raw("parameters")) if f.has("parameters") else ABSENT_PARAMETERS
    return GenerateRequest(inputs=inputs, parameters=params, stream=bool(f.bool("stream", False)))


@dataclass(frozen=True)
class ValidGenerate:
    """A validated generation: what the scheduler runs, plus what the HTTP layer needs to answer."""

    request: ValidRequest
    inputs: str
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool

    @property
    def input_length(self) -> int:
        return self.request.input_length

    def with_seed(self, seed: int) -> ValidGenerate:
        sampling = dataclasses.replace(self.request.sampling, seed=seed)
        return dataclasses.replace(self, request=dataclasses.replace(self.request, sampling=sampling))


def _check_unit_open(value: float | None, name: str) -> None:
    if value is not None and not (0.0 < value < 1.0):
        raise ValidationError(f"`{name}` must be > 0.0 and < 1.0")


def is_sampling(params: GenerateParameters) -> bool:
    """TGI: a request samples when it asks to, or when it sets any warper."""
    return params.do_sample or any(
        v is not None for v in (params.temperature, params.top_k, params.top_p, params.typical_p)
    )


def check_sampling(params: GenerateParameters, num_sequences: int) -> SamplingParams:
    """Temperature, penalties, top-k/top-p/typical-p and the seed -> the shard's sampling parameters."""
    if num_sequences > 1 and not is_sampling(params):
        raise ValidationError("you must use sampling when `best_of` is > 1")
    temperature = 1.0 if params.temperature is None else params.temperature
    if not temperature > 0.0 or math.isinf(temperature):
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if params.repetition_penalty is None else params.repetition_penalty
    if not repetition_penalty > 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if params.frequency_penalty is None else params.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    presence_penalty = 0.0 if params.presence_penalty is None else params.presence_penalty
    if not -2.0 <= presence_penalty <= 2.0:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    min_p = 0.0 if params.min_p is None else params.min_p
    if not 0.0 <= min_p <= 1.0:
        raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
    for token_id, bias in params.logit_bias:
        if not -100.0 <= bias <= 100.0:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {bias} for token {token_id}")
    _check_unit_open(params.top_p, "top_p")
    _check_unit_open(params.typical_p, "typical_p")
    if params.top_k is not None and params.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if params.seed is not None and num_sequences > 1:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    return SamplingParams(
        temperature=temperature,
        top_k=params.top_k or 0,
        top_p=1.0 if params.top_p is None else params.top_p,
        typical_p=1.0 if params.typical_p is None else params.typical_p,
        do_sample=params.do_sample,
        seed=random.getrandbits(64) if params.seed is None else params.seed,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        min_p=min_p,
        logit_bias=params.logit_bias,
    )


def check_token_ids(params: GenerateParameters, vocab_size: int) -> None:
    """Token ids a request names (logit_bias keys, stop_token_ids) exist in the vocabulary."""
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError(f"`{name}` token ids must be >= 0 and < {vocab_size}. Given: {bad[0]}")


def check_stopping(params: GenerateParameters, limits: LimitsConfig) -> None:
    """What can be checked before tokenizing: max_new_tokens > 0 and the number of stop sequences."""
    if params.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(params.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(params.stop)}"
        )


def check_top_n_tokens(params: GenerateParameters, limits: LimitsConfig) -> int:
    top_n_tokens = params.top_n_tokens or 0
    if top_n_tokens > limits.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n_tokens}"
        )
    return top_n_tokens


def check_supported(params: GenerateParameters) -> None:
    """Features the shard contract cannot honour: a clear error, never a quietly different answer."""
    if params.adapter_id is not None:
        raise ValidationError(f"unknown adapter `{params.adapter_id}`: no LoRA adapters are loaded")
    if params.watermark:
        raise ValidationError("watermark is not supported")


class Validator:
    def __init__(self, limits: LimitsConfig, tokenizer: RouterTokenizer) -> None:
        if limits.max_input_tokens is None or limits.max_total_tokens is None:
            raise ValueError("the validator needs resolved max_input_tokens and max_total_tokens")
        self.limits = limits
        self.max_input_tokens: int = limits.max_input_tokens
        self.max_total_tokens: int = limits.max_total_tokens
        self.tokenizer = tokenizer
        self.grammars = None if limits.disable_grammar_support else GrammarChecker()

    def check_grammar(self, raw: Any) -> Grammar | None:
        """TGI §3.1 step 18: the request's grammar, checked (None: unconstrained); ValidationError otherwise."""
        if raw is None:
            return None
        if self.grammars is None:
            raise ValidationError("grammar is not supported")
        try:
            grammar = parse_grammar(raw)
            if grammar is not None:
                self.grammars.check(grammar)
        except GrammarError as e:
            raise ValidationError(e.detail) from None
        return grammar

    def check_best_of(self, params: GenerateParameters) -> int:
        """The number of sequences a request runs (checked before it takes its permits)."""
        best_of = params.best_of or 1  # TGI: 0 is silently 1 here
        max_best_of = self.limits.max_best_of
        if best_of > 1 and max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
        return best_of

    async def tokenize(self, inputs: str, truncate: int | None, add_special_tokens: bool) -> list[int]:
        """The prompt's token ids, left-truncated to `truncate` tokens (TGI keeps the last ones)."""
        if inputs == "":
            raise ValidationError("`inputs` cannot be empty")
        if truncate is not None and not 0 < truncate <= self.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {self.max_input_tokens}. Given: {truncate}"
            )
        try:
            ids = await self.tokenizer.encode(inputs, add_special_tokens)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValidationError(f"tokenizer error {e}") from e
        return ids[-truncate:] if truncate is not None and len(ids) > truncate else ids

    def check_lengths(self, input_length: int, max_new_tokens: int | None) -> int:
        """The prompt and its generation fit the token limits; returns max_new_tokens (default: the rest)."""
        if max_new_tokens is None:
            max_new_tokens = max(self.max_total_tokens - input_length, 0)
        if input_length + max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > self.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {input_length}"
            )
        return max_new_tokens

    async def validate(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        default_return_full_text: bool = False,
    ) -> ValidGenerate:
        """TGI's checks, one concern at a time; raises ValidationError on the first that fails."""
        best_of = params.best_of or 1
        sampling = check_sampling(params, best_of)
        check_stopping(params, self.limits)
        top_n_tokens = check_top_n_tokens(params, self.limits)
        ids = await self.tokenize(inputs, params.truncate, add_special_tokens)
        max_new_tokens = self.check_lengths(len(ids), params.max_new_tokens)
        min_new_tokens = params.min_tokens or 0
        if min_new_tokens > max_new_tokens:
            raise ValidationError(
                f"`min_tokens` must be <= `max_new_tokens`. Given: {min_new_tokens} and {max_new_tokens}"
            )
        check_token_ids(params, self.tokenizer.vocab_size)
        grammar = None
        if params.grammar is not None:  # compiling a large schema takes milliseconds: off the event loop
            grammar = await asyncio.get_running_loop().run_in_executor(None, self.check_grammar, params.grammar)
            if min_new_tokens:
                raise ValidationError("`min_tokens` cannot be used with a grammar: the grammar decides where "
                                      "the output may end")
        check_supported(params)
        request = ValidRequest(
            input_ids=tuple(ids),
            sampling=sampling,
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens,
                stop_sequences=params.stop,
                ignore_eos_token=params.ignore_eos,
                min_new_tokens=min_new_tokens,
                stop_token_ids=params.stop_token_ids,
            ),
            top_n_tokens=top_n_tokens,
            prefill_logprobs=params.decoder_input_details,
            grammar=grammar,
        )
        return ValidGenerate(
            request=request,
            inputs=inputs,
            best_of=best_of,
            details=params.details or params.decoder_input_details,
            decoder_input_details=params.decoder_input_details,
            return_full_text=default_return_full_text if params.return_full_text is None else params.return_full_text,
        )
