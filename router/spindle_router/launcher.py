"""`spindle-launcher`: start one shard process per rank and the router, supervise them, tear them down.

    spindle-launcher --model-id models/demo --num-shard 2 --port 8080

    1. resolve the model directory; check the flags (a clear error before anything starts)
    2. per rank: check its socket PREFIX-<rank>: one a live process listens on (another instance) is a clear
       error and nothing starts; a stale one (its process died) is removed. Then spawn `spindle-server serve MODEL --uds-path P` in its own process
       group with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; its output is re-logged with its rank
    3. wait until every socket P-<rank> exists (a shard that exits first aborts the start)
    4. spawn the router (`python -m spindle_router.cli`), which warms the shards up and serves HTTP
    5. supervise:  SIGTERM/SIGINT  -> router drains within the grace period, then the shards stop; exit 0
                   a shard dies    -> log which and why, SIGUSR1 to the router (/health 503 at once, open
                                      streams end with an error event), stop everything; exit 1
                   router dies     -> stop the shards; exit 1

The router runs as its own process, not inside the launcher, for the same reasons TGI does it: the
supervisor stays a small synchronous loop that can always clean up (whatever the router's event loop does,
a hang or a crash), and `spindle-router` alone runs exactly the code the launcher runs.
Every child lives in its own process group (a terminal's Ctrl-C reaches only the launcher, which stops the
children in order) and gets SIGTERM if the launcher itself dies (Linux parent-death signal).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spindle_proto.sockets import SocketInUse, is_listening, remove_stale_socket

from spindle_router.cli import config_from_args as router_config_from_args
from spindle_router.cli import router_argv
from spindle_router.compat import add_compat_flags, check_compat_flags
from spindle_router.config import RouterConfig
from spindle_router.flags import Scope, add_flags

log = logging.getLogger("spindle_launcher")
shard_log = logging.getLogger("spindle_launcher.shard")

POLL_S = 0.1
WAIT_LOG_EVERY_S = 10.0
TAIL_LINES = 20
FAILURE_GRACE_S = 10.0  # a peer of a dead shard may hang in a collective: do not wait the full grace on it
# After a shard dies the router keeps answering for a moment, /health with 503, so load balancers and
# readiness probes see the failure as such (not only as a refused connection) and open streams get their
# error event before the router goes away.
SHARD_LOSS_LINGER_S = 3.0
_LEVEL_RE = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


@dataclass(frozen=True)
class ShardOptions:
    dtype: str | None  # None: the shard's default (auto)
    kv_cache_bytes: int | None
    master_addr: str
    master_port: int
    cuda_graphs: str | None = None  # "1,2,4" / "0" for the shards' --cuda-graphs; None: the shards' default
    cuda_memory_fraction: float | None = None  # None: the shards' default
    block_size: int | None = None  # None: the shards' default
    # A Hub model: its id and the commit the launcher resolved, so every shard loads the router's snapshot
    # (from --huggingface-hub-cache when given).
    hub_model: tuple[str, str] | None = None
    hub_cache: str | None = None


@dataclass(frozen=True)
class LauncherConfig:
    router: RouterConfig
    shard: ShardOptions
    graceful_termination_timeout_s: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spindle-launcher",
        description=(
            "Start a Spindle server: one shard process per tensor-parallel rank plus the HTTP router, "
            "supervised together. Every flag also reads the environment variable of the same name in "
            "UPPER_SNAKE case (--max-input-tokens <- MAX_INPUT_TOKENS). SIGTERM/SIGINT drain in-flight "
            "requests for --graceful-termination-timeout seconds, then stop everything. Every "
            "text-generation-launcher flag is known: implemented, refused with the reason, or accepted "
            "without effect (the last two groups below)."
        ),
    )
    add_flags(p, Scope.LAUNCHER)
    add_compat_flags(p)
    return p


# What the router and the shards read from a Hub snapshot: config and generation config, weights, tokenizer
# files, chat templates (`chat_template.jinja` beside or instead of the one in tokenizer_config.json).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def resolve_model_dir(model_id: str, revision: str | None = None, hub_cache: str | None = None) -> Path:
    """A local directory as given; otherwise a Hub id at `revision` looked up through huggingface_hub (its
    cache, or `hub_cache`, and the network unless HF_HUB_OFFLINE=1). The snapshot directory's name is the
    commit."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision!r} applies to Hub ids; {model_id!r} is a local directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.resolve()
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ValueError(f"--model-id {model_id!r}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"--model-id {model_id!r} is not a directory and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_FILE_PATTERNS,
                                      cache_dir=hub_cache))
    except Exception as e:  # the hub raises a dozen types for offline / missing / gated / unknown revision
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"--model-id {model_id!r}{at}: not a local directory and not resolvable on the Hub ({e})") from e


