"""`spindle-router`: the HTTP router in front of already running shards (the launcher starts it for you).

Every flag mirrors a field of spindle_router.config and, like TGI, falls back to the environment
variable of the same name in UPPER_SNAKE case (--max-input-tokens <- MAX_INPUT_TOKENS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from spindle_router.config import (
    HttpConfig,
    LimitsConfig,
    RouterConfig,
    SchedulerConfig,
    TelemetryConfig,
    env_default,
)

log = logging.getLogger("spindle_router.cli")


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


def positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {x}")
    return x


def non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {x}")
    return x


def _env(name: str, cast: Callable[[str], Any], default: Any) -> Any:
    """The env fallback for flag `name`, parsed with the flag's own type (a bad value fails at start-up)."""
    raw = env_default(name)
    if raw is None:
        return default
    try:
        return cast(raw)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"environment variable {name.upper().replace('-', '_')}={raw!r}: {e}") from None


def add_flag(group: Any, name: str, cast: Callable[[str], Any], default: Any, help: str,
             shown: str | None = None, from_env: bool = True, **kw: Any) -> None:
    """`--name` with the env fallback NAME; the help shows both (`shown` describes a None default)."""
    env = name.upper().replace("-", "_")
    shown = shown or ("none" if default is None else str(default))
    where = f"env {env}; " if from_env else ""
    group.add_argument(f"--{name}", type=cast, default=_env(name, cast, default) if from_env else default,
                       help=f"{help} [{where}default {shown}]", **kw)


def add_shard_timeout_flag(group: Any) -> None:
    add_flag(group, "shard-timeout", positive_float, None,
             "seconds any shard call may take before the shard counts as stalled: /health turns 503, open "
             "requests fail and the server exits 1", shown="10 x the call's cost as measured at warmup, at least 30")


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    d = LimitsConfig()
    g = p.add_argument_group("request limits (validation)")
    add_flag(g, "max-concurrent-requests", positive_int, d.max_concurrent_requests,
             "requests admitted at once; more get 429")
    add_flag(g, "max-best-of", positive_int, d.max_best_of, "largest best_of a request may ask")
    add_flag(g, "max-stop-sequences", int, d.max_stop_sequences, "most stop sequences per request")
    add_flag(g, "max-top-n-tokens", int, d.max_top_n_tokens, "most alternatives per token (top_n_tokens)")
    add_flag(g, "max-input-tokens", positive_int, None,
             "longest prompt in tokens", shown="max_total_tokens - 1")
    add_flag(g, "max-total-tokens", positive_int, None,
             "prompt + generated tokens of one request", shown="min(KV capacity, max_position_embeddings)")
    add_flag(g, "max-client-batch-size", positive_int, d.max_client_batch_size,
             "most inputs in one request (/embed-style lists, OpenAI completions prompts)")
    add_flag(g, "payload-limit", positive_int, d.payload_limit, "largest request body in bytes")
    add_flag(g, "validation-workers", positive_int, d.validation_workers, "tokenizer threads")


def add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    d = SchedulerConfig()
    g = p.add_argument_group("batching")
    add_flag(g, "max-batch-prefill-tokens", positive_int, d.max_batch_prefill_tokens,
             "prompt tokens one forward may prefill (longer prompts are chunked)")
    add_flag(g, "max-decode-slowdown", non_negative_float, d.max_decode_slowdown,
             "while requests decode, a step that also prefills may take at most this many times a decode-only "
             "step (its token budget comes from the step cost the shards measure at warmup), so a long prompt "
             "never stalls running streams; 0: every step may carry max-batch-prefill-tokens")
    add_flag(g, "max-batch-total-tokens", positive_int, None,
             "KV tokens the running batch may hold", shown="all the shards hold")
    add_flag(g, "max-batch-size", positive_int, None, "most requests in the running batch", shown="no limit")
    add_flag(g, "waiting-served-ratio", positive_float, d.waiting_served_ratio,
             "waiting/running ratio at or above which a step serves the queue at the full "
             "max-batch-prefill-tokens, lifting the max-decode-slowdown cap")
    add_flag(g, "max-waiting-tokens", int, d.max_waiting_tokens,
             "decode steps a waiting request may wait before it forces a prefill")
    add_flag(g, "prefix-caching", parse_bool, d.prefix_caching, "reuse KV blocks of shared prompt prefixes",
             metavar="BOOL")


def add_telemetry_flags(p: argparse.ArgumentParser) -> None:
    d = TelemetryConfig()
    g = p.add_argument_group("observability")
    add_flag(g, "otlp-endpoint", str, None, "export OpenTelemetry spans over OTLP/gRPC to this URL")
    add_flag(g, "otlp-service-name", str, d.otlp_service_name, "service.name of the exported spans")
    add_flag(g, "json-output", parse_bool, False, "log JSON lines instead of text", nargs="?", const=True,
             metavar="BOOL")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spindle-router",
        description=(
            "Spindle router: TGI- and OpenAI-compatible HTTP API with continuous batching, in front of shards "
            "already listening on unix://SHARD_UDS_PATH-0 .. -(NUM_SHARD-1) (see `spindle-server serve`). "
            "It warms the shards up, derives the token limits from the KV cache they hold, and serves "
            "until SIGTERM/SIGINT, then drains. Most people run `spindle-launcher`, which starts both."
        ),
    )
    g = p.add_argument_group("model and shards")
    add_flag(g, "model-id", str, None, "the model name /info and the OpenAI routes report", shown="required")
    add_flag(g, "model-dir", str, None,
             "local directory with tokenizer.json and tokenizer_config.json", shown="--model-id")
    add_flag(g, "shard-uds-path", str, RouterConfig.shard_uds_path, "shard socket prefix")
    add_flag(g, "num-shard", positive_int, RouterConfig.num_shard, "number of shards (tensor-parallel ranks)")
    add_shard_timeout_flag(g)
    h = p.add_argument_group("HTTP")
    # Not read from HOSTNAME: shells and container runtimes set it to the machine's name.
    add_flag(h, "hostname", str, HttpConfig.hostname, "address to listen on", from_env=False)
    add_flag(h, "port", int, 3000, "port to listen on")
    add_flag(h, "api-key", str, None, "require `Authorization: Bearer KEY` on the inference routes")
    h.add_argument("--cors-allow-origin", action="append", default=None,
                   help="allowed CORS origin (repeatable) [env CORS_ALLOW_ORIGIN, comma-separated]")
    add_flag(h, "graceful-termination-timeout", positive_float, 90.0,
             "seconds in-flight requests get to finish after SIGTERM/SIGINT")
    add_limit_flags(p)
    add_scheduler_flags(p)
    add_telemetry_flags(p)
    return p


