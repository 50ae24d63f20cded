"""A real aiohttp server on 127.0.0.1 (random port, own thread and loop) over a deterministic test-double
Backend, with the tiny model's tokenizer and chat template. Used by test_api*.py and test_chat*.py."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from spindle_router.api import build_app
from spindle_router.api.context import STATE
from spindle_router.chat_template import ChatTemplate
from spindle_router.config import HttpConfig, LimitsConfig, RouterConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.request import (
    EndEvent,
    ErrorEvent,
    Event,
    PrefillEvent,
    Token,
    TokenEvent,
    ValidRequest,
)
from spindle_router.tokenizer import RouterTokenizer

from tests.helpers.tiny_model import CHAT_TEMPLATE, EOS_ID, build_tokenizer

MODEL_ID = "tiny-test-model"


def write_tokenizer_dir(path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """tokenizer.json + tokenizer_config.json of the tiny model (no weights: the router needs none)."""
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(512).save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@dataclass
class Knobs:
    """What a test can change about the double between requests (set from the test thread)."""

    eos_at: int | None = None  # emit EOS as the n-th generated token (1-based)
    fail_after: int | None = None  # ErrorEvent after this many tokens
    incomplete: bool = False  # end the stream without an EndEvent
    token_delay_s: float = 0.0
    healthy: bool = True


class EchoStream:
    """Deterministic tokens: ids cycle through a fixed list of clean ASCII tokens, offset by the prompt."""

    def __init__(self, backend: EchoBackend, request: ValidRequest) -> None:
        self.backend, self.request = backend, request
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self.backend.cancels.append(self.request)
        self.backend.on_cancel()

    def _token(self, token_id: int, logprob: float | None) -> Token:
        tok = self.backend.tokenizer
        return Token(token_id, tok.token_text(token_id), logprob, special=token_id == EOS_ID)

    async def _events(self) -> AsyncIterator[Event]:
        b, req, knobs = self.backend, self.request, self.backend.knobs
        queued_at = asyncio.get_running_loop().time()
        if b.gate is not None:
            await b.gate.wait()
        started_at = asyncio.get_running_loop().time()
        sampling = req.sampling.is_sampling
        base_lp = -((req.sampling.seed % 997) / 997.0) - 0.05 if sampling else -0.1
        if req.prefill_logprobs:
            yield PrefillEvent(
                [self._token(t, None if i == 0 else -1.0) for i, t in enumerate(req.input_ids)]
            )
        ids: list[int] = []
        offset = sum(req.input_ids) + (req.sampling.seed % 5 if sampling else 0)
        n = req.stopping.max_new_tokens
        for i in range(1, n + 1):
            if knobs.token_delay_s:
                await asyncio.sleep(knobs.token_delay_s)
            if self.cancelled.is_set():
                return
            if knobs.fail_after is not None and i > knobs.fail_after:
                yield ErrorEvent("Server error: the test double failed")
                return
            token_id = EOS_ID if knobs.eos_at == i else b.clean_ids[(offset + i) % len(b.clean_ids)]
            ids.append(token_id)
            token = self._token(token_id, base_lp - 0.001 * i)
            top = [self._token(t, base_lp - 1.0 - k) for k, t in enumerate(b.clean_ids[: req.top_n_tokens])]
            text = b.tokenizer.decode(ids)
            reason = None
            if token_id == EOS_ID:
                reason = "eos_token"
            elif any(s in text for s in req.stopping.stop_sequences):
                reason = "stop_sequence"
            elif i == n:
                reason = "length"
            if reason is None:
                yield TokenEvent(token, top)
                continue
            if knobs.incomplete:
                return
            yield EndEvent(
                token=token,
                top_tokens=top,
                generated_text=text,
                finish_reason=reason,
                generated_tokens=i,
                seed=req.sampling.seed if sampling else None,
                queued_at=queued_at,
                started_at=started_at,
            )
            return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()


class EchoBackend:
    def __init__(self, tokenizer: RouterTokenizer) -> None:
        self.tokenizer = tokenizer
        self.knobs = Knobs()
        self.submitted: list[ValidRequest] = []
        self.cancels: list[ValidRequest] = []
        self.gate: asyncio.Event | None = None  # when set, streams wait for it before generating
        self.cancel_seen = threading.Event()
        self.clean_ids = [
            i
            for i in range(3, tokenizer.vocab_size)
            if tokenizer.token_text(i).strip().isascii() and tokenizer.token_text(i).strip().isalpha()
        ]

    def on_cancel(self) -> None:
        self.cancel_seen.set()

    def submit(self, request: ValidRequest) -> EchoStream:
        self.submitted.append(request)
        return EchoStream(self, request)

    @property
    def is_healthy(self) -> bool:
        return self.knobs.healthy

    async def health_check(self) -> bool:
        return self.knobs.healthy


@dataclass
class Server:
    base_url: str
    backend: EchoBackend
    metrics: Metrics
    tokenizer: RouterTokenizer
    loop: asyncio.AbstractEventLoop
    stop: Callable[[], None]
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    infer: Any = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop and return its result (for asyncio objects of the double)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def reset(self) -> None:
        def clear() -> None:
            self.backend.knobs = Knobs()
            self.backend.gate = None
            self.backend.submitted.clear()
            self.backend.cancels.clear()
            self.backend.cancel_seen.clear()

        self.call(clear)


def start_server(
    model_dir: Path,
    *,
    limits: LimitsConfig | None = None,
    api_key: str | None = None,
    with_template: bool = True,
    handler_cancellation: bool = False,
) -> Server:
    limits = limits or LimitsConfig(
        max_concurrent_requests=4, max_input_tokens=256, max_total_tokens=512, payload_limit=100_000
    )
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        tokenizer = RouterTokenizer(model_dir, num_workers=limits.validation_workers)
        backend = EchoBackend(tokenizer)
        metrics = Metrics(
            max_input_tokens=limits.max_input_tokens or 1, max_total_tokens=limits.max_total_tokens or 1
        )
        template = (
            ChatTemplate.from_model_dir(model_dir, tokenizer.bos_token, tokenizer.eos_token)
            if with_template
            else None
        )
        config = RouterConfig(model_id=MODEL_ID, model_dir=str(model_dir), http=HttpConfig(api_key=api_key))
        app = build_app(
            config=config,
            limits=limits,
            backend=backend,
            tokenizer=tokenizer,
            chat_template=template,
            metrics=metrics,
            model_id=MODEL_ID,
        )
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        holder.update(
            infer=app[STATE].infer,
            port=port,
            backend=backend,
            metrics=metrics,
            tokenizer=tokenizer,
            loop=loop,
            runner=runner,
        )
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        tokenizer.close()
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("test server did not start")
    loop = holder["loop"]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return Server(
        base_url=f"http://127.0.0.1:{holder['port']}",
        backend=holder["backend"],
        metrics=holder["metrics"],
        tokenizer=holder["tokenizer"],
        loop=loop,
        stop=stop,
        limits=limits,
        infer=holder["infer"],
    )
