"""Flags of spindle-router / spindle-launcher: env fallbacks, the launcher -> router hand-off, logging."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from spindle_router import cli, launcher
from spindle_router.logging import JsonFormatter, TextFormatter


def test_env_fallback_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("MAX_INPUT_TOKENS", "77")
    monkeypatch.setenv("PREFIX_CACHING", "false")
    monkeypatch.setenv("HOSTNAME", "some-container-id")  # never taken as the listen address
    ns = cli.build_parser().parse_args(["--model-id", "m", "--max-total-tokens", "100"])
    config = cli.config_from_args(ns)
    assert config.limits.max_input_tokens == 77 and config.limits.max_total_tokens == 100
    assert config.scheduler.prefix_caching is False
    assert config.http.hostname == "0.0.0.0"
    ns = cli.build_parser().parse_args(["--model-id", "m", "--max-input-tokens", "5"])
    assert cli.config_from_args(ns).limits.max_input_tokens == 5  # the flag wins over the environment


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "zero")
    with pytest.raises(SystemExit, match="MAX_BATCH_SIZE='zero'"):
        cli.build_parser()


def test_router_argv_rebuilds_the_same_config():
    ns = cli.build_parser().parse_args([
        "--model-id", "org/model", "--model-dir", "/m", "--num-shard", "2", "--port", "9000",
        "--max-input-tokens", "10", "--max-total-tokens", "20", "--max-batch-size", "3",
        "--prefix-caching", "false", "--json-output", "--cors-allow-origin", "https://a",
        "--cors-allow-origin", "https://b", "--otlp-endpoint", "http://collector:4317",
    ])
    config = cli.config_from_args(ns)
    argv = cli.router_argv(config, drain_timeout_s=12.5)
    again = cli.build_parser().parse_args(argv)
    assert cli.config_from_args(again) == config
    assert again.graceful_termination_timeout == 12.5


def test_api_key_never_goes_on_the_command_line():
    ns = cli.build_parser().parse_args(["--model-id", "m", "--api-key", "s3cret"])
    assert "s3cret" not in cli.router_argv(cli.config_from_args(ns), 1.0)


def test_launcher_checks_flags_before_starting_anything(tmp_path: Path):
    with pytest.raises(ValueError, match="no such directory"):
        launcher.resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        launcher.resolve_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    args = ["--model-id", str(tmp_path), "--max-input-tokens", "10", "--max-total-tokens", "10"]
    proc = subprocess.run([sys.executable, "-m", "spindle_router.launcher", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "max_input_tokens (10) must be < max_total_tokens (10)" in proc.stderr
    assert "starting" not in proc.stderr  # no shard was spawned


def _record(msg: str, args: tuple = (), **extra) -> logging.LogRecord:
    record = logging.LogRecord("spindle_launcher.shard", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_log_formats():
    line = JsonFormatter().format(_record("hello %s", ("world",), rank=1))
    obj = json.loads(line)
    assert obj["message"] == "hello world" and obj["rank"] == 1 and obj["level"] == "WARNING"
    assert obj["target"] == "spindle_launcher.shard" and obj["timestamp"].endswith("Z")
    text = TextFormatter().format(_record("hello"))
    assert "WARN" in text and text.endswith("spindle_launcher.shard: hello")


def test_cuda_graphs_flag_reaches_the_shards(tmp_path: Path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    base = ["--model-id", str(tmp_path), "--max-input-tokens", "10", "--max-total-tokens", "20"]

    def shard_argv(*extra: str) -> list[str]:
        ns = launcher.build_parser().parse_args([*base, *extra])
        return launcher.Launcher(launcher.config_from_args(ns))._shard_argv()

    argv = shard_argv("--cuda-graphs", "8, 1,2,2")
    assert argv[argv.index("--cuda-graphs") + 1] == "1,2,8"
    argv = shard_argv("--cuda-graphs", "0")
    assert argv[argv.index("--cuda-graphs") + 1] == "0"
    assert "--cuda-graphs" not in shard_argv()  # the shards' own default (every size on CUDA)
    monkeypatch.setenv("CUDA_GRAPHS", "4,16")
    argv = shard_argv()
    assert argv[argv.index("--cuda-graphs") + 1] == "4,16"
    monkeypatch.delenv("CUDA_GRAPHS")
    for bad in ("1,x", "-1", "0,4"):
        with pytest.raises(SystemExit):
            launcher.build_parser().parse_args([*base, "--cuda-graphs", bad])


def test_revision_resolves_the_hub_id_and_reaches_the_shards_as_a_commit(tmp_path: Path, monkeypatch):
    from tests.helpers.hub_cache import add_snapshot, use_offline_cache

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    add_snapshot(tmp_path / "cache", "org/tiny", "a" * 40, src, refs=("main",))
    add_snapshot(tmp_path / "cache", "org/tiny", "b" * 40, src, refs=("v1",))
    use_offline_cache(monkeypatch, tmp_path / "cache")
    base = ["--model-id", "org/tiny", "--max-input-tokens", "10", "--max-total-tokens", "20"]

    def config(*extra: str) -> launcher.LauncherConfig:
        return launcher.config_from_args(launcher.build_parser().parse_args([*base, *extra]))

    c = config("--revision", "v1")
    assert Path(c.router.model_dir).name == "b" * 40 and (Path(c.router.model_dir) / "chat_template.jinja").is_file()
    argv = launcher.Launcher(c)._shard_argv()
    assert argv[4:7] == ["org/tiny", "--revision", "b" * 40]  # the commit, not the moving tag
    argv = launcher.Launcher(config())._shard_argv()
    assert argv[4:7] == ["org/tiny", "--revision", "a" * 40]
    with pytest.raises(ValueError, match="at revision 'nope'"):
        config("--revision", "nope")
    with pytest.raises(ValueError, match="applies to Hub ids"):
        launcher.resolve_model_dir(str(src), "v1")
    local = launcher.Launcher(launcher.config_from_args(launcher.build_parser().parse_args(
        ["--model-id", str(src), "--max-input-tokens", "10", "--max-total-tokens", "20"])))._shard_argv()
    assert "--revision" not in local and local[4] == str(src.resolve())
    # A cache given on the command line is where the shards look the id up too.
    c = config("--revision", "v1", "--huggingface-hub-cache", str(tmp_path / "cache"))
    assert launcher.Launcher(c)._shard_env(0)["HF_HUB_CACHE"] == str(tmp_path / "cache")
