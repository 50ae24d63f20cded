"""Bad and hostile requests on the real stack, with --api-key set: every route answers a 4xx JSON error (with
`error` and `error_type`) before any byte of a stream, never a 5xx; the key guards every inference route,
never shows in /info or the logs; and a property-based fuzzer built from /openapi.json finds no 5xx and
leaves the server healthy, with every KV block back.

The fuzzer runs FUZZ_EXAMPLES bodies (SPINDLE_FUZZ_EXAMPLES to run more): random JSON, bodies shaped by each
route's schema with fields of the right and of the wrong type, and non-JSON bytes. The stack's
--max-total-tokens is small, so the generations the fuzzer gets through stay short.
"""

from __future__ import annotations

import json
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = "s3cret-Key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ_EXAMPLES = int(os.environ.get("SPINDLE_FUZZ_EXAMPLES", "250"))


@pytest.fixture(scope="module")
def stack(start_launcher, tiny_model_dir: Path) -> Iterator:
    args = ["--api-key", KEY, "--max-total-tokens", "48", "--max-input-tokens", "40"]
    with start_launcher(tiny_model_dir, num_shard=1, args=args) as s:
        yield s


@pytest.fixture(scope="module")
def openapi(stack) -> dict[str, Any]:
    r = requests.get(f"{stack.base_url}/openapi.json", timeout=10)  # open, like /health
    assert r.status_code == 200
    return r.json()


def assert_json_error(r: requests.Response, context: object) -> None:
    """A 4xx whose body is JSON with `error` and `error_type` (nothing streamed)."""
    assert 400 <= r.status_code < 500, (context, r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (context, r.headers)
    body = r.json()
    assert "error" in body and isinstance(body.get("error_type"), str), (context, body)


# ------------------------------------------------------------------------------------------------ auth


def test_the_key_guards_every_inference_route_and_never_shows(stack, openapi):
    guarded = [(path, m.upper()) for path, ops in openapi["paths"].items() for m, op in ops.items()
               if op.get("security")]
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize",
            "/chat_tokenize", "/invocations", "/"} == {p for p, m in guarded if m == "POST"}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, method in guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = requests.request(method, f"{stack.base_url}{path}", json=chat, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert_json_error(r, path)
    ok = requests.post(f"{stack.base_url}/chat_tokenize", json=chat, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["tokenize_response"]
    for path in ("/health", "/metrics", "/info", "/openapi.json", "/v1/models"):  # documented as open
        assert requests.get(f"{stack.base_url}{path}", timeout=10).status_code == 200, path
    assert KEY not in requests.get(f"{stack.base_url}/info", timeout=10).text
    assert KEY not in stack.log_text()
    for pid in stack.known_pids:  # nor on any command line of the stack (ps shows them)
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


# --------------------------------------------------------------------------- 4xx before any stream byte

CHAT_OK = [{"role": "user", "content": "hi"}]
INVALID = [
    ("/generate_stream", {"inputs": "x", "parameters": {"top_p": 1.0}}),
    ("/generate_stream", {"inputs": 5}),
    ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 100_000}}),
    ("/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}),
    ("/generate_stream", {"parameters": {}}),
    ("/", {"inputs": "x", "stream": True, "parameters": {"top_k": "a"}}),
    ("/v1/chat/completions", {"messages": [], "stream": True}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"content": "x"}], "stream": True}),
    ("/v1/chat/completions", {"messages": "hi", "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "video"}]}], "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT_OK, "max_tokens": "ten", "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT_OK, "max_tokens": 100_000, "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT_OK, "stream": "yes"}),
    ("/v1/completions", {"prompt": 5, "stream": True}),
    ("/v1/completions", {"prompt": [], "stream": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 100_000, "stream": True}),
    ("/invocations", {"messages": [], "stream": True}),
    ("/invocations", {"neither": 1}),
    ("/tokenize", {"inputs": 5}),
    ("/chat_tokenize", {"messages": []}),
]


