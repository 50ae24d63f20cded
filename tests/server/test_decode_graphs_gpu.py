"""Captured CUDA graphs for decode on a tiny model: replay equals the eager paths.

CUDA-only: skipped without a GPU. Three in-process engines over one tiny model run the same calls:
plain eager, the padded path replayed eagerly (same shapes as the graphs, no capture), and captured
graphs, with the Triton kernels (block size 16) and flash-attn when installed (block size 256).

A padded batch splits the decode attention differently from the plain one (the split count follows the
batch size), so in half precision a near-tie may pick another greedy token and the runs part ways. So:
in float32, tokens must be equal; in half precision, log-probs must agree within the dtype's tolerance
up to and including the first step where the tokens differ (after it the contexts differ).
"""

from __future__ import annotations

import importlib.util
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


def assert_same_generations(got: list[tuple[int, float]], want: list[tuple[int, float]], dtype, atol: float) -> None:
    """Float32: equal tokens, log-probs within `atol`. Half: log-probs within `atol` until the runs part ways."""
    assert len(got) == len(want)
    if dtype == torch.float32:
        assert [t for t, _ in got] == [t for t, _ in want]
    for (token, logprob), (want_token, want_logprob) in zip(got, want):
        # At a split the two tokens are a near-tie, so the chosen log-probs still agree.
        assert logprob == pytest.approx(want_logprob, abs=atol)
        if token != want_token:
            break


def num_attention_compiles() -> int:
    from spindle_kernels import attention

    kernels = (attention._decode_kernel, attention._merge_splits_kernel, attention._prefill_kernel)
    return sum(len(entry[0]) for k in kernels for entry in k.device_caches.values())


NEEDS_FLASH_ATTN = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                      reason="flash-attn is not installed (block size 256 is its backend)")


@pytest.mark.parametrize(
    ("dtype", "block_size"),
    [(torch.bfloat16, 16), (torch.float32, 16), pytest.param(torch.bfloat16, 256, marks=NEEDS_FLASH_ATTN)],
)
def test_captured_decode_equals_eager(model_dir, dtype, block_size):
    plain_engine, replay_engine, captured_engine = engines(model_dir, dtype, block_size)
    graphs = captured_engine.runner.decode_graphs
    assert graphs is not None and graphs.is_captured and sorted(graphs._graphs) == list(SIZES)
    assert graphs.max_blocks_per_seq == MAX_TOTAL_TOKENS // block_size
    assert captured_engine.attention_impl != "torch"
    # Capturing ran the forward on padding only: nothing was written to the cache.
    assert all(not k.any() and not v.any() for k, v in captured_engine.kv_cache.layers)

    compiled = num_attention_compiles()
    plain, replay, captured = Driver(plain_engine), Driver(replay_engine), Driver(captured_engine)
    for d in (plain, replay, captured):
        scenario(d)
    # Warmup compiled every attention kernel the steps use (prefill, decode, mixed, batch sizes 1..9).
    assert num_attention_compiles() == compiled
    # ignore_eos: every request runs to max_new_tokens, so the steps (and graph sizes) never depend on tokens
    assert replays(captured_engine) == replays(replay_engine) == EXPECTED_REPLAYS
    assert captured.out.keys() == replay.out.keys() == plain.out.keys() and len(plain.out) == 9
    for rid, want in plain.out.items():
        for other in (replay, captured):
            assert_same_generations(other.out[rid], want, dtype, LOGPROB_ATOL[dtype])
        # Same kernels on the same shapes: the graph replays what the eager replay computes.
        assert_same_generations(captured.out[rid], replay.out[rid], dtype,
                                1e-6 if dtype == torch.float32 else 1e-3)
    for (k0, v0), (k1, v1) in zip(plain_engine.kv_cache.layers, captured_engine.kv_cache.layers):
        assert not k1[0].any() and not v1[0].any()  # padding rows never wrote block 0
        if dtype == torch.float32:  # same tokens, so the same cache (in half precision the tokens may differ)
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


def test_step_inputs_travel_in_one_copy_and_match_the_cpu_ones(model_dir):
    # The pinned double buffer: two steps in a row (the second reuses nothing the first still reads)
    # give the device exactly what the CPU path builds.
    from spindle_proto import generate_pb2 as pb
    from spindle_server.engine.batch import ShardBatch
    from spindle_server.engine.inputs import HostStaging, build_step_inputs

    engine = make_engine(model_dir, None, device="cuda", dtype=torch.bfloat16, kv_cache_bytes=KV_BYTES)
    d = Driver(engine)
    requests = [d.request(1, 5, 3), d.request(2, 40, 3), d.request(3, 1, 3)]
    batch = ShardBatch.from_proto(pb.Batch(id=1, requests=requests), engine.batch_context())
    staging = HostStaging(torch.device("cuda"))
    for _ in range(3):
        on_cuda = build_step_inputs(batch.requests, d.block_size, torch.device("cuda"), staging)
        on_cpu = build_step_inputs(batch.requests, d.block_size, torch.device("cpu"))
        for name in ("input_ids", "positions", "logit_rows"):
            assert torch.equal(getattr(on_cuda, name).cpu(), getattr(on_cpu, name)), name
        for name in ("slot_mapping", "cu_seqlens_q", "context_lens", "block_tables"):
            got, want = getattr(on_cuda.meta, name), getattr(on_cpu.meta, name)
            assert got.is_cuda and got.dtype == want.dtype and torch.equal(got.cpu(), want), name
