"""Integration fixtures: the REAL `spindle-launcher` (shard processes + router) on a random port.

    def test_x(launcher):                       # module-scoped: one stack, 1 shard, shared by the module
        r = requests.post(f"{launcher.base_url}/generate", ...)

    def test_y(start_launcher, tiny_model_dir): # your own stack with other flags / shard count
        with start_launcher(tiny_model_dir, num_shard=2, args=["--max-batch-size", "4"]) as stack: ...

Each stack gets its own port, master port and socket prefix under a fresh temp dir, so stacks never
collide with each other or with a `make run` on the same machine. Teardown stops the launcher with
SIGTERM (its own drain), then kills by PID whatever of the stack is left: the launcher's process group
and every descendant recorded while it ran. Nothing downloads: the model is built here from a config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.tiny_model import EOS_ID, TinyModelSpec, load_reference, make_tiny_model, reference_greedy

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@dataclass
class LauncherStack:
    """A running launcher: its URL, process and log."""

    proc: subprocess.Popen
    port: int
    uds_prefix: str
    log_path: Path
    base_url: str = ""
    known_pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def remember_descendants(self) -> None:
        self.known_pids |= descendants(self.proc.pid)

    def health_status(self, timeout_s: float = 2.0) -> int | None:
        """HTTP status of GET /health, None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode} before /health:\n{self.log_text()}")
            self.remember_descendants()
            if self.health_status() == 200:
                self.remember_descendants()
                return
            time.sleep(0.2)
        raise TimeoutError(f"/health not 200 after {timeout_s:.0f}s:\n{self.log_text()[-5000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Signal the launcher and wait for it; then kill by PID anything of the stack still alive."""
        self.remember_descendants()
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.known_pids:
            if is_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code

    def leftover_pids(self) -> list[int]:
        return sorted(p for p in self.known_pids if is_alive(p))


def launcher_argv(model_dir: Path, port: int, uds_prefix: str, num_shard: int, args: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "spindle_router.launcher",
        "--model-id", str(model_dir),
        "--num-shard", str(num_shard),
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--shard-uds-path", uds_prefix,
        "--master-port", str(free_port()),
        "--kv-cache-bytes", str(16 * 2**20),
        "--graceful-termination-timeout", "10",
        "--dtype", "float32",  # answers are compared with transformers in float32; `args` may override
        *args,
    ]


@contextlib.contextmanager
def launch(model_dir: Path, num_shard: int = 1, args: Sequence[str] = (), env: dict[str, str] | None = None
           ) -> Iterator[LauncherStack]:
    """Start the launcher, wait for /health 200, yield it, tear it down (also when the test fails)."""
    workdir = Path(tempfile.mkdtemp(prefix="spindle-it-", dir="/tmp"))  # short: unix socket paths <= 107 bytes
    port = free_port()
    log_path = workdir / "launcher.log"
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            launcher_argv(model_dir, port, str(workdir / "shard"), num_shard, args),
            cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = LauncherStack(proc=proc, port=port, uds_prefix=str(workdir / "shard"), log_path=log_path)
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop()
        if os.environ.get("SPINDLE_KEEP_LOGS"):
            print(f"launcher log kept in {log_path}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama with its tokenizer and chat template (built, never downloaded)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TinyModelSpec())


@pytest.fixture(scope="session")
def start_launcher():
    """`start_launcher(model_dir, num_shard=1, args=(), env=None)`: a context manager over a fresh stack."""
    return launch


@pytest.fixture(scope="module")
def launcher(tiny_model_dir: Path) -> Iterator[LauncherStack]:
    """One shard + router over the tiny model, shared by a test module."""
    with launch(tiny_model_dir, num_shard=1) as stack:
        yield stack


class GreedyReference:
    """transformers' answers for the tiny model: what a greedy request must produce, token for token.

    The server stops at EOS (the HTTP API cannot ignore it), so a continuation ends after the first EOS;
    texts are decoded like the server's final `generated_text` (special tokens skipped)."""

    def __init__(self, model_dir: Path) -> None:
        import transformers

        self.model, self.tokenizer = load_reference(model_dir)
        self.chat_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)  # reads the chat template
        self._memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    def continuation(self, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch

        key = (tuple(input_ids), max_new_tokens)
        if key not in self._memo:
            # One thread: a tiny model gains nothing from more, and on a busy 2-core machine (the stack's
            # processes run alongside) intra-op threads spin-wait on each other and get 100x slower.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out = reference_greedy(self.model, list(input_ids), max_new_tokens)
            finally:
                torch.set_num_threads(threads)
            self._memo[key] = out[: out.index(EOS_ID) + 1] if EOS_ID in out else out
        return list(self._memo[key])

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.backend_tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="session")
def greedy(tiny_model_dir: Path) -> GreedyReference:
    """The transformers reference for the tiny model (loaded once per session)."""
    return GreedyReference(tiny_model_dir)


def read_metrics(base_url: str) -> dict[str, float]:
    """GET /metrics as {sample name with its labels: value}, e.g. {'tgi_request_failure{err="dropped"}': 3.0}."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            samples[sample] = float(value)
    return samples


def read_settled_metrics(base_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """read_metrics once every step sent has been answered and absorbed: steps overlap, so the one sent
    before a request's last answer came back may still run after the response."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = read_metrics(base_url)
        sent = sum(v for k, v in m.items() if k.startswith("tgi_batch_inference_count{"))
        done = sum(v for k, v in m.items() if k.startswith(("tgi_batch_inference_success{",
                                                             "tgi_batch_inference_failure{")))
        if sent == done or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@pytest.fixture(scope="session")
def metrics_of():
    """`metrics_of(base_url)`: the router's /metrics samples as a dict (see read_metrics)."""
    return read_metrics
