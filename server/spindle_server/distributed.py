"""The shard's process group: rank, world size and the two collectives tensor parallelism needs.

One process per rank. The launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this module is
the only place in the server that reads them. gloo on CPU, NCCL on CUDA, chosen once here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


class DistributedError(RuntimeError):
    """A collective failed or timed out: a peer rank died or is stuck. The shard cannot go on."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the tensor-parallel group.

    Collectives are no-ops at world size 1, so layers call them unconditionally.
    """

    rank: int
    world_size: int
    group: torch_dist.ProcessGroup | None  # None when world_size == 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")
        if self.world_size > 1 and self.group is None:
            raise ValueError(f"world_size {self.world_size} needs a process group")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place; returns `t`."""
        if self.world_size == 1:
            return t
        try:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as exc:
            raise self._lost_peers("all_reduce", exc) from exc
        return t

    def agree(self, values: list[int], op: str, device: torch.device) -> list[int]:
        """The element-wise "min" or "max" of `values` over ranks (every rank gets the same list)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=device)
        reduce_op = {"min": torch_dist.ReduceOp.MIN, "max": torch_dist.ReduceOp.MAX}[op]
        try:
            torch_dist.all_reduce(t, op=reduce_op, group=self.group)
        except RuntimeError as exc:
            raise self._lost_peers("all_reduce", exc) from exc
        return [int(x) for x in t.tolist()]

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `t` (same shape on all ranks) along the last dim, in rank order."""
        if self.world_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            torch_dist.all_gather(parts, t, group=self.group)
        except RuntimeError as exc:
            raise self._lost_peers("all_gather", exc) from exc
        return torch.cat(parts, dim=-1)

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        try:
            torch_dist.barrier(group=self.group)
        except RuntimeError as exc:
            raise self._lost_peers("barrier", exc) from exc

    def _lost_peers(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed, a peer rank has likely died or hung: {exc}"
        )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(device: torch.device, timeout_s: float = 60.0) -> Distributed:
    """Join the process group described by RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

    Defaults: rank 0 of 1 at 127.0.0.1:29500. World size 1 creates no process group. `timeout_s` bounds
    both the rendezvous and every collective, so a rank whose peers died raises DistributedError instead
    of hanging forever.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in WORLD_SIZE={world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if world_size == 1:
        return Distributed(rank=0, world_size=1, group=None)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # CUDA: the group is bound to this rank's device (device_id), not to whichever device is current on the
    # thread that happens to issue a collective; engine calls run on a thread that sets it too (engine_thread).
    device_kw = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device_kw["device_id"] = device
    try:
        torch_dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **device_kw,
        )
    except (RuntimeError, ValueError) as exc:  # the TCP store raises these when peers never arrive
        raise DistributedError(
            f"rank {rank}/{world_size}: could not join the {backend} group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:.0f}s: {exc}"
        ) from exc
    return Distributed(rank=rank, world_size=world_size, group=torch_dist.group.WORLD)
