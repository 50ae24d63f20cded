"""The real stack end to end: spindle-launcher -> shard processes + router, over HTTP.

Greedy output is compared with the tiny model's own argmax in transformers (float32), so these tests
fail on a wrong token, not only on a crash. The lifecycle tests check what the launcher promises:
SIGTERM drains and exits 0; a dead shard turns /health into 503, ends open streams with an error event,
and the launcher exits non-zero; either way no process of the stack is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.tiny_model import EOS_ID, load_reference

PROMPT = "the quick brown fox jumps over"


def reference_tokens(model_dir: Path, prompt: str, n: int) -> list[int]:
    """Greedy continuation by transformers, one argmax at a time (EOS allowed, as the server allows it)."""
    import torch

    model, tokenizer = load_reference(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(next_id)
            if next_id == EOS_ID:
                break
    return out


def generate_ids(base_url: str, prompt: str, n: int) -> list[int]:
    r = requests.post(f"{base_url}/generate", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": n, "details": True},
    })
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def sse_events(lines) -> list[dict]:
    """The JSON payloads of the `data:` lines of an SSE byte-line iterator."""
    return [json.loads(line[len(b"data:"):]) for line in lines if line.startswith(b"data:")]


def processes_of(stack) -> list[int]:
    """Live processes whose command line names the stack's own socket prefix (its shards and router)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if stack.uds_prefix.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> list[int]:
    return reference_tokens(tiny_model_dir, PROMPT, 12)


def test_generate_equals_transformers(launcher, expected):
    assert generate_ids(launcher.base_url, PROMPT, 12) == expected


def test_info_reports_the_dtype_and_device(launcher):
    info = requests.get(f"{launcher.base_url}/info", timeout=10).json()
    assert (info["model_dtype"], info["model_device_type"]) == ("float32", "cpu")


@pytest.mark.slow
def test_default_dtype_is_auto(start_launcher, tiny_model_dir):
    import torch
    from spindle_server.dtype import cpu_flags, resolve_dtype

    want, _ = resolve_dtype("auto", torch.device("cpu"), tiny_model_dir, cpu_flags())
    with start_launcher(tiny_model_dir, args=["--dtype", "auto"]) as stack:  # what no --dtype gives
        assert requests.get(f"{stack.base_url}/info", timeout=10).json()["model_dtype"] == want
        assert 1 <= len(generate_ids(stack.base_url, PROMPT, 6)) <= 6


def test_stream_and_openai_chat(launcher, expected):
    r = requests.post(f"{launcher.base_url}/generate_stream", stream=True, timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 12},
    })
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.iter_lines())
    assert [e["token"]["id"] for e in events] == expected
    assert events[-1]["generated_text"] is not None and all(e["generated_text"] is None for e in events[:-1])

    r = requests.post(f"{launcher.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tgi", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 5


@pytest.mark.slow
def test_two_shards_sigterm_drains_and_leaves_nothing(start_launcher, tiny_model_dir, expected):
    with start_launcher(tiny_model_dir, num_shard=2) as stack:
        assert generate_ids(stack.base_url, PROMPT, 12) == expected  # tensor parallel == single device
        stream = requests.post(f"{stack.base_url}/generate_stream", stream=True, timeout=60, json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 200},
        })
        lines = stream.iter_lines()  # one iterator: a second one would lose what the first buffered
        assert next(lines).startswith(b"data:")  # the request is running when the signal lands
        stack.proc.send_signal(signal.SIGTERM)
        rest = sse_events(lines)
        assert "error" not in rest[-1] and rest[-1]["details"] is None and rest[-1]["generated_text"] is not None
        assert len(rest) == 199  # every token arrived: the in-flight request was drained, not cut
        assert stack.proc.wait(timeout=60) == 0
        assert stack.leftover_pids() == []


@pytest.mark.slow
def test_dead_shard_means_503_error_event_and_nonzero_exit(start_launcher, tiny_model_dir):
    with start_launcher(tiny_model_dir, num_shard=1) as stack:
        shard_pids = [p for p in stack.known_pids if b"spindle_server.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(shard_pids) == 1
        assert set(shard_pids) < set(processes_of(stack))  # finds the shard and the router by their socket
        stream = requests.post(f"{stack.base_url}/generate_stream", stream=True, timeout=60, json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 1900},
        })
        lines = stream.iter_lines()
        assert next(lines).startswith(b"data:")
        events: list[dict] = []
        reader = threading.Thread(target=lambda: events.extend(sse_events(lines)))
        reader.start()
        signal_sent = time.monotonic()
        os.kill(shard_pids[0], signal.SIGKILL)
        statuses, seen_503_after = [], None
        while time.monotonic() - signal_sent < 5.0 and stack.proc.poll() is None:
            statuses.append(stack.health_status(timeout_s=1.0))
            if statuses[-1] == 503:
                seen_503_after = time.monotonic() - signal_sent
                break
            time.sleep(0.05)
        assert seen_503_after is not None and seen_503_after < 5.0, statuses  # 503, not a refused connection
        reader.join(timeout=30)
        assert not reader.is_alive()  # the stream ended (no hang on a dead shard)
        assert events and "error" in events[-1], events[-1:]
        assert events[-1]["error_type"] == "generation"
        assert all("error" not in e and e["generated_text"] is None for e in events[:-1])  # tokens, then the error
        assert stack.proc.wait(timeout=60) == 1
        log = stack.log_text()
        assert "shard 0 died (killed by SIGKILL)" in log
        assert stack.leftover_pids() == []
        assert processes_of(stack) == []  # nor any process of the stack it may have started later
