"""The remaining routes and response details: headers, best_of, /tokenize, /info, /metrics, /openapi.json."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from spindle_router.api.app import route_table

from tests.router.api_harness import MODEL_ID, start_server, write_tokenizer_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()


def _samples(server) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def test_generate_headers_and_details_shape(server):
    resp = requests.post(
        server.base_url + "/generate",
        json={"inputs": "hello", "parameters": {"max_new_tokens": 3}},
        timeout=10,
    )
    h = resp.headers
    assert h["x-compute-type"] == "gpu+optimized" and h["x-compute-characters"] == "5"
    assert h["x-prompt-tokens"] == "2" and h["x-generated-tokens"] == "3"
    for k in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert h[k].isdigit()
    assert float(h["x-compute-time"]) >= 0
    assert list(resp.json()) == ["generated_text"]  # no details unless asked


def test_best_of_picks_highest_mean_logprob(server):
    body = {
        "inputs": "hello",
        "parameters": {"best_of": 2, "do_sample": True, "max_new_tokens": 3, "details": True},
    }
    out = requests.post(server.base_url + "/generate", json=body, timeout=10).json()
    d = out["details"]
    others = d["best_of_sequences"]
    assert len(others) == 1 and len(server.backend.submitted) == 2
    assert {d["seed"], others[0]["seed"]} == {r.sampling.seed for r in server.backend.submitted}

    def mean(tokens):
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(d["tokens"]) >= mean(others[0]["tokens"])
    assert "top_tokens" not in d and d["prefill"] == []


def test_tokenize(server):
    out = requests.post(server.base_url + "/tokenize", json={"inputs": "hello über"}, timeout=10).json()
    assert out[0] == {"id": 1, "text": "", "start": 0, "stop": 0}
    assert "".join(t["text"] for t in out) == "hello über"
    assert out[-1]["stop"] == len("hello über".encode())


def test_info_models_openapi(server):
    info = requests.get(server.base_url + "/info", timeout=10).json()
    assert info["model_id"] == MODEL_ID
    assert (info["max_input_tokens"], info["max_total_tokens"], info["max_concurrent_requests"]) == (
        256,
        512,
        4,
    )
    models = requests.get(server.base_url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == MODEL_ID
    doc = requests.get(server.base_url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    for r in route_table():
        assert r.method.lower() in doc["paths"][r.path]
    for path in (
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/health",
    ):
        assert path in doc["paths"]
    assert requests.get(server.base_url + "/api-doc/openapi.json", timeout=10).json() == doc


def test_metrics_count_requests(server):
    before = _samples(server)
    url = server.base_url
    requests.post(url + "/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}, timeout=10)
    requests.post(
        url + "/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}, timeout=10
    )
    requests.post(
        url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    )
    requests.post(url + "/generate", json={"inputs": "a", "parameters": {"top_k": 0}}, timeout=10)
    after = _samples(server)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("tgi_request_count_total") == 4
    assert delta("tgi_request_success_total") == 3
    assert delta("tgi_request_failure_total[err=validation]") == 1
    assert delta("tgi_request_generated_tokens_count") == 3
    assert delta("tgi_request_duration_count") == 3
    assert delta("tgi_request_input_length_count") == 3
    resp = requests.get(url + "/metrics", timeout=10)
    assert resp.headers["Content-Type"].startswith("text/plain")
    # TGI's sample names (its Grafana dashboard queries them), not prometheus_client's `_total`/`_created`.
    assert "\ntgi_request_count " in resp.text and "\ntgi_request_success " in resp.text
    assert "tgi_request_count_total" not in resp.text and "_created" not in resp.text


def test_cors(server):
    resp = requests.options(
        server.base_url + "/generate",
        headers={"Origin": "http://a.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert resp.status_code == 200 and "POST" in resp.headers["Access-Control-Allow-Methods"]
    got = requests.get(server.base_url + "/info", headers={"Origin": "http://a.example"}, timeout=10)
    assert got.headers["Access-Control-Allow-Origin"] == "*"


def test_invocations_dispatch_by_shape(server):
    url = server.base_url + "/invocations"
    gen = requests.post(url, json={"inputs": "a", "parameters": {"max_new_tokens": 2}}, timeout=10).json()
    assert isinstance(gen, list) and gen[0]["generated_text"].startswith("a")  # compat: array, full text
    chat = requests.post(url, json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}, timeout=10)
    assert chat.json()["object"] == "chat.completion"
    comp = requests.post(url, json={"prompt": "a", "max_tokens": 2}, timeout=10)
    assert comp.json()["object"] == "text_completion"
    bad = requests.post(url, json={"foo": 1}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"


def test_request_id_is_echoed_on_json_sse_and_error_answers(server):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    given = requests.post(server.base_url + "/generate", json=body, headers={"x-request-id": "abc-1"}, timeout=10)
    assert given.status_code == 200 and given.headers["x-request-id"] == "abc-1"
    with requests.post(server.base_url + "/generate_stream", json=body, stream=True, timeout=10) as sse:
        assert sse.headers["Content-Type"].startswith("text/event-stream")
        fresh = sse.headers["x-request-id"]
        assert b"generated_text" in sse.content
    assert len(fresh) == 32 and fresh != "abc-1"
    bad = requests.post(server.base_url + "/generate", json={"inputs": ""}, headers={"x-request-id": "e"}, timeout=10)
    assert bad.status_code == 422 and bad.headers["x-request-id"] == "e"
    assert "x-request-id" not in requests.get(server.base_url + "/health", timeout=10).headers
