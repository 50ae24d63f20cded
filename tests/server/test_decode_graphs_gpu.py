"""Captured CUDA graphs for decode on a tiny model: replay equals the eager paths.

CUDA-only: skipped without a GPU. Three in-process engines over one tiny model run the same calls:
plain eager, the padded path replayed eagerly (same shapes as the graphs, no capture), and captured
graphs. Captured == eager replay (same kernels on the same shapes) and == plain eager (greedy tokens;
log-probs within the dtype's tolerance), in float16, bfloat16 and float32, with the Triton kernels
(block size 16) and flash-attn when installed (block size 256).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from spindle_server.engine.cuda_graphs import DecodeGraphSettings
from spindle_server.engine.shard import WarmupSpec

from tests.helpers.engine_driver import Driver, make_engine, replays
from tests.helpers.tiny_model import TinyModelSpec, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SIZES = (1, 2, 4, 8)
MAX_TOTAL_TOKENS = 512
KV_BYTES = 256 << 20
LOGPROB_ATOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("graphs-gpu") / "m", TinyModelSpec(num_layers=2, seed=21))


def scenario(d: Driver) -> None:
    """3 requests (size 4, contexts 3..480 tokens), +2 (size 8), +4 (9: eager), then drain to 1."""
    d.prefill(d.request(10, 3, 12), d.request(11, 40, 12), d.request(12, 480, 12))
    for _ in range(3):
        d.decode()
    d.prefill(d.request(13, 17, 8), d.request(14, 2, 10))
    for _ in range(2):
        d.decode()
    d.prefill(*(d.request(20 + i, 5 + 7 * i, 3) for i in range(4)))
    while d.is_running:
        d.decode()


EXPECTED_REPLAYS = {4: 3, 8: 4, 1: 2}  # as in the CPU test: 9-request steps and prefills run eagerly


def engines(model_dir, dtype, block_size):
    kw = dict(device="cuda", dtype=dtype, block_size=block_size, max_total_tokens=MAX_TOTAL_TOKENS,
              kv_cache_bytes=KV_BYTES)
    return (
        make_engine(model_dir, None, **kw),
        make_engine(model_dir, DecodeGraphSettings(SIZES, eager_replay=True), **kw),
        make_engine(model_dir, DecodeGraphSettings(SIZES), **kw),
    )


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_captured_decode_equals_eager(model_dir, dtype, block_size):
    plain_engine, replay_engine, captured_engine = engines(model_dir, dtype, block_size)
    graphs = captured_engine.runner.decode_graphs
    assert graphs is not None and graphs.is_captured and sorted(graphs._graphs) == list(SIZES)
    assert graphs.max_blocks_per_seq == MAX_TOTAL_TOKENS // block_size
    assert captured_engine.attention_impl != "torch"
    # Capturing ran the forward on padding only: nothing was written to the cache.
    assert all(not k.any() and not v.any() for k, v in captured_engine.kv_cache.layers)

    plain, replay, captured = Driver(plain_engine), Driver(replay_engine), Driver(captured_engine)
    for d in (plain, replay, captured):
        scenario(d)
    assert replays(captured_engine) == replays(replay_engine) == EXPECTED_REPLAYS
    assert captured.out.keys() == replay.out.keys() == plain.out.keys() and len(plain.out) == 9
    for rid, want in plain.out.items():
        for other in (replay, captured):
            got = other.out[rid]
            assert [t for t, _ in got] == [t for t, _ in want], f"request {rid}"
            assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=LOGPROB_ATOL[dtype])
        # Same kernels on the same shapes: the graph replays exactly what the eager replay computes.
        assert [lp for _, lp in captured.out[rid]] == pytest.approx(
            [lp for _, lp in replay.out[rid]], abs=1e-6 if dtype == torch.float32 else 1e-3
        )
    for (k0, v0), (k1, v1) in zip(plain_engine.kv_cache.layers, captured_engine.kv_cache.layers):
        assert not k1[0].any() and not v1[0].any()  # padding rows never wrote block 0
        torch.testing.assert_close(k1, k0, atol=LOGPROB_ATOL[dtype], rtol=LOGPROB_ATOL[dtype])
        torch.testing.assert_close(v1, v0, atol=LOGPROB_ATOL[dtype], rtol=LOGPROB_ATOL[dtype])


def test_rewarmup_recaptures_on_the_new_cache(model_dir):
    engine = make_engine(model_dir, DecodeGraphSettings((1, 2)), device="cuda", dtype=torch.bfloat16,
                         kv_cache_bytes=KV_BYTES)
    # A weak reference: holding the first graphs would hold the first KV cache, and the second warmup sizes
    # its cache from what is free.
    first = weakref.ref(engine.runner.decode_graphs)
    engine.warmup(WarmupSpec(max_input_tokens=63, max_prefill_tokens=64, max_total_tokens=64))
    second = engine.runner.decode_graphs
    assert second is not None and second is not first()
    assert second.is_captured and second.kv_cache is engine.kv_cache and second.max_blocks_per_seq == 4
    d = Driver(engine)
    d.prefill(d.request(1, 5, 4), d.request(2, 30, 4))
    while d.is_running:
        d.decode()
    assert replays(engine) == {2: 3} and [len(v) for v in d.out.values()] == [4, 4]


def test_torch_reference_kernels_are_never_captured(model_dir):
    # The reference kernels read values on the host (.tolist(), .max()): capturing them would fail, so an
    # engine told its attention is "torch" runs every step eagerly.
    engine = make_engine(model_dir, DecodeGraphSettings((1, 2)), device="cuda", kv_cache_bytes=KV_BYTES,
                         attention_impl="torch")
    assert engine.runner.decode_graphs is None


def test_captured_decode_of_a_mixture_of_experts_model(tmp_path_factory):
    # The Triton fused MoE reads no routing back to the host, so Mixtral's decode is captured too. float32
    # only: in half precision a near-tie between two experts may route differently in a padded batch.
    model_dir = make_tiny_model(
        tmp_path_factory.mktemp("graphs-gpu-moe") / "m",
        TinyModelSpec(arch="mixtral", num_layers=2, intermediate_size=48, seed=22),
    )
    plain_engine, replay_engine, captured_engine = engines(model_dir, torch.float32, 16)
    assert captured_engine.runner.decode_graphs is not None and captured_engine.runner.decode_graphs.is_captured
    plain, replay, captured = Driver(plain_engine), Driver(replay_engine), Driver(captured_engine)
    for d in (plain, replay, captured):
        scenario(d)
    assert replays(captured_engine) == replays(replay_engine) == EXPECTED_REPLAYS
    for rid, want in plain.out.items():
        for other in (replay, captured):
            assert [t for t, _ in other.out[rid]] == [t for t, _ in want], f"request {rid}"
            assert [lp for _, lp in other.out[rid]] == pytest.approx([lp for _, lp in want], abs=1e-3)
