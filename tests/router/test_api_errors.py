"""Bad requests get a JSON error with the right status and nothing changes: a table of malformed requests,
admission (429), auth (401), and the server still answers normally afterwards."""

from __future__ import annotations

import json
import threading

import pytest
import requests
from spindle_router.config import LimitsConfig

from tests.router.api_harness import start_server, write_tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()


V = "Input validation error: "
G = "/generate"


def p(**params):
    return {"inputs": "hello world", "parameters": params}


# (path, body (dict -> JSON, bytes -> raw), content type, status, error_type, message substring)
CASES = [
    (G, b"{not json", "application/json", 400, "invalid_json", "Failed to parse the request body as JSON"),
    (G, b"\xff\xfe", "application/json", 400, "invalid_json", "Failed to parse"),
    (
        G,
        b'{"inputs": "a", "parameters": {"temperature": NaN}}',
        "application/json",
        400,
        "invalid_json",
        "NaN",
    ),
    (G, {"inputs": "x"}, "text/plain", 415, "unsupported_media_type", "Content-Type: application/json"),
    (G, {"inputs": "x"}, None, 415, "unsupported_media_type", "Content-Type"),
    (G, {"inputs": "x" * 200_000}, "application/json", 413, "payload_too_large", "larger than the limit"),
    (G, {}, "application/json", 422, "validation", "missing field `inputs`"),
    (G, [1, 2], "application/json", 422, "validation", "expected a map"),
    (G, {"inputs": 5}, "application/json", 422, "validation", "inputs: invalid type: integer `5`"),
    (
        G,
        {"inputs": "x", "parameters": None},
        "application/json",
        422,
        "validation",
        "parameters: invalid type: null",
    ),
    (G, p(top_k="3"), "application/json", 422, "validation", "parameters.top_k: invalid type: string"),
    (
        G,
        p(max_new_tokens=-1),
        "application/json",
        422,
        "validation",
        "parameters.max_new_tokens: invalid value",
    ),
    (G, p(max_new_tokens=2.5), "application/json", 422, "validation", "floating point `2.5`"),
    (G, p(stop=None), "application/json", 422, "validation", "parameters.stop: invalid type: null"),
    (G, p(stop="x"), "application/json", 422, "validation", "parameters.stop"),
    (G, p(do_sample=None), "application/json", 422, "validation", "parameters.do_sample: invalid type: null"),
    (G, p(details="yes"), "application/json", 422, "validation", "parameters.details"),
    (G, p(seed=-3), "application/json", 422, "validation", "parameters.seed"),
    (
        G,
        p(grammar={"type": "xml", "value": "a"}),
        "application/json",
        422,
        "validation",
        "unknown variant `xml`",
    ),
    (G, p(do_sample=False, best_of=2), "application/json", 422, "validation", V + "you must use sampling"),
    (
        G,
        p(best_of=3, do_sample=True),
        "application/json",
        422,
        "validation",
        V + "`best_of` must be > 0 and <= 2",
    ),
    (
        G,
        p(temperature=0),
        "application/json",
        422,
        "validation",
        V + "`temperature` must be strictly positive",
    ),
    (G, p(repetition_penalty=0), "application/json", 422, "validation", V + "`repetition_penalty` must be"),
    (
        G,
        p(frequency_penalty=2.5),
        "application/json",
        422,
        "validation",
        V + "`frequency_penalty` must be >= -2.0",
    ),
    (G, p(top_p=1.0), "application/json", 422, "validation", V + "`top_p` must be > 0.0 and < 1.0"),
    (G, p(top_p=0), "application/json", 422, "validation", V + "`top_p` must be > 0.0 and < 1.0"),
    (G, p(typical_p=1.5), "application/json", 422, "validation", V + "`typical_p` must be > 0.0 and < 1.0"),
    (G, p(top_k=0), "application/json", 422, "validation", V + "`top_k` must be strictly positive"),
    (
        G,
        p(max_new_tokens=0),
        "application/json",
        422,
        "validation",
        V + "`max_new_tokens` must be strictly positive",
    ),
    (
        G,
        p(stop=["a"] * 5),
        "application/json",
        422,
        "validation",
        V + "`stop` supports up to 4 stop sequences. Given: 5",
    ),
    (
        G,
        p(best_of=2, seed=1, do_sample=True),
        "application/json",
        422,
        "validation",
        V + "`seed` must not be set",
    ),
    (
        G,
        p(top_n_tokens=6),
        "application/json",
        422,
        "validation",
        V + "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
    ),
    (G, {"inputs": ""}, "application/json", 422, "validation", V + "`inputs` cannot be empty"),
    (
        G,
        p(truncate=0),
        "application/json",
        422,
        "validation",
        V + "`truncate` must be strictly positive and less than 256",
    ),
    (G, p(truncate=300), "application/json", 422, "validation", "Given: 300"),
    (
        G,
        p(max_new_tokens=510),
        "application/json",
        422,
        "validation",
        V
        + "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 3 `inputs` tokens and 510 `max_new_tokens`",
    ),
    (
        G,
        {"inputs": "hello " * 300},
        "application/json",
        422,
        "validation",
        V + "`inputs` must have less than 256 tokens. Given: 302",
    ),
    (
        G,
        p(grammar={"type": "regex", "value": "[a-"}),
        "application/json",
        422,
        "validation",
        V + "grammar is not valid: ",
    ),
    ("/generate_stream", p(top_k="a"), "application/json", 422, "validation", "parameters.top_k"),
    (
        "/",
        {"inputs": "x", "stream": None},
        "application/json",
        422,
        "validation",
        "stream: invalid type: null",
    ),
    ("/tokenize", {"parameters": {}}, "application/json", 422, "validation", "missing field `inputs`"),
    ("/nope", {"inputs": "x"}, "application/json", 404, "not_found", "Not Found"),
    ("/info", {"inputs": "x"}, "application/json", 405, "method_not_allowed", "Method Not Allowed"),
    (
        "/v1/completions",
        {"prompt": "x", "suffix": "y"},
        "application/json",
        422,
        "suffix not supported",
        "Suffix is not supported",
    ),
    (
        "/v1/completions",
        {"prompt": ["a"] * 5},
        "application/json",
        422,
        "batch size exceeded",
        "maximum allowed batch size of 4",
    ),
    ("/v1/completions", {"prompt": []}, "application/json", 422, "validation", "non-empty"),
    (
        "/v1/completions",
        {"prompt": "x", "temperature": -1},
        "application/json",
        422,
        "validation",
        V + "`temperature`",
    ),
    (
        "/v1/chat/completions",
        {"model": "tgi"},
        "application/json",
        422,
        "validation",
        "missing field `messages`",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": None}]},
        "application/json",
        422,
        "validation",
        "MessageBody",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"content": "x"}]},
        "application/json",
        422,
        "validation",
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}},
        "application/json",
        422,
        "validation",
        "`logit_bias` values must be >= -100 and <= 100",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": None},
        "application/json",
        422,
        "validation",
        "stream",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "application/json",
        422,
        "validation",
        "unknown variant `audio`",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_p": 1.0},
        "application/json",
        422,
        "validation",
        "`top_p`",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "g",
        },
        "application/json",
        422,
        "tool_error",
        "Tool error: Tool with name g not found",
    ),
]