def config_from_args(ns: argparse.Namespace) -> LauncherConfig:
    from spindle_router.server import check_static_limits

    if not ns.model_id:
        raise ValueError("--model-id is required (or MODEL_ID)")
    check_compat_flags(ns)
    _resolve_tgi_aliases(ns)
    model_dir = resolve_model_dir(ns.model_id, ns.revision, ns.huggingface_hub_cache)
    ns.model_dir = str(model_dir)
    is_local = Path(ns.model_id).expanduser().is_dir()
    router = router_config_from_args(ns)
    check_static_limits(router.limits, router.scheduler)
    return LauncherConfig(
        router=router,
        shard=ShardOptions(ns.dtype, ns.kv_cache_bytes, ns.master_addr, ns.master_port, ns.cuda_graphs,
                           ns.cuda_memory_fraction, ns.block_size,
                           hub_model=None if is_local else (ns.model_id, model_dir.name),
                           hub_cache=ns.huggingface_hub_cache),
        graceful_termination_timeout_s=ns.graceful_termination_timeout,
    )


def _resolve_tgi_aliases(ns: argparse.Namespace) -> None:
    """TGI's --max-input-length (legacy name) and --sharded, checked against their Spindle counterparts."""
    if ns.max_input_length is not None:
        if ns.max_input_tokens is not None:
            raise ValueError("--max-input-length is the legacy name of --max-input-tokens: set only one")
        ns.max_input_tokens = ns.max_input_length
    if ns.sharded is True and ns.num_shard <= 1:
        raise ValueError("--sharded true needs --num-shard > 1 (Spindle does not count GPUs for you)")
    if ns.sharded is False and ns.num_shard > 1:
        raise ValueError(f"--sharded false contradicts --num-shard {ns.num_shard}")


