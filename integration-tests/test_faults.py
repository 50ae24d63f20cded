"""Quiet faults on the real stack: a second instance on the same sockets, a shard that stops answering
(SIGSTOP), a client that stops reading, a client that leaves while queued.

What must hold: the second launcher is refused with a clear error and the first keeps its shard; a stale
socket of a dead instance is still cleaned; a stopped shard turns /health 503, ends the open stream with an
error event, and the launcher exits 1 leaving no process; a reader that falls behind is cancelled (logged)
and its KV blocks come back while other streams go on; a queued request whose client left is dropped at once.
Every wait here is bounded, and only processes these tests started are signalled, by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, launcher_argv

PROMPT = "the quick brown fox jumps over"  # its greedy continuation runs 1900 tokens without EOS


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len(b"data:"):]) for line in lines if line.startswith(b"data:")]


def shard_pids(stack) -> list[int]:
    return [p for p in stack.known_pids if b"spindle_server.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}")


def raw_stream(port: int, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """POST /generate_stream on a raw socket (optionally with a tiny receive buffer) and return it unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# ------------------------------------------------------------------------------------------------ sockets


def test_a_second_instance_on_the_same_sockets_is_refused(launcher, tiny_model_dir):
    socket_path = f"{launcher.uds_prefix}-0"
    assert os.path.exists(socket_path)
    argv = launcher_argv(tiny_model_dir, free_port(), launcher.uds_prefix, 1, [])
    second = subprocess.run(argv, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{socket_path} is in use" in second.stderr and "--shard-uds-path" in second.stderr
    assert "shard 0 started" not in second.stderr  # refused before anything started
    assert os.path.exists(socket_path)  # the first instance's socket is untouched ...
    r = requests.post(f"{launcher.base_url}/generate", timeout=60,
                      json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text  # ... and it still serves, through its own shard


# ----------------------------------------------------------------------------------------- slow readers


def test_a_reader_that_stops_reading_is_cancelled_and_its_blocks_freed(launcher, metrics_of):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1900, "details": True, "top_n_tokens": 5}}
    before = metrics_of(launcher.base_url)
    stalled = raw_stream(launcher.port, body, rcvbuf=4096)  # reads nothing from here on
    try:
        # Meanwhile another stream runs to its end at full speed: the stalled one slows nobody down.
        r = requests.post(f"{launcher.base_url}/generate_stream", stream=True, timeout=120,
                          json={"inputs": "hello world", "parameters": {"max_new_tokens": 40}})
        events = sse_events(r.iter_lines())
        assert r.status_code == 200 and "error" not in events[-1] and events[-1]["generated_text"] is not None
        wait_for(lambda: "left 1024 events unread" in launcher.log_text(), 180, "the slow reader cancelled")
        after = wait_for(lambda: (m := metrics_of(launcher.base_url))["spindle_kv_blocks_used"] == 0 and m,
                         30, "its KV blocks freed")
        assert after["tgi_batch_current_size"] == 0
    finally:
        stalled.close()

    def failures(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith("tgi_request_failure{"))

    # Its handler ends (and gives its admission permit back) once the client leaves.
    wait_for(lambda: failures(metrics_of(launcher.base_url)) - failures(before) == 1, 30, "the handler ended")
    assert launcher.health_status() == 200


# ------------------------------------------------------------------------------------ stalled shard


@pytest.mark.slow
def test_a_stopped_shard_fails_streams_turns_health_503_and_the_launcher_exits(start_launcher, tiny_model_dir,
                                                                               metrics_of):
    prefix_dir = tempfile.mkdtemp(prefix="spindle-it-", dir="/tmp")
    prefix = f"{prefix_dir}/stale"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what a killed instance leaves behind
    stale.bind(f"{prefix}-0")
    stale.close()
    args = ["--shard-uds-path", prefix, "--shard-timeout", "4", "--max-batch-size", "1"]
    try:
        _stall(start_launcher, tiny_model_dir, metrics_of, args)
    finally:
        shutil.rmtree(prefix_dir, ignore_errors=True)


def _stall(start_launcher, tiny_model_dir, metrics_of, args) -> None:
    with start_launcher(tiny_model_dir, num_shard=1, args=args) as stack:
        assert "removed stale socket" in stack.log_text()
        (shard,) = shard_pids(stack)
        running = requests.post(f"{stack.base_url}/generate_stream", stream=True, timeout=60,
                                json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1900}})
        lines = running.iter_lines()
        assert next(lines).startswith(b"data:")

        # A client that leaves while its request waits in the queue (max-batch-size 1) is dropped at once,
        # without waiting for a token or a keep-alive.
        dropped = 'tgi_request_failure{err="dropped"}'
        queued = raw_stream(stack.port, {"inputs": "hello", "parameters": {"max_new_tokens": 5}})
        wait_for(lambda: metrics_of(stack.base_url)["tgi_queue_size"] == 1, 30, "the second request queued")
        queued.close()
        wait_for(lambda: metrics_of(stack.base_url).get(dropped, 0) == 1 and
                 metrics_of(stack.base_url)["tgi_queue_size"] == 0, 10, "the queued request dropped")

        events: list[dict] = []
        reader = threading.Thread(target=lambda: events.extend(sse_events(lines)), daemon=True)
        reader.start()
        stopped_at = time.monotonic()
        os.kill(shard, signal.SIGSTOP)  # alive, holding its socket, answering nothing
        wait_for(lambda: stack.health_status(timeout_s=2.0) == 503, 30, "/health 503")
        reader.join(timeout=60)
        assert not reader.is_alive(), "the open stream never ended"
        assert events and "error" in events[-1] and "Shard stalled" in events[-1]["error"], events[-1:]
        assert events[-1]["error_type"] == "generation"
        assert all("error" not in e for e in events[:-1])
        assert stack.proc.wait(timeout=90) == 1
        took = time.monotonic() - stopped_at
        log = stack.log_text()
        assert "did not answer Step within 4.0s" in log
        assert "router exited (exit code 1)" in log
        assert stack.leftover_pids() == [], log[-3000:]
        print(f"stalled shard: stream ended, /health 503 and the launcher exited 1 within {took:.1f}s")