@pytest.mark.parametrize(
    "path,body,ctype,status,error_type,message", CASES, ids=[f"{i}:{c[0]}" for i, c in enumerate(CASES)]
)
def test_malformed_request(server, path, body, ctype, status, error_type, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": ctype} if ctype else {}
    resp = requests.post(server.base_url + path, data=data, headers=headers, timeout=10)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    payload = resp.json()
    assert payload["error_type"] == error_type
    text = payload["error"]["message"] if path.startswith("/v1/") else payload["error"]
    assert message in text
    if path.startswith("/v1/"):  # OpenAI shape plus TGI's error_type
        assert payload["error"]["type"] == error_type and payload["error"]["code"] == status
    assert server.backend.submitted == []  # nothing reached the backend
    ok = requests.post(server.base_url + "/generate", json=p(max_new_tokens=2), timeout=10)
    assert ok.status_code == 200 and ok.json()["generated_text"]


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_unknown_fields_are_ignored(server):
    resp = requests.post(
        server.base_url + "/generate",
        json={"inputs": "hi", "extra": 1, "parameters": {"max_new_tokens": 2, "whatever": [1]}},
        timeout=10,
    )
    assert resp.status_code == 200


def test_overload_is_immediate_429(server):
    """4 permits: 4 requests held at the backend, the 5th is refused at once, then all finish."""
    server.call(lambda: setattr(server.backend, "gate", __import__("asyncio").Event()))
    results: list[int] = []

    def post():
        results.append(
            requests.post(server.base_url + "/generate", json=p(max_new_tokens=2), timeout=20).status_code
        )

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    # wait until all four were submitted (validated and holding permits)
    for _ in range(200):
        if server.call(lambda: len(server.backend.submitted)) == 4:
            break
        threading.Event().wait(0.02)
    refused = requests.post(server.base_url + "/generate", json=p(max_new_tokens=2), timeout=10)
    assert refused.status_code == 429
    assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    streamed = requests.post(server.base_url + "/generate_stream", json=p(max_new_tokens=2), timeout=10)
    # TGI answers 200 and an error event; we answer before the stream, so clients and proxies see a failure
    assert streamed.status_code == 429 and streamed.headers["content-type"].startswith("application/json")
    assert streamed.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    server.call(lambda: server.backend.gate.set())
    for t in threads:
        t.join(20)
    assert results == [200] * 4
    assert server.call(lambda: server.backend and len(server.backend.submitted)) == 4
    failures = server.metrics.request_failure.labels(err="overloaded")._value.get()
    assert failures == 2


def test_best_of_takes_one_permit_per_sequence(model_dir):
    s = start_server(
        model_dir, limits=LimitsConfig(max_concurrent_requests=1, max_input_tokens=64, max_total_tokens=128)
    )
    try:
        body = p(best_of=2, do_sample=True, max_new_tokens=2)
        resp = requests.post(s.base_url + "/generate", json=body, timeout=10)
        assert resp.status_code == 429
    finally:
        s.stop()


def test_api_key(model_dir):
    s = start_server(model_dir, api_key="Secret")
    try:
        url = s.base_url
        assert requests.post(url + "/generate", json=p(max_new_tokens=1), timeout=10).status_code == 401
        bad = requests.post(
            url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}
        )
        assert bad.status_code == 401 and bad.json()["error_type"] == "unauthorized"
        # the whole header compares case-insensitively, as TGI does
        ok = requests.post(
            url + "/generate", json=p(max_new_tokens=1), headers={"Authorization": "bearer SECRET"}
        )
        assert ok.status_code == 200
        for free in ("/health", "/info", "/metrics", "/v1/models"):
            assert requests.get(url + free, timeout=10).status_code == 200
    finally:
        s.stop()


