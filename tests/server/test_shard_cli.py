"""`spindle-server serve`: --help, a stale socket from a dead run, rank-prefixed logs, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile

import pytest
from spindle_proto import generate_pb2 as pb

from tests.helpers.tiny_model import TinyModelSpec, make_tiny_model
from tests.server.shard_harness import ShardGroup, _server_command

pytestmark = pytest.mark.slow


def test_help_lists_the_flags():
    out = subprocess.run(_server_command() + ["serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("MODEL_DIR", "--uds-path", "--dtype", "--kv-cache-bytes", "--cuda-memory-fraction", "--block-size",
                 "--cuda-graphs"):
        assert flag in out.stdout


def test_bad_model_dir_exits_nonzero_with_a_message(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(_server_command() + ["serve", str(tmp_path), "--uds-path", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "config.json" in out.stderr


def test_stale_socket_replaced_and_sigterm_stops_cleanly(tmp_path):
    path = make_tiny_model(tmp_path / "m", TinyModelSpec(num_layers=1, seed=3))
    stale_dir = tempfile.mkdtemp(prefix="spindle-stale-")
    prefix = os.path.join(stale_dir, "shard")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # left over by a dead shard: nobody listens
        s.bind(f"{prefix}-0")
    group = ShardGroup(path, uds_prefix=prefix)
    try:
        assert group.call("Info", pb.InfoRequest()).model_type == "llama"
        proc = group.procs[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"{prefix}-0")
        assert "[rank 0]" in group.log_text()
        assert group.log_text().count("CUDA graphs are off on cpu") == 1  # the default asks for them
    finally:
        group.close()
        os.rmdir(stale_dir)


def test_a_socket_another_process_listens_on_is_refused(tmp_path):
    """A second shard on a live prefix exits 1 with a clear error; the first one's socket stays."""
    path = make_tiny_model(tmp_path / "m", TinyModelSpec(num_layers=1, seed=3))
    live_dir = tempfile.mkdtemp(prefix="spindle-live-")
    prefix = os.path.join(live_dir, "shard")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(f"{prefix}-0")
            live.listen(8)
            out = subprocess.run(_server_command() + ["serve", str(path), "--uds-path", prefix],
                                 capture_output=True, text=True, timeout=180, env=env)
            assert out.returncode == 1, out.stderr[-2000:]
            assert f"{prefix}-0 is in use" in out.stderr
            assert os.path.exists(f"{prefix}-0")
            assert "Traceback" not in out.stderr  # one clear line, not a crash
    finally:
        if os.path.exists(f"{prefix}-0"):
            os.unlink(f"{prefix}-0")
        os.rmdir(live_dir)


def test_hub_id_is_served_at_the_given_revision(tmp_path, monkeypatch):
    """`serve owner/name --revision v1` loads that revision's snapshot from the Hugging Face cache."""
    from tests.helpers.hub_cache import add_snapshot, use_offline_cache

    cache = tmp_path / "cache"
    llama = make_tiny_model(tmp_path / "llama", TinyModelSpec(num_layers=1, seed=3))
    qwen2 = make_tiny_model(tmp_path / "qwen2", TinyModelSpec(arch="qwen2", num_layers=1, seed=4))
    add_snapshot(cache, "org/tiny", "a" * 40, llama, refs=("main",))
    add_snapshot(cache, "org/tiny", "b" * 40, qwen2, refs=("v1",))
    use_offline_cache(monkeypatch, cache)
    group = ShardGroup("org/tiny", extra_args=("--revision", "v1"))
    try:
        assert group.call("Info", pb.InfoRequest()).model_type == "qwen2"
        assert "resolved to" in group.log_text() and "b" * 40 in group.log_text()
    finally:
        group.close()
