"""The router process: connect to the shards, warm them up, derive the limits, serve HTTP, drain on exit.

    serve(config)
      tokenizer + chat template  <- model_dir
      ShardClient.connect(every rank) -> info -> warmup -> num_blocks
      resolve_limits(...)         TGI's defaults and argument rules (a clear error, nothing started)
      Scheduler(...).start(); build_app(...); listen on hostname:port       logs "Connected"
      SIGTERM / SIGINT            stop accepting, finish in-flight requests within the grace period,
                                  stop the scheduler, close the shards
      SIGUSR1                     the launcher saw a shard die: /health answers 503 from now on and the
                                  shard channels are closed so open streams end with an error event
      a shard stalls              a call missed its deadline (shards.CallDeadlines): the scheduler failed
                                  every request; /health answers 503 for STALL_LINGER_S, then the router
                                  exits 1 (the launcher stops the shards and exits 1 too)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from spindle_router.config import LimitsConfig, RouterConfig, SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.backend import Backend, RequestStream
from spindle_router.scheduler.request import ValidRequest

log = logging.getLogger("spindle_router.server")

CONNECT_TIMEOUT_S = 60.0
# After a shard stalled: how long /health keeps answering 503 (probes and load balancers see the failure as
# such, open streams flush their error event) before the router exits.
STALL_LINGER_S = 3.0


class ConfigError(ValueError):
    """Flags that cannot work together with what the shards reported; the message says which and why."""


@dataclass(frozen=True)
class ShardFacts:
    """What resolve_limits needs from Info and Warmup."""

    num_blocks: int
    block_size: int
    max_position_embeddings: int
    support_chunking: bool
    tokenizer_max_length: int | None = None  # tokenizer_config.json model_max_length, when sensible


@dataclass(frozen=True)
class ResolvedLimits:
    limits: LimitsConfig  # max_input_tokens and max_total_tokens set
    scheduler: SchedulerConfig  # max_batch_total_tokens set
    max_supported_total_tokens: int  # num_blocks * block_size


def resolve_limits(limits: LimitsConfig, sched: SchedulerConfig, facts: ShardFacts) -> ResolvedLimits:
    """TGI's derivation (launcher §7.3, router §5.6, shard §9.8) and its argument rules.

    max_total_tokens   default min(KV tokens the shards hold, max_position_embeddings, tokenizer max length)
    max_input_tokens   default max_total_tokens - 1
    max_batch_total    default (and upper bound) the KV tokens the shards hold
    """
    supported = facts.num_blocks * facts.block_size
    caps = [supported, facts.max_position_embeddings]
    if facts.tokenizer_max_length:
        caps.append(facts.tokenizer_max_length)
    max_total = limits.max_total_tokens
    if max_total is None:
        max_total = min(caps)
        if limits.max_input_tokens is not None and limits.max_input_tokens >= max_total:
            raise ConfigError(
                f"max_input_tokens ({limits.max_input_tokens}) must be < max_total_tokens, which defaults to "
                f"{max_total} here (min of KV capacity {supported}, max_position_embeddings "
                f"{facts.max_position_embeddings}); lower --max-input-tokens"
            )
    max_input = limits.max_input_tokens if limits.max_input_tokens is not None else max_total - 1
    if max_input < 1:
        raise ConfigError(f"max_input_tokens must be >= 1 (max_total_tokens is {max_total})")
    if max_input >= max_total:
        raise ConfigError(f"max_input_tokens ({max_input}) must be < max_total_tokens ({max_total})")
    if max_total > supported:
        raise ConfigError(
            f"Not enough memory to handle max_total_tokens={max_total}: the shards hold {supported} KV tokens "
            f"({facts.num_blocks} blocks of {facts.block_size}); lower --max-total-tokens or give the KV cache "
            "more memory (--kv-cache-bytes)"
        )
    if max_total > facts.max_position_embeddings:
        log.warning(
            "max_total_tokens=%d exceeds the model's max_position_embeddings=%d; quality past it depends on "
            "the model's rope scaling", max_total, facts.max_position_embeddings,
        )
    batch_total = sched.max_batch_total_tokens
    if batch_total is None:
        batch_total = supported
    elif batch_total > supported:
        raise ConfigError(
            f"max_batch_total_tokens ({batch_total}) exceeds the {supported} KV tokens the shards hold"
        )
    if max_total > batch_total:
        raise ConfigError(f"max_total_tokens ({max_total}) must be <= max_batch_total_tokens ({batch_total})")
    if sched.max_batch_prefill_tokens > batch_total:
        raise ConfigError(
            f"max_batch_prefill_tokens ({sched.max_batch_prefill_tokens}) must be <= max_batch_total_tokens "
            f"({batch_total})"
        )
    if not facts.support_chunking and max_input > sched.max_batch_prefill_tokens:
        raise ConfigError(
            f"max_input_tokens ({max_input}) must be <= max_batch_prefill_tokens "
            f"({sched.max_batch_prefill_tokens}) when the shards cannot prefill in chunks"
        )
    return ResolvedLimits(
        limits=dataclasses.replace(limits, max_input_tokens=max_input, max_total_tokens=max_total),
        scheduler=dataclasses.replace(sched, max_batch_total_tokens=batch_total),
        max_supported_total_tokens=supported,
    )


def check_static_limits(limits: LimitsConfig, sched: SchedulerConfig) -> None:
    """The rules that need no shard: checked before anything starts."""
    if limits.max_total_tokens is not None and sched.max_batch_total_tokens is not None:
        if limits.max_total_tokens > sched.max_batch_total_tokens:
            raise ConfigError(
                f"max_total_tokens ({limits.max_total_tokens}) must be <= max_batch_total_tokens "
                f"({sched.max_batch_total_tokens})"
            )
    if sched.max_batch_total_tokens is not None and sched.max_batch_prefill_tokens > sched.max_batch_total_tokens:
        raise ConfigError(
            f"max_batch_prefill_tokens ({sched.max_batch_prefill_tokens}) must be <= max_batch_total_tokens "
            f"({sched.max_batch_total_tokens})"
        )


def tokenizer_max_length(model_dir: Path) -> int | None:
    """model_max_length from tokenizer_config.json; transformers writes a huge sentinel when unknown."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 0 < value < 10**9 else None