def test_generation_errors(server):
    server.call(lambda: setattr(server.backend.knobs, "fail_after", 1))
    resp = requests.post(server.base_url + "/generate", json=p(max_new_tokens=4), timeout=10)
    assert resp.status_code == 424
    assert resp.json() == {
        "error": "Request failed during generation: Server error: the test double failed",
        "error_type": "generation",
    }
    server.call(lambda: setattr(server.backend.knobs, "fail_after", None))
    server.call(lambda: setattr(server.backend.knobs, "incomplete", True))
    resp = requests.post(server.base_url + "/generate", json=p(max_new_tokens=4), timeout=10)
    assert resp.status_code == 500
    assert resp.json() == {"error": "Incomplete generation", "error_type": "incomplete_generation"}
    resp = requests.post(server.base_url + "/generate_stream", json=p(max_new_tokens=2), timeout=10)
    assert resp.content.endswith(
        b'data: {"error":"Incomplete generation stream","error_type":"incomplete_generation_stream"}\n\n'
    )


def test_health(server):
    assert requests.get(server.base_url + "/health", timeout=10).content == b""
    server.call(lambda: setattr(server.backend.knobs, "healthy", False))
    for path in ("/health", "/"):
        resp = requests.get(server.base_url + path, timeout=10)
        assert resp.status_code == 503
        assert resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}