def log_environment() -> None:
    """--env: what TGI's `--env` prints, as far as the launcher (which never imports torch) knows it."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    log.info("runtime environment: python %s on %s (%s); spindle-router %s, spindle-server %s, torch %s; "
             "CUDA_VISIBLE_DEVICES=%s", platform.python_version(), platform.platform(), platform.machine(),
             v("spindle-router"), v("spindle-server"), v("torch"), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))


def _parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, however it dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """One supervised process in its own process group, its output re-logged line by line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], rank: int | None, capture: bool,
                 json_output: bool = False) -> None:
        self.name, self.rank, self.json_output = name, rank, json_output
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            start_new_session=True,
            preexec_fn=_parent_death_signal if sys.platform.startswith("linux") else None,
        )
        self._pump: threading.Thread | None = None
        if capture:
            self._pump = threading.Thread(target=self._forward, name=f"{name}-log", daemon=True)
            self._pump.start()

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        prefix = f"[rank {self.rank}]"
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            m = _LEVEL_RE.search(line)
            level = _LEVELS[m.group(1)] if m else logging.INFO
            if self.json_output:  # the rank as a field of its own
                shard_log.log(level, "%s", line, extra={"rank": self.rank})
            else:
                shard_log.log(level, "%s", line if line.startswith(prefix) else f"{prefix} {line}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the whole group: a child's own children go too
            if sig == signal.SIGTERM:  # a stopped (SIGSTOP) child acts on SIGTERM only once continued
                os.killpg(self.proc.pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit status."""
        if self.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", self.name, grace_s)
        self.signal(signal.SIGKILL)  # leftovers in the group, if any
        code = self.proc.wait()
        if self._pump is not None:
            self._pump.join(timeout=2.0)
        return code

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def last_lines(self) -> str:
        return "\n".join(self.tail) if self.tail else "(no output)"


class Launcher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.stop_requested = threading.Event()

    # -- start ----------------------------------------------------------------------------------------

    def _shard_argv(self) -> list[str]:
        c = self.config
        argv = [sys.executable, "-m", "spindle_server.cli", "serve", c.router.model_dir,
                "--uds-path", c.router.shard_uds_path]
        if c.shard.hub_model is not None:  # the shards resolve the id at the commit the router read
            model_id, commit = c.shard.hub_model
            argv[4:5] = [model_id, "--revision", commit]
        if c.shard.dtype:
            argv += ["--dtype", c.shard.dtype]
        if c.shard.kv_cache_bytes is not None:
            argv += ["--kv-cache-bytes", str(c.shard.kv_cache_bytes)]
        if c.shard.cuda_graphs is not None:
            argv += ["--cuda-graphs", c.shard.cuda_graphs]
        if c.shard.cuda_memory_fraction is not None:
            argv += ["--cuda-memory-fraction", str(c.shard.cuda_memory_fraction)]
        if c.shard.block_size is not None:
            argv += ["--block-size", str(c.shard.block_size)]
        t = c.router.telemetry
        if t.otlp_endpoint:
            # The router exports as e.g. "spindle.router"; its shards as "spindle.shard".
            argv += ["--otlp-endpoint", t.otlp_endpoint,
                     "--otlp-service-name", t.otlp_service_name.removesuffix(".router")]
        return argv

    def _shard_env(self, rank: int) -> dict[str, str]:
        c = self.config
        env = {k: v for k, v in os.environ.items() if k != "API_KEY"}  # shards have no use for the secret
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(c.router.num_shard),
            MASTER_ADDR=c.shard.master_addr,
            MASTER_PORT=str(c.shard.master_port),
            PYTHONUNBUFFERED="1",
        )
        if c.shard.hub_cache is not None:  # the shards look the Hub id up where the launcher found it
            env["HF_HUB_CACHE"] = c.shard.hub_cache
        return env

    def claim_sockets(self) -> None:
        """Remove the stale sockets of our paths; SocketInUse (nothing removed, nothing started) when a live
        process listens on one: two instances on one prefix would end up talking to each other's shards."""
        paths = [self.config.router.shard_path(r) for r in range(self.config.router.num_shard)]
        for path in paths:
            if is_listening(path):
                raise SocketInUse(
                    f"{path} is in use: another Spindle instance (or another program) listens on it; "
                    "give this instance its own --shard-uds-path (or stop the other one)"
                )
        for path in paths:
            if remove_stale_socket(path):
                log.info("removed stale socket %s (no process listens on it)", path)

    def start_shards(self) -> None:
        n = self.config.router.num_shard
        log.info("starting %d shard(s) for %s", n, self.config.router.model_dir)
        for rank in range(n):
            child = Child(f"shard {rank}", self._shard_argv(), self._shard_env(rank), rank, capture=True,
                          json_output=self.config.router.telemetry.json_output)
            log.info("shard %d started (pid %d)", rank, child.pid)
            self.shards.append(child)

    def wait_for_shards(self) -> bool:
        """True once every socket exists; False when a shard died first or a stop was requested."""
        started = last_log = time.monotonic()
        pending = set(range(len(self.shards)))
        while pending:
            for rank in sorted(pending):
                child = self.shards[rank]
                if child.poll() is not None:
                    log.error("shard %d cannot start (%s); its last output:\n%s",
                              rank, child.describe_exit(), child.last_lines())
                    return False
                if os.path.exists(self.config.router.shard_path(rank)):
                    log.info("shard %d ready (%.1fs)", rank, time.monotonic() - started)
                    pending.discard(rank)
            if not pending:
                break
            if self.stop_requested.wait(POLL_S):
                return False
            if time.monotonic() - last_log >= WAIT_LOG_EVERY_S:
                log.info("waiting for shard(s) %s to be ready...", ", ".join(map(str, sorted(pending))))
                last_log = time.monotonic()
        return True

    def start_router(self) -> None:
        c = self.config
        argv = [sys.executable, "-m", "spindle_router.cli",
                *router_argv(c.router, c.graceful_termination_timeout_s)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if c.router.http.api_key:
            env["API_KEY"] = c.router.http.api_key
        # The router writes its own log lines (same format flags) straight to our stderr.
        self.router = Child("router", argv, env, None, capture=False)
        log.info("router started (pid %d); it warms the shards up, then listens on %s:%d",
                 self.router.pid, c.router.http.hostname, c.router.http.port)

    # -- supervise ------------------------------------------------------------------------------------

    def supervise(self) -> int:
        """Block until a stop is requested or a child dies; tear down; return the exit code."""
        assert self.router is not None
        while not self.stop_requested.wait(POLL_S):
            for rank, child in enumerate(self.shards):
                if child.poll() is not None:
                    log.error("shard %d died (%s); its last output:\n%s",
                              rank, child.describe_exit(), child.last_lines())
                    self.router.signal(signal.SIGUSR1)  # /health 503 now; open streams get an error
                    self.stop_requested.wait(SHARD_LOSS_LINGER_S)
                    self.teardown(FAILURE_GRACE_S)
                    return 1
            if self.router.poll() is not None:
                log.error("router exited (%s); its last log lines say why", self.router.describe_exit())
                self.teardown(FAILURE_GRACE_S)
                return 1
        log.info("stop requested: draining (up to %.0fs)", self.config.graceful_termination_timeout_s)
        self.teardown(self.config.graceful_termination_timeout_s)
        return 0

    def teardown(self, grace_s: float) -> None:
        """Router first (it drains in-flight requests), then every shard."""
        if self.router is not None:
            # A little over the router's own drain timeout so its orderly exit is not cut short.
            code = self.router.stop(grace_s + 5.0)
            log.info("router stopped (%s)", self.router.describe_exit() if code is not None else "?")
        for child in self.shards:
            if child.poll() is None:
                child.signal(signal.SIGTERM)  # all at once: ranks of one group stop together
        for rank, child in enumerate(self.shards):
            child.stop(grace_s)
            log.info("shard %d stopped (%s)", rank, child.describe_exit())
        for rank in range(len(self.shards)):
            path = self.config.router.shard_path(rank)
            try:
                remove_stale_socket(path)  # ours, left by a shard that was killed; never a live one
            except (SocketInUse, FileExistsError) as e:
                log.warning("leaving %s in place: %s", path, e)

    def run(self) -> int:
        try:
            self.claim_sockets()
        except (SocketInUse, FileExistsError) as e:
            log.error("%s", e)
            return 2
        try:
            self.start_shards()
            if not self.wait_for_shards():
                failed = not self.stop_requested.is_set()
                self.teardown(FAILURE_GRACE_S)
                return 1 if failed else 0
            self.start_router()
            return self.supervise()
        except BaseException:
            self.teardown(FAILURE_GRACE_S)
            raise


def main(argv: list[str] | None = None) -> int:
    from spindle_router.logging import setup_logging

    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(json_output=ns.json_output)
    if ns.env:
        log_environment()
    try:
        config = config_from_args(ns)
    except ValueError as e:
        log.error("%s", e)
        return 2
    launcher = Launcher(config)

    def on_signal(signum: int, _frame: object) -> None:
        if launcher.stop_requested.is_set():
            log.warning("second %s: killing everything now", signal.Signals(signum).name)
            for child in [*launcher.shards, *([launcher.router] if launcher.router else [])]:
                child.signal(signal.SIGKILL)
            return
        log.info("received %s", signal.Signals(signum).name)
        launcher.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = launcher.run()
    log.info("launcher exiting with code %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