class SupervisedBackend:
    """The scheduler as the HTTP layer sees it, plus a switch the launcher can throw (SIGUSR1) when it saw a
    shard die: from then on /health is 503 without waiting for the scheduler's next RPC to fail."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.shard_lost = False

    def submit(self, request: ValidRequest) -> RequestStream:
        return self._inner.submit(request)

    @property
    def is_healthy(self) -> bool:
        return not self.shard_lost and self._inner.is_healthy

    async def health_check(self) -> bool:
        return not self.shard_lost and await self._inner.health_check()


async def _connect_and_warm_up(config: RouterConfig) -> tuple[Any, Any, Any]:
    from spindle_router.shards import CallDeadlines, ShardClient

    paths = [config.shard_path(r) for r in range(config.num_shard)]
    log.info("connecting to %d shard(s): %s", len(paths), ", ".join(paths))
    shards = await ShardClient.connect(paths, CONNECT_TIMEOUT_S, CallDeadlines(override_s=config.shard_timeout_s))
    try:
        info = await shards.info()
        log.info(
            "shards: %s %s on %s, attention %s, block size %d, world size %d",
            info.model_type, info.dtype, info.device_type, info.attention_impl, info.block_size, info.world_size,
        )
        if info.world_size != config.num_shard:
            raise ConfigError(f"the shards report world size {info.world_size}, --num-shard is {config.num_shard}")
        s, lim = config.scheduler, config.limits
        warm = await shards.warmup(
            max_input_tokens=lim.max_input_tokens or 0,
            max_prefill_tokens=s.max_batch_prefill_tokens,
            max_total_tokens=lim.max_total_tokens or 0,
            max_batch_size=s.max_batch_size or 0,
        )
    except BaseException:
        await shards.close()
        raise
    return shards, info, warm


async def serve(config: RouterConfig, drain_timeout_s: float = 90.0) -> None:
    """Run the router until SIGTERM/SIGINT; in-flight requests get `drain_timeout_s` to finish."""
    from spindle_router.api import build_app
    from spindle_router.chat_template import ChatTemplate
    from spindle_router.scheduler.batcher import StepCost
    from spindle_router.scheduler.loop import Scheduler
    from spindle_router.telemetry import setup_tracing
    from spindle_router.tokenizer import RouterTokenizer

    check_static_limits(config.limits, config.scheduler)
    model_dir = Path(config.model_dir)
    tokenizer = RouterTokenizer(model_dir, num_workers=config.limits.validation_workers)
    chat_template = ChatTemplate.from_model_dir(model_dir, tokenizer.bos_token, tokenizer.eos_token)
    if chat_template is None:
        log.warning("%s has no chat template: /v1/chat/completions will answer 422", model_dir)
    tracer_provider = setup_tracing(config.telemetry)
    shards = None
    try:
        shards, info, warm = await _connect_and_warm_up(config)
        num_blocks = warm.num_blocks
        facts = ShardFacts(
            num_blocks=num_blocks,
            block_size=info.block_size,
            max_position_embeddings=info.max_position_embeddings,
            support_chunking=info.support_chunking,
            tokenizer_max_length=tokenizer_max_length(model_dir),
        )
        resolved = resolve_limits(config.limits, config.scheduler, facts)
        lim = resolved.limits
        log.info(
            "KV cache: %d blocks x %d tokens; max_input_tokens=%d max_total_tokens=%d "
            "max_batch_prefill_tokens=%d max_batch_total_tokens=%d",
            num_blocks, info.block_size, lim.max_input_tokens, lim.max_total_tokens,
            resolved.scheduler.max_batch_prefill_tokens, resolved.scheduler.max_batch_total_tokens,
        )
        metrics = Metrics(max_input_tokens=lim.max_input_tokens, max_total_tokens=lim.max_total_tokens)
        metrics.batch_max_total_tokens.set(resolved.max_supported_total_tokens)
        metrics.kv_blocks_total.set(num_blocks)
        # context_ns prices each prefill chunk by the context it attends (a late chunk of a long prompt costs more)
        step_cost = (StepCost(warm.forward_base_ns, warm.forward_token_ns, context_ns=warm.forward_context_ns)
                     if warm.forward_token_ns else None)
        scheduler = Scheduler(shards, resolved.scheduler, num_blocks, info.block_size, metrics, step_cost)
        backend = SupervisedBackend(scheduler)
        app = build_app(
            config=config,
            limits=lim,
            backend=backend,
            tokenizer=tokenizer,
            chat_template=chat_template,
            metrics=metrics,
            model_id=config.model_id,
            compute_type="gpu+optimized" if info.device_type == "cuda" else "cpu",
            model_dtype=info.dtype,
            model_device_type=info.device_type,
        )
        await _run_http(app, config, scheduler, shards, backend, drain_timeout_s)
    finally:
        if shards is not None:
            await shards.close()
        tokenizer.close()
        if tracer_provider is not None:
            tracer_provider.shutdown()


async def _run_http(app: web.Application, config: RouterConfig, scheduler: Any, shards: Any,
                    backend: SupervisedBackend, drain_timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def shard_lost() -> None:
        if backend.shard_lost:
            return
        log.error("the launcher reports a shard died: /health answers 503; failing open requests")
        backend.shard_lost = True
        # Closing the channels fails every in-flight and later RPC at once, so the scheduler ends the open
        # streams with an error event instead of waiting on a collective that will never complete.
        asyncio.ensure_future(shards.close())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, shard_lost)
    scheduler.start()
    runner = web.AppRunner(app, shutdown_timeout=drain_timeout_s, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.http.hostname, config.http.port)
        await site.start()
        log.info("Connected")
        log.info("listening on http://%s:%d", config.http.hostname, config.http.port)
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(scheduler.failed.wait())
        try:
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            failed.cancel()
        if scheduler.fatal_error is not None:
            log.error("exiting in %.0fs: %s", STALL_LINGER_S, scheduler.fatal_error)
            await asyncio.sleep(STALL_LINGER_S)
        else:
            log.info("shutting down: no new connections; draining in-flight requests (up to %.0fs)",
                     drain_timeout_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        # Stops the listener, then waits up to shutdown_timeout for handlers (streams) to finish while the
        # scheduler keeps running them.
        await runner.cleanup()
        await scheduler.stop(drain_timeout_s=1.0)
    if scheduler.fatal_error is not None:
        from spindle_router.shards import ShardStalled

        raise ShardStalled(scheduler.fatal_error)  # cli: logged, exit code 1
    log.info("router stopped")
