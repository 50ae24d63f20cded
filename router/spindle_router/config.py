"""Every flag of the router and launcher, as frozen dataclasses. Environment variables are read here only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def env_default(name: str, default: str | None = None) -> str | None:
    """TGI reads every launcher flag from the environment variable of the same name in UPPER_SNAKE case."""
    return os.environ.get(name.upper().replace("-", "_"), default)


@dataclass(frozen=True)
class LimitsConfig:
    """Validation limits (TGI's defaults). Token limits left None are derived from the shards at warmup."""

    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000  # bytes
    validation_workers: int = 2
    disable_grammar_support: bool = False  # TGI's flag: `grammar`, `response_format` and `tools` answer 422

    def __post_init__(self) -> None:
        if self.max_concurrent_requests <= 0:
            raise ValueError("max_concurrent_requests must be > 0")
        if self.validation_workers <= 0:
            raise ValueError("validation_workers must be > 0")
        if (
            self.max_input_tokens is not None
            and self.max_total_tokens is not None
            and self.max_input_tokens >= self.max_total_tokens
        ):
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be < max_total_tokens ({self.max_total_tokens})"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int = 4096  # tokens one forward may prefill
    # A step prefilling beside decodes: at most this x a decode-only step. 1.6, not 2: the cost model is linear in
    # chunk tokens and some steps overshoot it (a chunk that lifts a step past 32 rows leaves the AMX tile
    # kernel); at 2.0 a 2000-token prompt beside 16 bf16 streams held their ITL p99 at 1.83-2.16x steady.
    max_decode_slowdown: float = 1.6
    max_batch_total_tokens: int | None = None  # KV tokens of the running batch; None: all the shards hold
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.3
    prefix_caching: bool = True
    # Send step N + 1 before absorbing step N's answer, so the shards never wait for the router to turn
    # an answer into events and plan (a request that finished on EOS costs one token computed past it).
    # Off by default: with two ranks under load a step once stalled (not yet understood).
    overlap_steps: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_prefill_tokens <= 0:
            raise ValueError("max_batch_prefill_tokens must be > 0")
        if self.max_batch_size is not None and self.max_batch_size <= 0:
            raise ValueError("max_batch_size must be > 0")
        if self.max_decode_slowdown and self.max_decode_slowdown < 1:
            raise ValueError("max_decode_slowdown must be 0 (off) or >= 1")


@dataclass(frozen=True)
class HttpConfig:
    hostname: str = "0.0.0.0"
    port: int = 3000
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()


@dataclass(frozen=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None
    otlp_service_name: str = "spindle.router"
    json_output: bool = False


@dataclass(frozen=True)
class RouterConfig:
    model_id: str  # what /info and the OpenAI routes report
    model_dir: str  # local directory with tokenizer.json and tokenizer_config.json
    shard_uds_path: str = "/tmp/spindle-server"  # shard rank r listens on unix://{path}-{r}
    num_shard: int = 1
    shard_timeout_s: float | None = None  # every shard call's deadline; None: derived from the step cost
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def shard_path(self, rank: int) -> str:
        return f"{self.shard_uds_path}-{rank}"
