"""Request grammars: TGI's `grammar` and OpenAI's `response_format` -> one checked `Grammar` for the shards.

Accepted shapes (TGI_REFERENCE §2.5, §2.8; OpenAI's response_format):
    {"type": "json" | "json_object", "value": <schema object or JSON string>}
    {"type": "json_schema", "value": {"name"?, "schema"}}                     TGI
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}    OpenAI
    {"type": "json_object"}                                                  OpenAI: any JSON object
    {"type": "regex", "value": "<regex>"}
    {"type": "lark", "value": "<Lark grammar>"}                               Spindle: a context-free grammar
    {"type": "text"}                                                         OpenAI: no constraint
Every grammar is checked here with the library the shards compile with (llguidance), and the schema against
the JSON Schema meta-schema, so a bad one is a 422 with the reason before anything is queued. Unlike TGI we
do not require a top-level `properties` (TGI's limit came from compiling schemas to one regex).
"""

from __future__ import annotations

import enum
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance

_JSON_OPTIONS = {"whitespace_flexible": False}  # as the shard compiles it (compact JSON)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarType(enum.IntEnum):
    """Values equal the proto's spindle.v1.GrammarType."""

    JSON_SCHEMA = 1
    REGEX = 2
    LARK = 3


@dataclass(frozen=True)
class Grammar:
    type: GrammarType
    value: str  # JSON text of the schema, the regex, or the Lark grammar

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Grammar:
        return cls(GrammarType.JSON_SCHEMA, json.dumps(schema, separators=(",", ":")))


class GrammarError(Exception):
    """The grammar cannot be used; `detail` is TGI's validation detail ("grammar is not valid: ...")."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _schema(value: Any) -> dict[str, Any]:
    """A schema given as an object or as a string holding JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"grammar is not valid: {e}") from None
    if not isinstance(value, dict):
        raise GrammarError("grammar is not valid: a JSON schema must be an object")
    return value


def parse_grammar(raw: Any) -> Grammar | None:
    """The grammar a request asks for (None for `{"type": "text"}`); GrammarError when it is malformed."""
    if not isinstance(raw, dict):
        raise GrammarError("grammar is not valid: expected an object with `type`")
    kind = raw.get("type")
    value = raw.get("value")
    if kind == "text":
        return None
    if kind in ("json", "json_object"):
        return Grammar.json_schema(_ANY_OBJECT if value is None and kind == "json_object" else _schema(value))
    if kind == "json_schema":
        body = raw.get("json_schema") if value is None else value
        if isinstance(body, str):
            body = _schema(body)
        if not isinstance(body, dict) or "schema" not in body:
            raise GrammarError("grammar is not valid: `json_schema` needs a `schema` object")
        return Grammar.json_schema(_schema(body["schema"]))
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError("grammar is not valid: a regex grammar's `value` must be a string")
        return Grammar(GrammarType.REGEX, value)
    if kind == "lark":
        if not isinstance(value, str):
            raise GrammarError("grammar is not valid: a lark grammar's `value` must be a string")
        return Grammar(GrammarType.LARK, value)
    raise GrammarError(
        f"grammar is not valid: unknown type {kind!r}, expected json, json_object, json_schema, regex, lark or text"
    )


class GrammarChecker:
    """Checks grammars once each (an LRU of the answers): schema against its meta-schema, then compiled.
    Thread-safe: validation runs it on worker threads."""

    def __init__(self, cache_size: int = 256) -> None:
        self._seen: OrderedDict[Grammar, str] = OrderedDict()  # grammar -> "" (fine) or the reason
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def check(self, grammar: Grammar) -> None:
        with self._lock:
            reason = self._seen.get(grammar)
            if reason is not None:
                self._seen.move_to_end(grammar)
        if reason is None:
            reason = _reason(grammar)
            with self._lock:
                self._seen[grammar] = reason
                if len(self._seen) > self._cache_size:
                    self._seen.popitem(last=False)
        if reason:
            raise GrammarError(f"grammar is not valid: {reason}")


def _reason(grammar: Grammar) -> str:
    """Why `grammar` cannot be compiled, or "" when it can."""
    try:
        if grammar.type == GrammarType.JSON_SCHEMA:
            schema = json.loads(grammar.value)
            try:
                jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(
                    schema
                )
            except jsonschema.SchemaError as e:
                return f"not a valid JSON Schema: {e.message}"
            text = llguidance.LLMatcher.grammar_from_json_schema(grammar.value, defaults=_JSON_OPTIONS)
        elif grammar.type == GrammarType.REGEX:
            text = llguidance.LLMatcher.grammar_from_regex(grammar.value)
        else:
            text = llguidance.LLMatcher.grammar_from_lark(grammar.value)
    except ValueError as e:
        return str(e)
    return llguidance.LLMatcher.validate_grammar(text)
