"""Every text-generation-launcher flag is known to spindle-launcher: implemented, refused with the reason, or
accepted with one logged line; their environment variables likewise."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from spindle_router import cli, launcher
from spindle_router.compat import TGI_COMPAT_FLAGS, Status
from spindle_router.flags import FLAGS, Scope

# text-generation-launcher's flags (launcher/src/main.rs, TGI v3).
TGI_LAUNCHER_FLAGS = """
model-id revision validation-workers sharded num-shard quantize speculate dtype kv-cache-dtype trust-remote-code
max-concurrent-requests max-best-of max-stop-sequences max-top-n-tokens max-input-tokens max-input-length
max-total-tokens waiting-served-ratio max-batch-prefill-tokens max-batch-total-tokens max-waiting-tokens
max-batch-size cuda-graphs hostname port prometheus-port shard-uds-path master-addr master-port
huggingface-hub-cache weights-cache-override disable-custom-kernels cuda-memory-fraction rope-scaling
rope-factor json-output otlp-endpoint otlp-service-name cors-allow-origin api-key watermark-gamma
watermark-delta ngrok ngrok-authtoken ngrok-edge tokenizer-config-path disable-grammar-support env
max-client-batch-size lora-adapters usage-stats payload-limit enable-prefill-logprobs
graceful-termination-timeout
""".split()


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _config(model_dir: Path, *extra: str) -> launcher.LauncherConfig:
    base = ["--model-id", str(model_dir), "--max-total-tokens", "20"]
    return launcher.config_from_args(launcher.build_parser().parse_args([*base, *extra]))


def test_every_tgi_launcher_flag_is_known():
    known = _options(launcher.build_parser())
    missing = [f for f in TGI_LAUNCHER_FLAGS if f"--{f}" not in known]
    assert not missing, f"unknown TGI flags: {missing}"
    assert {"-p", "-e", "-g"} <= known  # TGI's short forms
    help_text = launcher.build_parser().format_help()
    assert "TGI flags Spindle refuses" in help_text and "TGI flags accepted without effect" in help_text


def test_router_and_launcher_share_one_flag_table():
    router_opts, launcher_opts = cli.build_parser()._actions, launcher.build_parser()._actions
    by_dest = {a.dest: a for a in launcher_opts}
    for action in router_opts:
        if action.dest == "help" or action.dest == "model_dir":
            continue
        twin = by_dest[action.dest]
        assert (twin.type, twin.default) == (action.type, action.default), action.dest
    assert all(f.scope & Scope.LAUNCHER for f in FLAGS if f.name == "port")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "gptq"], "--quantize gptq: quantization gptq is not supported"),
        (["--speculate", "2"], "speculative decoding is not supported"),
        (["--lora-adapters", "a,b"], "LoRA adapters are not supported yet"),
        (["--kv-cache-dtype", "fp8_e5m2"], "KV cache dtype fp8_e5m2 is not supported"),
        (["--rope-factor", "2.0"], "overriding RoPE scaling is not supported"),
        (["--prometheus-port", "9000"], "Spindle serves /metrics on --port"),
        (["--ngrok"], "ngrok tunnels are not supported"),
        (["--max-input-length", "5", "--max-input-tokens", "6"], "set only one"),
        (["--sharded", "true"], "--sharded true needs --num-shard > 1"),
        (["--sharded", "false", "--num-shard", "2"], "contradicts --num-shard 2"),
    ],
)
def test_refused_flags_say_why(model_dir, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _config(model_dir, *extra)


def test_refusal_comes_from_the_environment_too_and_before_anything_starts(model_dir):
    env = {"QUANTIZE": "awq", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "spindle_router.launcher", "--model-id", str(model_dir)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "--quantize awq: quantization awq is not supported" in proc.stderr
    assert "starting" not in proc.stderr


def test_neutral_values_are_accepted_silently(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="spindle_launcher"):
        _config(model_dir, "--speculate", "0", "--ngrok", "false")
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_no_effect_flags_log_one_line_each(model_dir, caplog, monkeypatch):
    monkeypatch.setenv("USAGE_STATS", "off")
    no_effect = [c.name for c in TGI_COMPAT_FLAGS if c.status is Status.NO_EFFECT]
    with caplog.at_level(logging.INFO, logger="spindle_launcher"):
        parser_args = ["--trust-remote-code", "--max-waiting-tokens", "20", "--disable-custom-kernels",
                       "--watermark-gamma", "0.5", "--watermark-delta", "2",
                       "--enable-prefill-logprobs"]
        _config(model_dir, *parser_args)
    lines = [r.getMessage() for r in caplog.records if "has no effect here" in r.getMessage()]
    assert sorted(line.split()[0].removeprefix("--") for line in lines) == sorted(no_effect)


def test_implemented_tgi_flags_take_effect(model_dir):
    c = _config(model_dir, "--max-input-length", "7", "--cuda-memory-fraction", "0.5", "-p", "8099",
                "--num-shard", "2", "--sharded", "true", "--disable-grammar-support")
    assert c.router.limits.max_input_tokens == 7 and c.router.http.port == 8099 and c.router.num_shard == 2
    assert c.router.limits.disable_grammar_support is True
    assert _config(model_dir).router.limits.disable_grammar_support is False
    argv = launcher.Launcher(c)._shard_argv()
    assert argv[argv.index("--cuda-memory-fraction") + 1] == "0.5"
    assert "--block-size" not in argv  # the shards' default
    argv = launcher.Launcher(_config(model_dir, "--block-size", "256"))._shard_argv()
    assert argv[argv.index("--block-size") + 1] == "256"  # flash-attn's page size reaches the shards
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args(["--cuda-memory-fraction", "1.5"])


def test_env_flag_logs_the_runtime_and_is_not_read_from_ENV(monkeypatch, caplog):
    monkeypatch.setenv("ENV", "/etc/shrc")  # POSIX shells' variable, never taken for --env
    assert launcher.build_parser().parse_args([]).env is False
    assert launcher.build_parser().parse_args(["-e"]).env is True
    with caplog.at_level(logging.INFO, logger="spindle_launcher"):
        launcher.log_environment()
    assert any("runtime environment: python" in r.getMessage() for r in caplog.records)