@pytest.mark.parametrize("path,body", INVALID, ids=[f"{p}:{json.dumps(b)[:40]}" for p, b in INVALID])
def test_invalid_requests_answer_4xx_json_before_any_stream_byte(stack, path, body):
    r = requests.post(f"{stack.base_url}{path}", json=body, headers=AUTH, timeout=30)
    assert_json_error(r, (path, body))


def test_bodies_that_are_not_json(stack):
    url = f"{stack.base_url}/generate_stream"
    r = requests.post(url, data=b'{"inputs": "x",', headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_json"
    r = requests.post(url, data=b"inputs=x", headers={**AUTH, "Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type"


# --------------------------------------------------------------------------------------------- fuzzing

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
ANY_JSON = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool"]) | ANY_JSON,
        "content": st.text(alphabet=string.ascii_lowercase + " ", max_size=20) | ANY_JSON
        | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | ANY_JSON},
                                         optional={"text": st.text(max_size=10) | ANY_JSON}), max_size=2),
        "tool_calls": ANY_JSON,
    },
)
# What a schema's `{"type": "object"}` leaves open, shaped for the fields that matter.
_FIELD_OVERRIDES = {"messages": st.lists(_MESSAGE, max_size=3)}


def from_schema(schema: dict[str, Any], components: dict[str, Any], name: str = "") -> st.SearchStrategy:
    """Values for an OpenAPI schema: mostly of the declared shape, sometimes of any JSON type."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components, name)
    if name in _FIELD_OVERRIDES:
        return _FIELD_OVERRIDES[name] | ANY_JSON
    if "oneOf" in schema:
        typed = st.one_of([from_schema(s, components) for s in schema["oneOf"]])
    else:
        kind = schema.get("type")
        if kind == "object" and "properties" in schema:
            props = {k: from_schema(v, components, k) for k, v in schema["properties"].items()}
            required = {k: props.pop(k) for k in schema.get("required", []) if k in props}
            typed = st.fixed_dictionaries(required, optional=props)
        elif kind == "integer":
            typed = st.integers(min_value=-2, max_value=40) | st.integers()
        elif kind == "number":
            typed = st.floats(min_value=-1.0, max_value=3.0) | st.floats()
        elif kind == "boolean":
            typed = st.booleans()
        elif kind == "string":
            typed = st.text(alphabet=string.ascii_lowercase + " ", max_size=30) | st.text(max_size=30)
        elif kind == "array":
            typed = st.lists(from_schema(schema.get("items", {}), components), max_size=5)
        else:
            typed = ANY_JSON
    if schema.get("nullable"):
        typed = typed | st.none()
    return typed | ANY_JSON if name else typed  # a field of the wrong type, now and then


def post_routes(openapi: dict[str, Any]) -> list[tuple[str, st.SearchStrategy]]:
    components = openapi["components"]["schemas"]
    routes = []
    for path, ops in openapi["paths"].items():
        op = ops.get("post")
        if op is None:
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        routes.append((path, from_schema(schema, components) | ANY_JSON))
    return routes


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_stays_healthy(stack, openapi, metrics_of):
    routes = post_routes(openapi)
    assert len(routes) == 8
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        path, bodies = data.draw(st.sampled_from(routes), label="route")
        if data.draw(st.integers(0, 19), label="raw") == 0:
            raw = data.draw(st.binary(max_size=40), label="bytes")
        else:
            raw = json.dumps(data.draw(bodies, label="body")).encode()
        r = requests.post(f"{stack.base_url}{path}", data=raw, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert_json_error(r, (path, raw[:300]))
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            for line in r.content.split(b"\n"):
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    json.loads(line[len(b"data:"):])  # every event is JSON

    start = time.monotonic()
    fuzz()
    print(f"fuzz: {sum(seen.values())} requests in {time.monotonic() - start:.0f}s, statuses {sorted(seen.items())}")
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0  # both kinds reached
    assert stack.health_status() == 200
    deadline = time.monotonic() + 30
    while metrics_of(stack.base_url)["spindle_kv_blocks_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics_of(stack.base_url)["spindle_kv_blocks_used"] == 0
    r = requests.post(f"{stack.base_url}/generate", headers=AUTH, timeout=60,
                      json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["generated_text"] is not None
