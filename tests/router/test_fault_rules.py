"""Fault handling without processes: shard-call deadlines, the stalled-shard path of the scheduler, and the
socket rules the launcher and the shards share."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from spindle_proto.sockets import SocketInUse, is_listening, remove_stale_socket
from spindle_router.config import SchedulerConfig
from spindle_router.metrics import Metrics
from spindle_router.scheduler.loop import Scheduler
from spindle_router.scheduler.request import ErrorEvent, SamplingParams, StoppingParams, ValidRequest
from spindle_router.shards import CallDeadlines, ShardStalled

# ---------------------------------------------------------------------------------------------- deadlines


def test_deadline_follows_the_work_with_a_floor_and_an_override() -> None:
    d = CallDeadlines(base_ns=20_000_000, token_ns=1_000_000)  # 20 ms a decode step, 1 ms a prefill token
    assert d.for_call("Step", 1) == d.floor_s  # 10 x 20 ms is far below the floor
    assert d.for_call("Step", 8000) == pytest.approx(10 * (0.020 + 7999 * 0.001))  # 80 s: above the floor
    assert d.for_call("ClearCache", 0) == d.floor_s
    assert d.for_call("SomeFutureRpc", 0) == d.floor_s  # a new RPC gets a deadline without asking
    assert d.for_call("Health", 0) == d.probe_s
    assert d.for_call("Warmup", 0) == d.startup_s and d.for_call("Info", 0) == d.startup_s
    fixed = CallDeadlines(override_s=2.5, base_ns=20_000_000, token_ns=1_000_000)
    assert {fixed.for_call(m, 8000) for m in ("Step", "Health", "ClearCache")} == {2.5}
    assert fixed.for_call("Warmup", 0) == fixed.startup_s  # warmup is never cut short by a step deadline
    assert CallDeadlines(override_s=900.0).for_call("Warmup", 0) == 900.0
    with pytest.raises(ValueError, match="must be > 0"):
        CallDeadlines(override_s=0.0)


# ----------------------------------------------------------------------------------- a stalled shard


class StalledShards:
    """A ShardClient whose every step call missed its deadline."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steps: list[dict] = []  # the keyword arguments of each step call

    async def _stall(self, method: str, *args, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(method)
        raise ShardStalled(f"Shard stalled: /tmp/x-0 did not answer {method} within 3.0s")

    async def step(self, *a, **kw):  # type: ignore[no-untyped-def]
        self.steps.append(kw)
        return await self._stall("Step")

    async def clear_cache(self, *a, **kw):  # type: ignore[no-untyped-def]
        return await self._stall("ClearCache")

    async def health(self) -> None:
        await self._stall("Health")


def _request(n: int) -> ValidRequest:
    return ValidRequest(input_ids=tuple(range(1, n + 1)), sampling=SamplingParams(),
                        stopping=StoppingParams(max_new_tokens=8))


@pytest.mark.parametrize("overlap", [False, True], ids=["overlap-off", "overlap-on"])
def test_a_stalled_shard_fails_every_request_and_the_scheduler_stops_calling(overlap: bool) -> None:
    async def main():
        shards = StalledShards()
        # max_batch_size 1: the second request waits.
        config = SchedulerConfig(max_batch_prefill_tokens=16, max_batch_size=1, overlap_steps=overlap)
        scheduler = Scheduler(shards, config, num_blocks=32, block_size=16, metrics=Metrics())
        scheduler.start()
        try:
            streams = [scheduler.submit(_request(5)), scheduler.submit(_request(6))]
            ends = []
            for s in streams:
                ends.append([e async for e in s])
            await asyncio.wait_for(scheduler.failed.wait(), timeout=10)
            late = [e async for e in scheduler.submit(_request(3))]
            health = await scheduler.health_check()
            return shards, scheduler, ends, late, health
        finally:
            await scheduler.stop(drain_timeout_s=1)

    shards, scheduler, ends, late, health = asyncio.run(main())
    for events in (*ends, late):
        assert len(events) == 1 and isinstance(events[0], ErrorEvent)
        assert events[0].message.startswith("Shard stalled")
    # Nothing more went to the stalled shard (no clear, no health probe) than the steps sent before its
    # deadline passed: with overlap, the second step left before the first one's answer.
    assert shards.calls == ["Step"] * (2 if overlap else 1)
    # The deadline scales with the tokens the step computes: the first prompt, whole; one request.
    assert shards.steps[0]["work_tokens"] == 5 and shards.steps[0]["num_requests"] == 1
    assert [s["seq"] for s in shards.steps] == list(range(1, len(shards.steps) + 1))
    assert health is False and scheduler.is_healthy is False
    assert scheduler.blocks.allocator.num_free_blocks == scheduler.blocks.allocator.num_usable_blocks
    assert not scheduler.running and not scheduler.waiting


# ------------------------------------------------------------------------------------------------ sockets


def _bound(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    return s


def test_a_live_socket_is_refused_and_kept(tmp_path) -> None:
    path = str(tmp_path / "shard-0")
    with _bound(path) as s:
        s.listen(1)
        assert is_listening(path)
        with pytest.raises(SocketInUse, match="another Spindle instance"):
            remove_stale_socket(path)
        assert os.path.exists(path)


def test_a_stale_socket_is_removed(tmp_path) -> None:
    path = str(tmp_path / "shard-0")
    with _bound(path) as s:  # closed without unlink: what a killed shard leaves
        s.listen(1)
    assert os.path.exists(path) and not is_listening(path)
    assert remove_stale_socket(path) is True
    assert not os.path.exists(path)
    assert remove_stale_socket(path) is False  # nothing there


def test_a_file_that_is_no_socket_is_never_removed(tmp_path) -> None:
    path = tmp_path / "shard-0"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a unix socket"):
        remove_stale_socket(str(path))
    assert path.read_text() == "precious"