def config_from_args(ns: argparse.Namespace) -> RouterConfig:
    """The frozen config for parsed flags; ValueError with the reason when they do not fit together."""
    if not ns.model_id:
        raise ValueError("--model-id is required (or MODEL_ID)")
    cors = ns.cors_allow_origin
    if cors is None:
        cors = [o for o in (env_default("cors_allow_origin") or "").split(",") if o]
    return RouterConfig(
        model_id=ns.model_id,
        model_dir=ns.model_dir or ns.model_id,
        shard_uds_path=ns.shard_uds_path,
        num_shard=ns.num_shard,
        shard_timeout_s=ns.shard_timeout,
        limits=LimitsConfig(
            max_concurrent_requests=ns.max_concurrent_requests,
            max_best_of=ns.max_best_of,
            max_stop_sequences=ns.max_stop_sequences,
            max_top_n_tokens=ns.max_top_n_tokens,
            max_input_tokens=ns.max_input_tokens,
            max_total_tokens=ns.max_total_tokens,
            max_client_batch_size=ns.max_client_batch_size,
            payload_limit=ns.payload_limit,
            validation_workers=ns.validation_workers,
        ),
        scheduler=SchedulerConfig(
            max_batch_prefill_tokens=ns.max_batch_prefill_tokens,
            max_decode_slowdown=ns.max_decode_slowdown,
            max_batch_total_tokens=ns.max_batch_total_tokens,
            max_batch_size=ns.max_batch_size,
            waiting_served_ratio=ns.waiting_served_ratio,
            max_waiting_tokens=ns.max_waiting_tokens,
            prefix_caching=ns.prefix_caching,
        ),
        http=HttpConfig(hostname=ns.hostname, port=ns.port, api_key=ns.api_key, cors_allow_origin=tuple(cors)),
        telemetry=TelemetryConfig(
            otlp_endpoint=ns.otlp_endpoint, otlp_service_name=ns.otlp_service_name, json_output=ns.json_output
        ),
    )


def router_argv(config: RouterConfig, drain_timeout_s: float) -> list[str]:
    """Flags that make `spindle-router` rebuild `config` (the launcher's way of starting it). The API key is
    left out on purpose: it travels in the environment (API_KEY), where `ps` does not show it."""
    lim, s, t = config.limits, config.scheduler, config.telemetry
    values: dict[str, Any] = {
        "model-id": config.model_id,
        "model-dir": config.model_dir,
        "shard-uds-path": config.shard_uds_path,
        "num-shard": config.num_shard,
        "shard-timeout": config.shard_timeout_s,
        "hostname": config.http.hostname,
        "port": config.http.port,
        "graceful-termination-timeout": drain_timeout_s,
        "max-concurrent-requests": lim.max_concurrent_requests,
        "max-best-of": lim.max_best_of,
        "max-stop-sequences": lim.max_stop_sequences,
        "max-top-n-tokens": lim.max_top_n_tokens,
        "max-input-tokens": lim.max_input_tokens,
        "max-total-tokens": lim.max_total_tokens,
        "max-client-batch-size": lim.max_client_batch_size,
        "payload-limit": lim.payload_limit,
        "validation-workers": lim.validation_workers,
        "max-batch-prefill-tokens": s.max_batch_prefill_tokens,
        "max-decode-slowdown": s.max_decode_slowdown,
        "max-batch-total-tokens": s.max_batch_total_tokens,
        "max-batch-size": s.max_batch_size,
        "waiting-served-ratio": s.waiting_served_ratio,
        "max-waiting-tokens": s.max_waiting_tokens,
        "prefix-caching": str(s.prefix_caching).lower(),
        "otlp-endpoint": t.otlp_endpoint,
        "otlp-service-name": t.otlp_service_name,
        "json-output": str(t.json_output).lower(),
    }
    argv = []
    for name, value in values.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    for origin in config.http.cors_allow_origin:
        argv += ["--cors-allow-origin", origin]
    return argv


def main(argv: list[str] | None = None) -> int:
    from spindle_router.logging import setup_logging
    from spindle_router.server import ConfigError, serve
    from spindle_router.shards import ShardError

    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(json_output=ns.json_output)
    try:
        config = config_from_args(ns)
    except ValueError as e:
        parser.error(str(e))
    try:
        asyncio.run(serve(config, drain_timeout_s=ns.graceful_termination_timeout))
    except (ConfigError, ShardError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("router failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
