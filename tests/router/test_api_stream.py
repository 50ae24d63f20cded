"""SSE at the byte level, in-stream errors, keep-alive, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest
import requests
from spindle_router.api.streaming import with_keepalive

from tests.router.api_harness import start_server, write_tokenizer_dir

FRAME = re.compile(rb"data: ([^\n]+)\n\n")


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


def frames(raw: bytes) -> list[bytes]:
    """Split an SSE body into `data:` payloads, asserting nothing else is in it."""
    found = FRAME.findall(raw)
    assert b"".join(b"data: " + f + b"\n\n" for f in found) == raw, raw
    return found


def test_generate_stream_bytes(server):
    resp = requests.post(
        server.base_url + "/generate_stream",
        json={
            "inputs": "hello world",
            "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 1},
        },
        timeout=10,
    )
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["x-compute-characters"] == "11" and "x-compute-type" in resp.headers
    events = [json.loads(f) for f in frames(resp.content)]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert all(list(e) == ["index", "token", "top_tokens", "generated_text", "details"] for e in events)
    assert [e["generated_text"] for e in events[:2]] == [None, None]
    assert events[2]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[0]["details"] is None
    assert events[2]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 3,
        "seed": None,
        "input_length": len(server.backend.submitted[-1].input_ids),
    }
    assert b"[DONE]" not in resp.content


def test_stream_without_details_and_compat_full_text(server):
    resp = requests.post(
        server.base_url + "/", json={"inputs": "abc", "stream": True, "parameters": {}}, timeout=10
    )
    events = [json.loads(f) for f in frames(resp.content)]
    assert all(e["details"] is None for e in events) and "top_tokens" not in events[0]
    # POST / defaults return_full_text to true: the prompt leads the final text
    assert events[-1]["generated_text"].startswith("abc")


@pytest.mark.parametrize(
    "params,message",
    [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
        ({"best_of": 0}, "`best_of` != 1 is not supported when streaming tokens"),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ],
)
def test_stream_validation_errors_come_before_the_stream(server, params, message):
    """TGI answers 200 and an error event; HTTP clients and proxies count that as a success. We answer 422."""
    resp = requests.post(
        server.base_url + "/generate_stream", json={"inputs": "x", "parameters": params}, timeout=10
    )
    assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {"error": "Input validation error: " + message, "error_type": "validation"}
    assert server.backend.submitted == []


def test_openai_stream_bytes_and_error(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    resp = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=10)
    found = frames(resp.content)
    assert found[-1] == b"[DONE]"
    chunks = [json.loads(f) for f in found[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == "" and c["usage"] is None for c in chunks
    )
    bad = requests.post(
        server.base_url + "/v1/chat/completions", json={**body, "max_tokens": 100_000}, timeout=10
    )
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"  # before the stream
    err = bad.json()["error"]
    assert err["code"] == 422 and err["type"] == "validation"
    assert err["message"].startswith(
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512"
    )


def test_streamed_completions_keep_eos_token(server):
    server.call(lambda: setattr(server.backend.knobs, "eos_at", 2))
    resp = requests.post(
        server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}, timeout=10
    )
    chunks = [json.loads(f) for f in frames(resp.content)[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["", "eos_token"]  # TGI quirk
    assert chunks[-1]["choices"][0]["text"] == ""  # the EOS token's text is not streamed
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def _open_stream(server, path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": 400}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "stream": True},
        ),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 400, "stream": True}),
    ],
)
def test_client_disconnect_cancels_the_request(server, path, body):
    server.call(lambda: setattr(server.backend.knobs, "token_delay_s", 0.01))
    sock = _open_stream(server, path, body)
    sock.close()
    assert server.backend.cancel_seen.wait(10), "stream.cancel() was not called"
    n_streams = len(body["prompt"]) if "prompt" in body else 1
    for _ in range(200):
        if server.call(lambda: (len(server.backend.cancels), server.infer.in_flight)) == (n_streams, 0):
            break
        server.call(lambda: None)
    assert server.call(lambda: len(server.backend.cancels)) == n_streams
    assert server.call(lambda: server.infer.in_flight) == 0  # permits returned


def test_non_stream_disconnect_cancels_with_handler_cancellation(model_dir):
    s = start_server(model_dir, handler_cancellation=True)
    try:
        s.call(lambda: setattr(s.backend.knobs, "token_delay_s", 0.01))
        sock = socket.create_connection(("127.0.0.1", int(s.base_url.rsplit(":", 1)[1])), timeout=10)
        data = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 400}}).encode()
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        for _ in range(500):
            if s.call(lambda: len(s.backend.submitted)):
                break
        sock.close()
        assert s.backend.cancel_seen.wait(10)
        assert s.metrics.request_failure.labels(err="dropped")._value.get() == 1
    finally:
        s.stop()


def test_keepalive_ticks_and_close_closes_source():
    closed = []

    async def slow():
        try:
            await asyncio.sleep(0.2)
            yield "a"
            await asyncio.sleep(10)
            yield "b"
        finally:
            closed.append(True)

    async def run():
        out = []
        ka = with_keepalive(slow(), 0.02)
        async for item in ka:
            out.append(item)
            if item == "a":
                break
        await ka.aclose()
        return out

    out = asyncio.run(run())
    assert out[-1] == "a" and out.count(None) >= 3 and set(out[:-1]) == {None}
    assert closed == [True]
