"""Helpers for tests that run real tensor-parallel ranks as local processes over gloo."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port nobody listens on right now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment init_distributed reads, as the launcher sets it for each shard."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
