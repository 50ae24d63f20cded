"""The padded static-buffer decode path (CUDA graphs' inputs) on CPU, replayed eagerly.

Two in-process engines over the same tiny model run the same Prefill / Decode calls: one plain, one with
`DecodeGraphSettings(eager_replay=True)`, which sends every decode step it can serve through
`DecodeGraphs` (copied into static buffers, padded to a captured size, forward over the padded rows).
Greedy tokens, their log-probs and the KV caches must match; the graphs' replay counters show which
steps took the padded path and at which size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spindle_server.engine.cuda_graphs import DecodeGraphs, DecodeGraphSettings, parse_cuda_graph_sizes
from spindle_server.engine.inputs import build_step_inputs
from spindle_server.engine.shard import WarmupSpec

from tests.helpers.engine_driver import Driver, make_engine, replays
from tests.helpers.tiny_model import TinyModelSpec, make_tiny_model

BS = 16
SIZES = (1, 2, 4, 8)
MAX_TOTAL_TOKENS = 256  # -> block tables 16 wide in the graphs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("graphs") / "m", TinyModelSpec(num_layers=2, seed=21))


def assert_same_results(plain: Driver, padded: Driver) -> None:
    assert plain.out.keys() == padded.out.keys()
    for rid in plain.out:
        want, got = plain.out[rid], padded.out[rid]
        assert [t for t, _ in got] == [t for t, _ in want], f"request {rid}"
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-5), f"request {rid}"


def test_padded_decode_equals_eager(model_dir):
    plain = Driver(make_engine(model_dir, None))
    padded = Driver(make_engine(model_dir, DecodeGraphSettings(SIZES, eager_replay=True)))
    assert plain.engine.runner.decode_graphs is None
    graphs = padded.engine.runner.decode_graphs
    assert graphs is not None and not graphs.is_captured
    assert graphs.max_blocks_per_seq == MAX_TOTAL_TOKENS // BS
    sizes_seen: list[dict[int, int]] = []

    def both(action) -> None:
        for d in (plain, padded):
            action(d)
        assert plain.batch_size == padded.batch_size
        sizes_seen.append(replays(padded.engine))

    # Very different context lengths (1 to 9 blocks); 3 requests -> size 4.
    both(lambda d: d.prefill(d.request(10, 3, 12), d.request(11, 40, 12), d.request(12, 130, 12)))
    assert sizes_seen[-1] == {}  # a prefill runs eagerly
    for _ in range(3):
        both(lambda d: d.decode())
    assert sizes_seen[-1] == {4: 3}
    # Two prompts join the running batch: a mixed prefill + decode step, eager.
    both(lambda d: d.prefill(d.request(13, 17, 8), d.request(14, 2, 10)))
    assert sizes_seen[-1] == {4: 3}
    # 5 requests -> size 8.
    for _ in range(2):
        both(lambda d: d.decode())
    assert sizes_seen[-1] == {4: 3, 8: 2} and padded.batch_size == 5
    # Four more join (mixed step): 9 requests, larger than the largest size, run eagerly.
    both(lambda d: d.prefill(*(d.request(20 + i, 5 + 7 * i, 3) for i in range(4))))
    for _ in range(2):
        assert padded.batch_size == 9
        both(lambda d: d.decode())
    assert sizes_seen[-1] == {4: 3, 8: 2}
    # The four finished (3 tokens): 5 left -> size 8; then 10, 11, 12 and 13 finish: 1 left -> size 1.
    while plain.is_running:
        both(lambda d: d.decode())
    assert sizes_seen[-1] == {4: 3, 8: 4, 1: 2}

    assert_same_results(plain, padded)
    lengths = {rid: len(v) for rid, v in plain.out.items()}
    assert lengths == {10: 12, 11: 12, 12: 12, 13: 8, 14: 10, 20: 3, 21: 3, 22: 3, 23: 3}
    # Padding rows wrote nowhere: both caches hold the same K/V, and block 0 (no request's) is still zero.
    for (k0, v0), (k1, v1) in zip(plain.engine.kv_cache.layers, padded.engine.kv_cache.layers):
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
        assert not k1[0].any() and not v1[0].any()
        assert k1[1].any()  # the comparison is not between two empty caches


def test_single_request_uses_size_one_and_odd_sizes(model_dir):
    plain = Driver(make_engine(model_dir, None))
    padded = Driver(make_engine(model_dir, DecodeGraphSettings((1, 3), eager_replay=True)))
    for d in (plain, padded):
        d.prefill(d.request(1, 9, 4))
        while d.is_running:
            d.decode()
    assert replays(padded.engine) == {1: 3}
    for d in (plain, padded):
        d.prefill(d.request(2, 20, 4), d.request(3, 33, 4))
        while d.is_running:
            d.decode()
    assert replays(padded.engine) == {1: 3, 3: 3}  # 2 requests -> size 3
    assert_same_results(plain, padded)


def test_requests_wider_than_the_graph_tables_run_eagerly(model_dir):
    # max_total_tokens 48 -> tables 3 blocks wide; a request holding 4 blocks cannot be copied in.
    engine = make_engine(model_dir, DecodeGraphSettings(SIZES, eager_replay=True), max_total_tokens=48)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.max_blocks_per_seq == 3
    d = Driver(engine)
    d.prefill(d.request(1, 5, 3), d.request(2, 5, 3, extra_blocks=3))
    inputs = build_step_inputs(engine.batch.requests, BS, torch.device("cpu"))
    assert inputs.meta.is_decode and inputs.meta.block_tables.shape[1] == 4
    assert not graphs.can_run(inputs, engine.kv_cache)
    d.decode()
    assert replays(engine) == {}
    d.drop(2)
    narrow = [r for r in engine.batch.requests if r.id != 2]
    assert graphs.can_run(build_step_inputs(narrow, BS, torch.device("cpu")), engine.kv_cache)
    d.decode()
    assert replays(engine) == {1: 1}


def test_graphs_follow_the_cache_of_the_last_warmup(model_dir):
    engine = make_engine(model_dir, DecodeGraphSettings(SIZES, eager_replay=True))
    first = engine.runner.decode_graphs
    engine.warmup(WarmupSpec(max_input_tokens=63, max_prefill_tokens=64, max_total_tokens=64))
    second = engine.runner.decode_graphs
    assert first is not None and second is not None and second is not first
    assert second.kv_cache is engine.kv_cache and second.max_blocks_per_seq == 4
    d = Driver(engine)
    d.prefill(d.request(1, 5, 2))
    inputs = build_step_inputs(engine.batch.requests, BS, torch.device("cpu"))
    assert second.can_run(inputs, engine.kv_cache) and not first.can_run(inputs, engine.kv_cache)


def test_graphs_are_off_on_cpu_without_eager_replay(model_dir, caplog):
    with caplog.at_level("INFO", logger="spindle_server.engine"):
        engine = make_engine(model_dir, DecodeGraphSettings(SIZES))
    assert engine.runner.decode_graphs is None
    assert sum("CUDA graphs are off on cpu" in r.getMessage() for r in caplog.records) == 1


def test_size_for():
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.sizes = (1, 2, 4, 8)
    assert [graphs.size_for(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


@pytest.mark.parametrize(
    "text, sizes",
    [("1,2,4,8", (1, 2, 4, 8)), ("8, 2,2 ,1", (1, 2, 8)), ("0", ()), ("", ()), ("256", (256,))],
)
def test_parse_cuda_graph_sizes(text, sizes):
    assert parse_cuda_graph_sizes(text) == sizes


@pytest.mark.parametrize("text", ["a", "1,-2", "0,4", "1.5"])
def test_parse_cuda_graph_sizes_rejects(text):
    with pytest.raises(ValueError, match="CUDA graph sizes"):
        parse_cuda_graph_sizes(text)


def test_settings_reject_unsorted_or_nonpositive_sizes():
    for sizes in ((2, 1), (1, 1), (0, 1)):
        with pytest.raises(ValueError, match="strictly increasing"):
            DecodeGraphSettings(sizes)


def test_serve_flag():
    from spindle_server.cli import build_parser

    def parse(*extra: str):
        return build_parser().parse_args(["serve", "m", "--uds-path", "s", *extra]).cuda_graphs

    assert parse() == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert parse("--cuda-graphs", "4,1") == (1, 4) and parse("--cuda-graphs", "0") == ()
    with pytest.raises(SystemExit):
        parse("--cuda-graphs", "1,two")


def _triton_padded_path(model_dir: str) -> dict[int, int]:
    """The padded path with the Triton kernels (what the graphs replay on CUDA) vs the plain reference path.

    Runs in a child with TRITON_INTERPRET=1. Sizes (1, 3, 8) and 1024-token tables: 2 requests pad to 3
    and the decode kernel splits the context (the padding row's later splits are empty); 5 pad to 8.
    """
    path = Path(model_dir)
    plain = Driver(make_engine(path, None, max_total_tokens=1024))
    triton = Driver(make_engine(path, DecodeGraphSettings((1, 3, 8), eager_replay=True), max_total_tokens=1024,
                                attention_impl="triton", use_triton=True, max_prefill_tokens=128))
    for d in (plain, triton):
        d.prefill(d.request(10, 3, 6), d.request(11, 100, 6))
        d.decode()
        d.prefill(d.request(12, 40, 3), d.request(13, 17, 5), d.request(14, 2, 3))
        while d.is_running:
            d.decode()
    assert_same_results(plain, triton)
    for (k0, v0), (k1, v1) in zip(plain.engine.kv_cache.layers, triton.engine.kv_cache.layers):
        torch.testing.assert_close(k1, k0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-4)
        assert not k1[0].any() and not v1[0].any()
    return replays(triton.engine)


@pytest.mark.slow
def test_padded_path_with_triton_kernels_in_the_interpreter(model_dir):
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from tests.server.test_decode_graphs import _triton_padded_path\n"
        "print('REPLAYS', json.dumps(_triton_padded_path(sys.argv[1])))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPLAYS "))
    # 2 requests -> 3 (then 3 more join); 5 -> 8 twice (12 and 14 finish); 3 -> 3 (10 and 11 finish); 1 -> 1.
    assert {int(k): v for k, v in json.loads(line.removeprefix("REPLAYS ")).items()} == {3: 2, 8: 2, 1: 1}


def test_a_failed_capture_leaves_the_shard_not_ready(model_dir, monkeypatch):
    from spindle_server.engine import shard
    from spindle_server.engine.errors import NotReadyError

    engine = make_engine(model_dir, DecodeGraphSettings(SIZES, eager_replay=True))
    assert engine.kv_cache is not None

    def failing(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(shard, "DecodeGraphs", failing)
    with pytest.raises(RuntimeError, match="capture failed"):
        engine.warmup(WarmupSpec(max_input_tokens=63, max_prefill_tokens=64, max_total_tokens=64))
    assert engine.kv_cache is None and engine.runner.decode_graphs is None
    with pytest.raises(NotReadyError):
        engine.batch_context()


def test_padded_decode_of_a_mixture_of_experts_model(tmp_path_factory):
    # Padding rows are routed to experts like any token; they must change nothing in the real rows.
    model_dir = make_tiny_model(
        tmp_path_factory.mktemp("graphs-moe") / "m",
        TinyModelSpec(arch="mixtral", num_layers=2, intermediate_size=48, seed=22),
    )
    plain = Driver(make_engine(model_dir, None))
    padded = Driver(make_engine(model_dir, DecodeGraphSettings((1, 4), eager_replay=True)))
    for d in (plain, padded):
        d.prefill(d.request(1, 9, 3), d.request(2, 40, 6), d.request(3, 3, 3))
        while d.is_running:
            d.decode()
    assert replays(padded.engine) == {4: 2, 1: 3}
    assert_same_results(plain, padded)
