"""The one table of command-line flags, shared by `spindle-router` and `spindle-launcher`.

Each `Flag` is declared once (type, default, help, which program takes it) and, as in TGI, falls back to the
environment variable of the same name in UPPER_SNAKE case (--max-input-tokens <- MAX_INPUT_TOKENS).
`TGI_COMPAT_FLAGS` lists the text-generation-launcher flags Spindle does not implement, so an existing TGI
command line never fails with a bare usage line: each is refused with the reason when set to something
Spindle cannot honour, or accepted with one logged line saying it has no effect here (see compat.py).
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spindle_router.config import (
    HttpConfig,
    LimitsConfig,
    RouterConfig,
    SchedulerConfig,
    TelemetryConfig,
    env_default,
)


def env_name(name: str) -> str:
    return name.upper().replace("-", "_")


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


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
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


def unit_fraction(value: str) -> float:
    x = float(value)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {x}")
    return x


def cuda_graph_sizes(value: str) -> str:
    """"8, 1,2" -> "1,2,8"; "0" -> "0" (off). Checked here so a typo fails before any shard starts."""
    try:
        sizes = sorted({int(p) for p in value.split(",") if p.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {value!r}") from None
    if sizes in ([], [0]):
        return "0"
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive (or a single 0 to disable), got {value!r}")
    return ",".join(map(str, sizes))


class Scope(enum.Flag):
    ROUTER = enum.auto()
    LAUNCHER = enum.auto()
    BOTH = ROUTER | LAUNCHER


@dataclass(frozen=True)
class Flag:
    name: str  # without the leading --
    cast: Callable[[str], Any]
    default: Any
    help: str
    group: str
    scope: Scope = Scope.BOTH
    shown: str | None = None  # the help's description of a None default
    from_env: bool = True
    short: str | None = None  # a short option, e.g. "-p"
    argparse_kw: dict[str, Any] = field(default_factory=dict)  # choices, metavar, nargs, const


def _bool_flag(name: str, default: bool, help: str, group: str, scope: Scope = Scope.BOTH) -> Flag:
    """`--name` alone means true; `--name false` / NAME=false also work."""
    return Flag(name, parse_bool, default, help, group, scope,
                argparse_kw={"nargs": "?", "const": True, "metavar": "BOOL"})


_L, _S, _H = LimitsConfig(), SchedulerConfig(), HttpConfig()
MODEL, HTTP, LIMITS, BATCHING, OBS = "model and shards", "HTTP", "request limits (validation)", "batching", "observability"

FLAGS: tuple[Flag, ...] = (
    # -- model and shards
    Flag("model-id", str, None, "local model directory (Hugging Face layout) or a Hub id in the local cache; "
         "the router reports it in /info and the OpenAI routes", MODEL, shown="required"),
    Flag("model-dir", str, None, "local directory with tokenizer.json and tokenizer_config.json", MODEL,
         Scope.ROUTER, shown="--model-id"),
    Flag("num-shard", positive_int, RouterConfig.num_shard, "tensor-parallel ranks: one shard process each", MODEL),
    Flag("sharded", parse_bool, None, "TGI's switch: true needs --num-shard > 1, false needs --num-shard 1",
         MODEL, Scope.LAUNCHER, shown="from --num-shard", argparse_kw={"metavar": "BOOL"}),
    Flag("dtype", str, None, "weights, activations and KV cache dtype; auto: the checkpoint's half precision on "
         "CUDA, bfloat16 on CPUs with avx512_bf16 or amx_bf16, float32 on other CPUs", MODEL, Scope.LAUNCHER,
         shown="auto", argparse_kw={"choices": ["auto", "float32", "bfloat16", "float16"]}),
    Flag("kv-cache-bytes", positive_int, None,
         "bytes of KV cache per shard (CUDA: at most this of what --cuda-memory-fraction leaves)", MODEL,
         Scope.LAUNCHER, shown="CPU: min(25%% of RAM, 4 GiB); CUDA: no cap"),
    Flag("cuda-memory-fraction", unit_fraction, None,
         "CUDA only: share of each GPU a shard may use in total (weights, KV cache, activations)", MODEL,
         Scope.LAUNCHER, shown="the shards' 0.9"),
    Flag("block-size", positive_int, None,
         "tokens per KV block; on CUDA a multiple of 256 lets flash-attn (when installed, half precision) serve "
         "attention, anything else runs the Triton kernels", MODEL, Scope.LAUNCHER, shown="the shards' 16"),
    Flag("cuda-graphs", cuda_graph_sizes, None,
         "CUDA only: decode batch sizes the shards capture as CUDA graphs, comma-separated; 0 disables", MODEL,
         Scope.LAUNCHER, shown="1,2,4,8,16,32,64,128,256"),
    Flag("shard-uds-path", str, RouterConfig.shard_uds_path, "shard socket prefix: rank r listens on PREFIX-r "
         "(two instances on one machine need two prefixes: a prefix a live process listens on is refused)", MODEL),
    Flag("shard-timeout", positive_float, None,
         "seconds any shard call may take before the shard counts as stalled: /health turns 503, open requests "
         "fail and the server exits 1", MODEL, shown="10 x the call's cost as measured at warmup, at least 30"),
    Flag("master-addr", str, "127.0.0.1", "torch.distributed rendezvous address", MODEL, Scope.LAUNCHER),
    Flag("master-port", positive_int, 29500, "torch.distributed rendezvous port", MODEL, Scope.LAUNCHER),
    Flag("huggingface-hub-cache", str, None, "Hugging Face cache a Hub --model-id is looked up in", MODEL,
         Scope.LAUNCHER, shown="huggingface_hub's"),
    Flag("revision", str, None, "branch, tag or commit of a Hub --model-id (an error with a local directory); "
         "the shards load the commit it resolves to", MODEL, Scope.LAUNCHER, shown="the default branch"),
    # -- HTTP. --hostname is not read from HOSTNAME: shells and container runtimes set it to the machine's name.
    Flag("hostname", str, _H.hostname, "address the router listens on", HTTP, from_env=False),
    Flag("port", positive_int, _H.port, "port the router listens on", HTTP, short="-p"),
    Flag("api-key", str, None, "require `Authorization: Bearer KEY` on the inference routes", HTTP),
    Flag("graceful-termination-timeout", positive_float, 90.0,
         "seconds in-flight requests get to finish on SIGTERM/SIGINT before children are killed", HTTP, short="-g"),
    # -- request limits
    Flag("max-concurrent-requests", positive_int, _L.max_concurrent_requests,
         "requests admitted at once; more get 429", LIMITS),
    Flag("max-best-of", positive_int, _L.max_best_of, "largest best_of (and OpenAI n) a request may ask", LIMITS),
    Flag("max-stop-sequences", non_negative_int, _L.max_stop_sequences, "most stop sequences per request", LIMITS),
    Flag("max-top-n-tokens", non_negative_int, _L.max_top_n_tokens,
         "most alternatives per token (top_n_tokens, OpenAI top_logprobs / logprobs)", LIMITS),
    Flag("max-input-tokens", positive_int, None, "longest prompt in tokens", LIMITS, shown="max_total_tokens - 1"),
    Flag("max-input-length", positive_int, None, "TGI's legacy name of --max-input-tokens (not both)", LIMITS,
         Scope.LAUNCHER, shown="none"),
    Flag("max-total-tokens", positive_int, None, "prompt + generated tokens of one request", LIMITS,
         shown="min(KV capacity, max_position_embeddings)"),
    Flag("max-client-batch-size", positive_int, _L.max_client_batch_size,
         "most inputs in one request (OpenAI completions prompts)", LIMITS),
    Flag("payload-limit", positive_int, _L.payload_limit, "largest request body in bytes", LIMITS),
    Flag("validation-workers", positive_int, _L.validation_workers, "tokenizer threads", LIMITS),
    _bool_flag("disable-grammar-support", _L.disable_grammar_support,
               "refuse `grammar`, `response_format` and `tools` (422 \"grammar is not supported\")", LIMITS),
    # -- batching
    Flag("max-batch-prefill-tokens", positive_int, _S.max_batch_prefill_tokens,
         "prompt tokens one forward may prefill (longer prompts are chunked)", BATCHING),
    Flag("max-decode-slowdown", non_negative_float, _S.max_decode_slowdown,
         "while requests decode, a step that also prefills may take at most this many times a decode-only step "
         "(its token budget comes from the step cost the shards measure at warmup), so a long prompt never "
         "stalls running streams; 0: every step may carry max-batch-prefill-tokens", BATCHING),
    Flag("max-batch-total-tokens", positive_int, None, "KV tokens the running batch may hold", BATCHING,
         shown="all the shards hold"),
    Flag("max-batch-size", positive_int, None, "most requests in the running batch", BATCHING, shown="no limit"),
    Flag("waiting-served-ratio", positive_float, _S.waiting_served_ratio,
         "waiting/running ratio at or above which a step serves the queue at the full max-batch-prefill-tokens, "
         "lifting the max-decode-slowdown cap", BATCHING),
    Flag("prefix-caching", parse_bool, _S.prefix_caching, "reuse KV blocks of shared prompt prefixes", BATCHING,
         argparse_kw={"metavar": "BOOL"}),
    Flag("overlap-steps", parse_bool, _S.overlap_steps,
         "plan and send each step while the shards still run the one before (the router's work hides behind "
         "theirs; a request that stops on EOS costs one token computed past its end; the shards run steps in the "
         "order sent whichever arrives first); off by default: it measured no gain on 2 cores", BATCHING,
         argparse_kw={"metavar": "BOOL"}),
    # -- observability
    Flag("otlp-endpoint", str, None, "export OpenTelemetry spans over OTLP/gRPC to this URL", OBS),
    Flag("otlp-service-name", str, TelemetryConfig.otlp_service_name, "service.name of the exported spans", OBS),
    _bool_flag("json-output", False, "log JSON lines instead of text", OBS),
    # Not read from ENV: POSIX shells use that variable for their own start-up file.
    Flag("env", parse_bool, False, "log the runtime environment (versions, platform) at start-up", OBS,
         Scope.LAUNCHER, from_env=False, short="-e", argparse_kw={"nargs": "?", "const": True, "metavar": "BOOL"}),
)


def env_value(flag: Flag) -> Any:
    """The env fallback of `flag`, parsed with the flag's own type (a bad value fails at start-up)."""
    raw = env_default(flag.name) if flag.from_env else None
    if raw is None:
        return flag.default
    try:
        return flag.cast(raw)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"environment variable {env_name(flag.name)}={raw!r}: {e}") from None


def add_flags(parser: argparse.ArgumentParser, scope: Scope) -> None:
    """Every flag of `scope`, in its group, with its env fallback; the help shows the env name and default."""
    groups: dict[str, Any] = {}
    for flag in FLAGS:
        if not flag.scope & scope:
            continue
        group = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        shown = flag.shown or ("none" if flag.default is None else str(flag.default))
        where = f"env {env_name(flag.name)}; " if flag.from_env else ""
        names = [f"--{flag.name}", *([flag.short] if flag.short else [])]
        group.add_argument(*names, type=flag.cast, default=env_value(flag), help=f"{flag.help} [{where}default {shown}]",
                           **flag.argparse_kw)
    # Repeatable, so not in the table: the env form is comma-separated.
    groups[HTTP].add_argument("--cors-allow-origin", action="append", default=None,
                              help="allowed CORS origin (repeatable) [env CORS_ALLOW_ORIGIN, comma-separated]")
