"""Real `spindle-server serve` processes over unix sockets, and a small client that plays the router.

`ShardGroup` starts one process per rank and sends every call to all ranks at once (the collectives need
every rank in the call), returning rank 0's answer and checking the others agree (ranks other than 0 answer
a Step without generations). `MiniRouter` owns block ids the way the real router does and drives
requests through Step calls until they finish, dropping finished ones in the next step.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from spindle_proto import generate_pb2 as pb
from spindle_proto import generate_pb2_grpc

BLOCK_SIZE = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command() -> list[str]:
    script = Path(sys.executable).parent / "spindle-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "spindle_server.cli"]


class ShardGroup:
    """`world_size` shard processes of one model; call(method, request) hits every rank concurrently."""

    def __init__(self, model_dir: Path, world_size: int = 1, kv_cache_bytes: int = 8 << 20,
                 extra_args: tuple[str, ...] = (), uds_prefix: str | None = None) -> None:
        self.world_size = world_size
        self._tmp = tempfile.TemporaryDirectory(prefix="spindle-shard-")
        self.prefix = uds_prefix or os.path.join(self._tmp.name, "shard")
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs = [open(os.path.join(self._tmp.name, f"rank{r}.log"), "w+") for r in range(world_size)]
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            cmd = _server_command() + ["serve", str(model_dir), "--uds-path", self.prefix, "--dtype", "float32",
                                       "--device", "cpu", "--kv-cache-bytes", str(kv_cache_bytes), *extra_args]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=self.logs[rank], stderr=subprocess.STDOUT))
        self.channels: list[grpc.Channel] = []
        self.stubs: list[generate_pb2_grpc.TextGenerationServiceStub] = []
        self._pool = ThreadPoolExecutor(max_workers=world_size)
        try:
            self._wait_ready(timeout_s=180)
        except BaseException:
            self.close()
            raise

    def log_text(self, rank: int = 0) -> str:
        self.logs[rank].flush()
        return Path(self.logs[rank].name).read_text()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, proc in enumerate(self.procs):
            path = f"{self.prefix}-{rank}"
            while not (os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode)):
                if proc.poll() is not None:
                    raise RuntimeError(f"shard {rank} exited with {proc.returncode}:\n{self.log_text(rank)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shard {rank} did not start:\n{self.log_text(rank)}")
                time.sleep(0.05)
            channel = grpc.insecure_channel(f"unix://{path}")
            grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
            self.channels.append(channel)
            self.stubs.append(generate_pb2_grpc.TextGenerationServiceStub(channel))

    def call(self, method: str, request, timeout: float = 120.0):
        """Send to every rank at once; return rank 0's answer (raises rank 0's grpc.RpcError)."""
        futures = [self._pool.submit(getattr(stub, method), request, timeout=timeout) for stub in self.stubs]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except grpc.RpcError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        for other in results[1:]:
            if method == "Step":
                assert not other.generations, "only rank 0 answers generations"
            else:
                assert other == results[0], f"ranks disagree on {method}"
        self.last_results = results
        return results[0]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._pool.shutdown()
        for f in self.logs:
            f.close()
        self._tmp.cleanup()


def warmup(group: ShardGroup, max_prefill_tokens: int = 256, max_total_tokens: int = 256) -> pb.WarmupResponse:
    return group.call("Warmup", pb.WarmupRequest(max_input_tokens=max_total_tokens - 1,
                                                  max_prefill_tokens=max_prefill_tokens,
                                                  max_total_tokens=max_total_tokens))


def greedy_params() -> pb.NextTokenChooserParameters:
    return pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)


@dataclass
class Req:
    """The router's view of one request: counters, block table, and everything it got back."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    params: pb.NextTokenChooserParameters = field(default_factory=greedy_params)
    chunk: int | None = None  # prompt tokens per forward while prefilling
    cache_len: int = 0
    shared_blocks: list[int] = field(default_factory=list)  # leading blocks from another request's cache
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    ignore_eos: bool = True
    resumed: list[int] = field(default_factory=list)  # generated before a preemption, sent as generated_ids
    grammar: pb.Grammar | None = None
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    generations: list[pb.Generation] = field(default_factory=list)
    finished: pb.GeneratedText | None = None

    @property
    def tokens(self) -> list[int]:
        """Tokens generated by this run (not counting `resumed`)."""
        return [t for g in self.generations for t in g.tokens.ids]

    @property
    def remaining(self) -> int:
        return len(self.prompt) + len(self.resumed) + len(self.tokens) - self.computed

    def next_len(self) -> int:
        if self.chunk is None or self.remaining == 1:
            return self.remaining
        return min(self.chunk, self.remaining)


