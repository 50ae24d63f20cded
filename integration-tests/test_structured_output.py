"""Structured output and tool calling through the real stack (launcher, shard, router) and the real clients.

The model has random weights, so only the grammar can make its output valid: every answer must parse and
validate against its schema, greedy and sampled at temperature 1.5, whatever the seed.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jsonschema
import openai
import pytest
import requests
from conftest import read_settled_metrics
from huggingface_hub import InferenceClient
from text_generation import Client

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Tokyo"]},
                           "unit": {"enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["a", "b"], "additionalProperties": False},
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHAT = [{"role": "user", "content": "hello world what is the weather"}]
MAX = 80


@pytest.fixture(scope="module")
def stack(start_launcher, tiny_model_dir: Path) -> Iterator:
    with start_launcher(tiny_model_dir, num_shard=1) as s:
        yield s


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="-")


def sampling(seed: int | None) -> dict:
    return {"temperature": 0.0} if seed is None else {"temperature": 1.5, "seed": seed}


def test_generate_grammar_with_text_generation_client(stack):
    client = Client(stack.base_url, timeout=120)
    from text_generation.types import Grammar, GrammarType

    for seed in (None, 1, 2):
        kw = {"do_sample": True, "temperature": 1.5, "seed": seed} if seed else {}
        r = client.generate("hello world", max_new_tokens=MAX, grammar=Grammar(type=GrammarType.Json, value=PERSON),
                            **kw)
        jsonschema.validate(json.loads(r.generated_text), PERSON)
        assert r.details.finish_reason.value == "eos_token"
        r = client.generate("hello world", max_new_tokens=MAX,
                            grammar=Grammar(type=GrammarType.Regex, value=r"[0-9]{3}-(ab|cd)"), **kw)
        assert re.fullmatch(r"[0-9]{3}-(ab|cd)", r.generated_text)
    streamed = list(client.generate_stream("hello world", max_new_tokens=MAX,
                                           grammar=Grammar(type=GrammarType.Json, value=PERSON)))
    jsonschema.validate(json.loads(streamed[-1].generated_text), PERSON)


def test_compat_route_and_bad_grammars_are_422_before_queueing(stack, metrics_of):
    url = stack.base_url
    before = metrics_of(url)
    r = requests.post(url + "/", json={"inputs": "hello", "parameters": {
        "max_new_tokens": MAX, "return_full_text": False, "details": True,
        "grammar": {"type": "json_schema", "value": {"name": "p", "schema": PERSON}}}},
        timeout=120)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()[0]["generated_text"]), PERSON)
    after = read_settled_metrics(url)
    steps = after["spindle_grammar_mask_duration_count"] - before.get("spindle_grammar_mask_duration_count", 0)
    assert steps == int(r.headers["x-generated-tokens"])  # one masked step per generated token
    assert after["spindle_grammar_compile_duration_count"] >= 1  # PERSON was compiled once (then cached)
    bad = [
        ({"type": "lark", "value": "start: undefined_rule"}, "grammar is not valid"),
        ({"type": "json", "value": "{not json"}, "grammar is not valid"),
        ({"type": "json", "value": {"type": 5}}, "not a valid JSON Schema"),
        ({"type": "json", "value": {"type": "object", "unevaluatedProperties": False}}, "unevaluatedProperties"),
        ({"type": "regex", "value": "(a"}, "regex"),
    ]
    for grammar, reason in bad:
        r = requests.post(url + "/generate", json={"inputs": "x", "parameters": {"grammar": grammar}}, timeout=30)
        assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
        assert reason in r.json()["error"]
    assert metrics_of(url)["tgi_batch_inference_count{method=\"prefill\"}"] == after[
        "tgi_batch_inference_count{method=\"prefill\"}"]  # nothing reached the shards
    # A context-free grammar (Lark, llguidance's dialect): balanced parentheses, which no regex can say.
    lark = 'start: expr\nexpr: "(" expr ")" | "x"'
    for seed in (1, 2, 3):
        r = requests.post(url + "/generate", json={"inputs": "hello", "parameters": {
            "max_new_tokens": MAX, "do_sample": True, "temperature": 1.5, "seed": seed,
            "grammar": {"type": "lark", "value": lark}}}, timeout=120)
        text = r.json()["generated_text"]
        depth = text.count("(")
        assert r.status_code == 200 and text == "(" * depth + "x" + ")" * depth, text


def test_response_format_with_openai_sdk_and_inference_client(stack, oai):
    for seed in (None, 3, 4):
        r = oai.chat.completions.create(
            model="tgi", messages=CHAT, max_tokens=MAX, **sampling(seed),
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                    "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    # Any JSON object: random weights rarely close a free string within MAX tokens, so an unfinished one is
    # accepted as long as it says so (length) and is an object so far.
    r = oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=MAX, response_format={"type": "json_object"})
    content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert content.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert finish == "length" and r.usage.completion_tokens == MAX
    client = InferenceClient(stack.base_url)
    out = client.chat_completion(CHAT, max_tokens=MAX, response_format={"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    text = client.text_generation("hello", max_new_tokens=MAX, return_full_text=False,
                                  grammar={"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(text), PERSON)


def check_call(name: str, arguments: str) -> None:
    assert name in PARAMS
    jsonschema.validate(json.loads(arguments), PARAMS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_with_openai_sdk(oai, choice):
    for seed in (None, 5, 6):
        r = oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, tool_choice=choice,
                                        max_tokens=MAX, **sampling(seed))
        c = r.choices[0]
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
        if isinstance(choice, dict):
            assert call.function.name == "add"
        # Streamed: a first delta with id and name, then fragments that concatenate to the arguments.
        chunks = list(oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, tool_choice=choice,
                                                  max_tokens=MAX, stream=True, **sampling(seed)))
        deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert deltas[0].id and deltas[0].function.name
        assert all(d.id is None and d.function.name is None for d in deltas[1:])
        streamed = "".join(d.function.arguments or "" for d in deltas)
        assert deltas[0].function.name == call.function.name
        assert json.loads(streamed) == json.loads(call.function.arguments)  # same seed: the same call
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_none_and_history(oai):
    r = oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, max_tokens=MAX, temperature=0.0)
    m = r.choices[0].message
    if m.tool_calls:  # auto: a call, valid, or text
        check_call(m.tool_calls[0].function.name, m.tool_calls[0].function.arguments)
    else:
        assert isinstance(m.content, str)
    # "none": free text. Unseeded sampling may end on EOS inside 4 tokens, so "stop" is as right as "length".
    r = oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("length", "stop")
    history = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    r = oai.chat.completions.create(model="tgi", messages=history, tools=TOOLS, tool_choice="required",
                                    max_tokens=MAX, temperature=0.0)
    check_call(r.choices[0].message.tool_calls[0].function.name, r.choices[0].message.tool_calls[0].function.arguments)


def test_tool_errors(oai):
    with pytest.raises(openai.UnprocessableEntityError, match="Tool with name nope not found"):
        oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, tool_choice="nope")
    with pytest.raises(openai.UnprocessableEntityError, match="mutually exclusive"):
        oai.chat.completions.create(model="tgi", messages=CHAT, tools=TOOLS, response_format={"type": "json_object"})


def test_disable_grammar_support(start_launcher, tiny_model_dir):
    with start_launcher(tiny_model_dir, args=["--disable-grammar-support"]) as s:
        r = requests.post(s.base_url + "/generate", json={"inputs": "x", "parameters": {
            "grammar": {"type": "regex", "value": "a"}}}, timeout=30)
        assert r.status_code == 422 and "grammar is not supported" in r.json()["error"]
        r = requests.post(s.base_url + "/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS}, timeout=30)
        assert r.status_code == 422 and "grammar is not supported" in r.json()["error"]["message"]


def test_preempted_constrained_requests_still_validate(start_launcher, tiny_model_dir, metrics_of):
    """A KV cache far too small for 24 concurrent constrained requests: the scheduler preempts and recomputes
    them (the shard replays each grammar from the generated ids); every answer still validates and equals the
    answer the same request got alone."""
    from test_kv_pressure import BLOCK_SIZE, kv_bytes_per_block

    num_blocks = 12
    bodies = [{"inputs": f"hello world {k} the quick brown fox", "parameters": {
        "max_new_tokens": MAX, "grammar": {"type": "json", "value": PERSON},
        **({"do_sample": True, "temperature": 1.5, "seed": k} if k % 2 else {})}} for k in range(24)]
    args = ["--kv-cache-bytes", str(num_blocks * kv_bytes_per_block(tiny_model_dir)),
            "--max-batch-prefill-tokens", "128"]
    assert (16 + MAX) // BLOCK_SIZE < num_blocks - 1  # one request alone always fits
    with start_launcher(tiny_model_dir, args=args) as s:
        alone = [requests.post(s.base_url + "/generate", json=b, timeout=120).json()["generated_text"]
                 for b in bodies]

        async def together() -> list[str]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                async def one(body: dict) -> str:
                    async with session.post(s.base_url + "/generate", json=body) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["generated_text"]
                return await asyncio.gather(*(one(b) for b in bodies))

        got = asyncio.run(together())
        assert metrics_of(s.base_url)["spindle_preemptions"] > 0
    for text in got:
        jsonschema.validate(json.loads(text), PERSON)
    assert got == alone
