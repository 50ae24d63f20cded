"""`spindle-router`: the HTTP router in front of already running shards (the launcher starts it for you).

Every flag mirrors a field of spindle_router.config and, like TGI, falls back to the environment
variable of the same name in UPPER_SNAKE case (--max-input-tokens <- MAX_INPUT_TOKENS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from spindle_router.config import (
    HttpConfig,
    LimitsConfig,
    RouterConfig,
    SchedulerConfig,
    TelemetryConfig,
    env_default,
)
from spindle_router.flags import Scope, add_flags

log = logging.getLogger("spindle_router.cli")


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
    add_flags(p, Scope.ROUTER)
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
        shard_timeout_s=ns.shard_timeout,
        num_shard=ns.num_shard,
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
            disable_grammar_support=ns.disable_grammar_support,
        ),
        scheduler=SchedulerConfig(
            max_batch_prefill_tokens=ns.max_batch_prefill_tokens,
            max_decode_slowdown=ns.max_decode_slowdown,
            max_batch_total_tokens=ns.max_batch_total_tokens,
            max_batch_size=ns.max_batch_size,
            waiting_served_ratio=ns.waiting_served_ratio,
            prefix_caching=ns.prefix_caching,
            overlap_steps=ns.overlap_steps,
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
        "shard-timeout": config.shard_timeout_s,
        "num-shard": config.num_shard,
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
        "disable-grammar-support": str(lim.disable_grammar_support).lower(),
        "max-batch-prefill-tokens": s.max_batch_prefill_tokens,
        "max-decode-slowdown": s.max_decode_slowdown,
        "max-batch-total-tokens": s.max_batch_total_tokens,
        "max-batch-size": s.max_batch_size,
        "waiting-served-ratio": s.waiting_served_ratio,
        "prefix-caching": str(s.prefix_caching).lower(),
        "overlap-steps": str(s.overlap_steps).lower(),
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