class MiniRouter:
    """Assigns blocks, builds Step calls, and tracks counters from the answers."""

    def __init__(self, group: ShardGroup, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.group = group
        self.block_size = block_size
        self.free = list(range(num_blocks))
        self.held: list[int] = []  # ids the shard holds: active ones, and finished ones until the next step
        self.active: dict[int, Req] = {}
        self.seq = 0  # of the last step sent
        group.call("ClearCache", pb.ClearCacheRequest())  # a new router starts from an empty shard

    def _grow(self, req: Req, upto_tokens: int) -> list[int]:
        need = math.ceil(upto_tokens / self.block_size) - len(req.blocks)
        new = [self.free.pop(0) for _ in range(max(0, need))]
        req.blocks.extend(new)
        return new

    def _request_pb(self, req: Req) -> pb.Request:
        req.blocks = list(req.shared_blocks)
        req.computed = req.cache_len
        first = req.next_len()
        self._grow(req, req.cache_len + first)
        msg = pb.Request(
            id=req.id, input_ids=req.prompt, parameters=req.params,
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=req.max_new_tokens,
                                                              ignore_eos_token=req.ignore_eos),
            prefill_logprobs=req.prefill_logprobs, top_n_tokens=req.top_n_tokens, blocks=req.blocks,
            cache_len=req.cache_len, generated_ids=req.resumed,
        )
        if req.chunk is not None:
            msg.chunk_len = first
        if req.grammar is not None:
            msg.grammar.CopyFrom(req.grammar)
        return msg

    def _updates(self) -> list[pb.RequestUpdate]:
        updates = []
        for req in self.active.values():
            n = req.next_len()
            u = pb.RequestUpdate(request_id=req.id, blocks=self._grow(req, req.computed + n))
            if req.chunk is not None and req.remaining > 1:
                u.chunk_len = n
            updates.append(u)
        return updates

    def _absorb(self, response, planned: dict[int, int]) -> None:
        for rid, n in planned.items():
            self.active[rid].computed += n
        for gen in response.generations:
            req = self.active[gen.request_id]
            req.generations.append(gen)
            if gen.HasField("generated_text"):
                req.finished = gen.generated_text
                del self.active[gen.request_id]

    def step_request(self, reqs: list[Req] = ()) -> tuple[pb.StepRequest, dict[int, int]]:  # type: ignore[assignment]
        """The next Step (drops of finished requests, updates, `reqs` admitted) and the tokens it plans."""
        dropped = [i for i in self.held if i not in self.active]
        updates = self._updates()
        planned = {r.id: r.next_len() for r in self.active.values()}
        msgs = [self._request_pb(r) for r in reqs]
        for r in reqs:
            self.active[r.id] = r
            planned[r.id] = r.next_len()
        self.seq += 1
        request = pb.StepRequest(dropped_ids=dropped, updates=updates, requests=msgs, num_requests=len(planned),
                                 seq=self.seq)
        return request, planned

    def step(self, reqs: list[Req] = ()):  # type: ignore[assignment]
        """Admit `reqs` beside the running requests, which advance in the same forward."""
        request, planned = self.step_request(reqs)
        response = self.group.call("Step", request)
        self.held = list(planned)
        self._absorb(response, planned)
        return response

    def decode(self):
        assert self.active, "nothing to decode"
        return self.step()

    @property
    def is_running(self) -> bool:
        return bool(self.active)

    def run(self, reqs: list[Req]) -> list[Req]:
        self.step(reqs)
        while self.active:
            self.step()
        return reqs
