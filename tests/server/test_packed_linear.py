"""oneDNN-packed CPU weights (layers/linear.py): the same outputs as the plain matmul, the plain weight freed."""

from __future__ import annotations

import logging

import pytest
import torch
from spindle_kernels import cpu as cpu_kernels
from spindle_server.distributed import Distributed
from spindle_server.layers import linear
from spindle_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from spindle_server.layers.linear import (
    EXACT_ROWS,
    MIN_ROWS,
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    pack_linear_weights,
    padded_rows,
    warm_packed_linears,
)

SOLO = Distributed(rank=0, world_size=1, group=None)
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 17, 64, 100])  # 1, 17 and 100 run padded (to 4, 18 and 104)
def test_packed_layers_equal_plain_ones(dtype, rows):
    """Row kernel off: every matmul from oneDNN's packed copy, the plain weights freed."""
    torch.manual_seed(rows)
    column = MergedColumnParallelLinear(48, [32, 32], SOLO, bias=True, dtype=dtype)
    row = RowParallelLinear(64, 48, SOLO, bias=False, dtype=dtype)
    table = VocabParallelEmbedding(100, 48, SOLO, dtype)
    tied, own = ParallelLMHead(100, 48, SOLO, dtype, tied_to=table), ParallelLMHead(100, 48, SOLO, dtype)
    model = torch.nn.ModuleList([column, row, table, tied, own])
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(rows, 48, dtype=dtype)
    with torch.inference_mode():
        plain = [column(x), row(column(x)), tied(x), own(x)]
        assert pack_linear_weights(model, row_kernel="off") == 4
        packed = [column(x), row(column(x)), tied(x), own(x)]
    for want, got in zip(plain, packed):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert column.weight.numel() == row.weight.numel() == own.table.weight.numel() == 0  # freed
    assert table.weight.shape == (100, 48)  # the tied head's table still embeds
    assert pack_linear_weights(model, row_kernel="off") == 4  # packing twice changes nothing


def _layers(dtype: torch.dtype, in_features: int = 48) -> torch.nn.ModuleList:
    column = MergedColumnParallelLinear(in_features, [32, 40], SOLO, bias=True, dtype=dtype)
    row = RowParallelLinear(72, in_features, SOLO, bias=True, dtype=dtype)
    table = VocabParallelEmbedding(100, in_features, SOLO, dtype)
    model = torch.nn.ModuleList([column, row, table, ParallelLMHead(100, in_features, SOLO, dtype, tied_to=table),
                                 ParallelLMHead(100, in_features, SOLO, dtype)])
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 48, 37])  # whole 64-byte vectors, and tails in one or both dtypes
def test_row_kernel_serves_up_to_four_rows_from_the_plain_weights(dtype, in_features):
    """Row kernel on: 1-2 row matmuls (bias included) read the kept plain weights through the C++ kernel, more
    rows the packed copy; each equals the plain matmul. drop_plain frees what only the kernel read."""
    torch.manual_seed(in_features)
    model = _layers(dtype, in_features)
    column, row, table, tied, own = model
    want = {}
    with torch.inference_mode():
        for n in (1, 2, 3, 4, 5, 9):
            x, h = torch.randn(n, in_features, dtype=dtype), torch.randn(n, 72, dtype=dtype)
            want[n] = (x, h), (column(x), row(h), tied(x), own(x))  # unpacked: F.linear
        assert pack_linear_weights(model, row_kernel="on") == 4
        for (x, h), expected in want.values():
            for got, exp in zip((column(x), row(h), tied(x), own(x)), expected):
                torch.testing.assert_close(got, exp, **TOLERANCE[dtype])
    for layer in (column, row, tied, own):
        assert layer.plain_rows is not None and layer.packed is not None  # both copies kept
    calls = []
    real = cpu_kernels.linear_rows
    try:
        cpu_kernels.linear_rows = lambda *a: calls.append(a[0].shape[0]) or real(*a)
        with torch.inference_mode():
            for (x, _), _ in want.values():
                column(x)
    finally:
        cpu_kernels.linear_rows = real
    assert calls == [1, 2, 3, 4]  # 5 and 9 rows went to oneDNN
    for layer in (column, row, tied, own):
        layer.drop_plain()
        assert layer.plain_rows is None
    assert column.weight.numel() == row.weight.numel() == own.table.weight.numel() == 0
    assert table.weight.shape == (100, in_features)  # the tied table still embeds


@pytest.mark.parametrize("in_features, out_features", [(64, 64), (96, 48), (48, 64)])
def test_tile_kernel_serves_bf16_matmuls_of_up_to_32_rows(in_features, out_features):
    """With AMX, bf16 matmuls of 5 to 32 rows (bias included) read the plain weights through `linear_tiles`;
    1-4 rows stay on the row kernel, 33 on oneDNN, and shapes without whole 16 x 32 tiles (48 in) on oneDNN;
    every output within a bf16 step of the exact product. Without AMX the kernel is off and says why."""
    torch.manual_seed(out_features)
    dtype = torch.bfloat16
    layer = ColumnParallelLinear(in_features, out_features, SOLO, bias=True, dtype=dtype)  # bias in the matmul
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    inputs = {n: torch.randn(n, in_features, dtype=dtype) for n in (1, 4, 5, 16, 17, 32, 33)}
    pack_linear_weights(torch.nn.ModuleList([layer]), row_kernel="on")
    tiles = cpu_kernels.has_linear_tiles(dtype)
    assert linear.PLAIN_KERNELS.tiles == tiles and linear.PLAIN_KERNELS.rows
    if not tiles:
        with pytest.raises(RuntimeError, match="linear_tiles needs"):
            cpu_kernels.linear_tiles(inputs[5], weight, bias)
    calls: dict[str, list[int]] = {"rows": [], "tiles": []}
    real_rows, real_tiles = cpu_kernels.linear_rows, cpu_kernels.linear_tiles
    try:
        cpu_kernels.linear_rows = lambda *a: calls["rows"].append(a[0].shape[0]) or real_rows(*a)
        cpu_kernels.linear_tiles = lambda *a: calls["tiles"].append(a[0].shape[0]) or real_tiles(*a)
        with torch.inference_mode():
            got = {n: layer(x) for n, x in inputs.items()}
    finally:
        cpu_kernels.linear_rows, cpu_kernels.linear_tiles = real_rows, real_tiles
    served = [5, 16, 17, 32] if tiles and in_features % 32 == 0 else []
    assert calls == {"rows": [1, 4], "tiles": served}
    for n, x in inputs.items():
        exact = x.double() @ weight.double().T + bias.double()
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)  # a bf16 step at each exact value
        assert ((got[n].double() - exact).abs() <= ulp).all(), n  # the exact product rounded, or one step off


def test_row_kernel_auto_keeps_plain_weights_only_when_timed_faster_and_small(monkeypatch, caplog):
    model = _layers(torch.float32)
    monkeypatch.setattr(linear, "ROW_KERNEL_MARGIN", 0.0)  # nothing is that fast: oneDNN keeps every matmul
    with caplog.at_level(logging.INFO, logger="spindle_server.layers.linear"):
        pack_linear_weights(model, row_kernel="auto")
    assert all(m.plain_rows is None for m in (model[0], model[1], model[3], model[4]))
    assert model[0].weight.numel() == 0
    assert "the C++ row kernel" in caplog.text and caplog.text.rstrip().endswith("oneDNN")
    model = _layers(torch.float32)
    monkeypatch.setattr(linear, "ROW_KERNEL_MARGIN", float("inf"))  # any time wins
    pack_linear_weights(model, row_kernel="auto")
    assert all(m.plain_rows is not None for m in (model[0], model[1], model[3], model[4]))
    model = _layers(torch.float32)
    monkeypatch.setattr(linear, "ROW_COPY_MEMORY_SHARE", 0.0)  # no room for a second copy: not even timed
    pack_linear_weights(model, row_kernel="auto")
    assert all(m.plain_rows is None for m in (model[0], model[1], model[4])) and model[1].weight.numel() == 0
    monkeypatch.setenv("SPINDLE_CPU_ROW_KERNEL", "sometimes")
    with pytest.raises(ValueError, match="SPINDLE_CPU_ROW_KERNEL must be auto, on or off"):
        pack_linear_weights(_layers(torch.float32))


def test_row_and_tile_kernels_are_chosen_apart(monkeypatch, caplog):
    """bfloat16: the row kernel is timed at one row and, with AMX, the tile kernel at TILE_ROWS rows, each against
    oneDNN; the choice is logged and set in PLAIN_KERNELS, and one kernel paying keeps the plain weights for it."""
    tiles = cpu_kernels.has_linear_tiles(torch.bfloat16)
    monkeypatch.setattr(linear, "ROW_KERNEL_MARGIN", float("inf"))  # any time wins
    with caplog.at_level(logging.INFO, logger="spindle_server.layers.linear"):
        pack_linear_weights(_layers(torch.bfloat16, 64), row_kernel="auto")
    assert linear.PLAIN_KERNELS == linear.PlainKernels(rows=True, tiles=tiles)
    assert (f"{cpu_kernels.TILE_ROWS} rows: the AMX tile kernel" in caplog.text) == tiles
    monkeypatch.setattr(linear, "_plain_kernels_pay", lambda kept, can_tile: (False, can_tile))  # only tiles pay
    model = _layers(torch.bfloat16, 64)
    square = ColumnParallelLinear(64, 64, SOLO, bias=True, dtype=torch.bfloat16)  # whole tiles
    for p in square.parameters():
        p.data.normal_(0, 0.1)
    model.append(square)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = square(x)  # unpacked: F.linear
    pack_linear_weights(model, row_kernel="auto")
    assert linear.PLAIN_KERNELS == linear.PlainKernels(rows=False, tiles=tiles)
    assert all((m.plain_rows is not None) == tiles for m in (model[0], model[1], model[3], model[4], square))
    calls = []
    real = cpu_kernels.linear_tiles
    monkeypatch.setattr(cpu_kernels, "linear_tiles", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():  # one row without the row kernel: the tile kernel where it runs, else oneDNN
        torch.testing.assert_close(square(x), want, **TOLERANCE[torch.bfloat16])
    assert calls == ([1] if tiles else [])


def test_float16_is_left_unpacked():
    layer = RowParallelLinear(16, 8, SOLO, dtype=torch.float16)
    layer.pack()
    assert layer.packed is None and layer.weight.shape == (8, 16)


def test_padded_rows_are_few_and_close():
    """Row counts bucket to 8 per octave above 16: at most 12.5% padding, and few distinct matmul shapes, so
    oneDNN's per-shape primitive caches stop growing (one entry per row count and weight shape). Below four
    rows a matmul runs at four (oneDNN's one-row kernel streams weights slower)."""
    assert [padded_rows(n) for n in range(1, EXACT_ROWS + 1)] == [MIN_ROWS] * 3 + list(range(4, EXACT_ROWS + 1))
    assert [padded_rows(n) for n in (17, 18, 19, 33, 100, 1000, 1025, 8192)] == [18, 18, 20, 36, 104, 1024, 1152, 8192]
    padded = [padded_rows(n) for n in range(1, 8193)]
    assert all(n <= p <= n * 1.125 for n, p in zip(range(17, 8193), padded[16:]))
    assert padded == sorted(padded)  # monotone: more rows never run smaller
    assert len(set(padded)) == 13 + 8 * 9  # 4..16 exact, then 8 per octave from 16 to 8192
    assert all(padded_rows(p) == p for p in set(padded))  # a bucket is its own bucket


def test_packed_output_has_the_callers_rows():
    layer = RowParallelLinear(24, 8, SOLO, bias=True)
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(37, 24)
    with torch.inference_mode():
        plain = layer(x)
        layer.pack()
        packed = layer(x)
    assert packed.shape == (37, 8) and packed.is_contiguous()
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_warm_runs_each_packed_shape_once_per_bucket():
    """Warmup builds every oneDNN primitive serving will use: each distinct packed shape (layers of one shape
    share theirs) at each row bucket up to the forward's row cap; unpacked layers have none."""
    same = [RowParallelLinear(48, 32, SOLO) for _ in range(3)]
    other = MergedColumnParallelLinear(48, [32, 32], SOLO, bias=True)
    model = torch.nn.ModuleList([*same, other, RowParallelLinear(16, 8, SOLO, dtype=torch.float16)])
    assert warm_packed_linears(model, 100) == 0  # nothing packed yet
    pack_linear_weights(model)
    buckets = {padded_rows(n) for n in range(1, 101)}
    assert len(buckets) == 13 + 8 + 8 + 5  # 4..16, 18..32, 36..64, 72..104 (the bucket of 100 is 104)
    assert warm_packed_linears(model, 100) == 2 * len(buckets)
    # A row-parallel layer adds its bias after the all-reduce: its matmul (and so its primitive) has none.
    biased_row = RowParallelLinear(48, 32, SOLO, bias=True)
    biased_row.pack()
    assert warm_packed_linears(torch.nn.ModuleList([same[0], biased_row]), 100) == len(buckets)
    head = ParallelLMHead(100, 48, SOLO)
    head.pack()
    assert warm_packed_linears(head, 100) == len(buckets)
    head.max_warm_rows = 32  # the LM head caps its own rows
    assert warm_packed_linears(head, 100) == 13 + 8


def test_small_inputs_share_a_buffer_yet_each_call_is_its_own():
    # Fewer than MIN_ROWS rows run through one reused zero-padded buffer: what an earlier, larger input left in
    # it never reaches a later output, inside inference mode and out of it.
    layer = RowParallelLinear(24, 8, SOLO, bias=True)
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    xs = [torch.randn(n, 24) for n in (3, 1, 2, 1)]
    with torch.no_grad():
        plain = [layer(x) for x in xs]
    layer.pack()
    with torch.inference_mode():
        first = layer(xs[0])
    with torch.no_grad():
        rest = [layer(x) for x in xs[1:]]
    for want, got in zip(plain, [first, *rest]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_faster_buckets_pick_the_fastest_larger_bucket_within_twice_the_rows():
    seconds = {64: 1.0, 72: 0.5, 80: 0.95, 128: 0.2, 144: 0.3, 256: 0.5, 288: 0.46}
    # 64, 72, 80: 128 is the fastest within twice their rows. 128, 144: every larger bucket within reach is
    # slower. 256: 288 takes 0.92 of its time, outside the 0.9 margin.
    assert linear.faster_buckets(seconds) == {64: 128, 72: 128, 80: 128}
    assert linear.faster_buckets({100: 1.0, 201: 0.1}) == {}  # past twice the rows


def test_a_bucket_runs_at_the_rows_warmup_timed_faster(monkeypatch):
    layer = MergedColumnParallelLinear(48, [40], SOLO, bias=True)
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(62, 48)  # bucket 64
    with torch.inference_mode():
        want = layer(x)
        layer.pack()
        pads = []
        real_padded = linear._padded
        monkeypatch.setattr(linear, "_padded", lambda t, rows: pads.append(rows) or real_padded(t, rows))
        monkeypatch.setitem(linear.RUN_AT, (40, 48, torch.float32, True), {64: 128})
        got = layer(x)
        monkeypatch.setitem(linear.RUN_AT, (40, 48, torch.float32, False), {64: 96})  # another key: not this one
        layer(x)
    assert pads == [128, 128]  # 62 rows ran at 128, twice
    assert got.shape == (62, 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padded_rows_reuse_one_buffer_whose_stale_rows_change_nothing(monkeypatch):
    # 61 rows run at 64 and 33 at 36, both from one buffer per width: the second input's padding rows still
    # hold the first's (NaN) rows, and its outputs are exact. Past PAD_BUFFER_BYTES, F.pad pads instead.
    monkeypatch.setattr(linear, "_PAD_BUFFERS", {})
    layer = MergedColumnParallelLinear(48, [40], SOLO)
    layer.weight.data.normal_(0, 0.1)
    plain = layer.weight.detach().clone()
    layer.pack()
    x = torch.randn(33, 48)
    with torch.inference_mode():
        layer(torch.full((61, 48), float("nan")))
        got = layer(x)
        (buffer,) = linear._PAD_BUFFERS.values()
        assert buffer.shape == (64, 48) and buffer[33:36].isnan().all()
        torch.testing.assert_close(got, x @ plain.T, atol=1e-5, rtol=1e-5)
        pads = []
        real_pad = linear.F.pad
        monkeypatch.setattr(linear.F, "pad", lambda t, pad: pads.append(pad) or real_pad(t, pad))
        monkeypatch.setattr(linear, "PAD_BUFFER_BYTES", 35 * 48 * 4)
        torch.testing.assert_close(layer(x), x @ plain.T, atol=1e-5, rtol=1e-5)
    assert pads == [(0, 0, 0, 3)]


def test_warmup_times_bf16_buckets_and_moves_them_only_up_to_twice_their_rows(monkeypatch):
    monkeypatch.setattr(linear, "RUN_AT", {})
    monkeypatch.setattr(linear, "TUNE_MARGIN", float("inf"))  # every bucket with a larger one in reach moves
    layers = [RowParallelLinear(64, 48, SOLO, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)]
    model = torch.nn.ModuleList(layers)
    pack_linear_weights(model, row_kernel="off")
    warm_packed_linears(model, 300)
    buckets = sorted({padded_rows(n) for n in range(1, 301)})
    assert list(linear.RUN_AT) == [(48, 64, torch.bfloat16, False)]  # float32 is not timed
    runs = linear.RUN_AT[(48, 64, torch.bfloat16, False)]
    assert sorted(runs) == [b for b in buckets if linear.TUNE_MIN_ROWS <= b and b < buckets[-1]]
    assert all(b < r <= 2 * b and r in buckets for b, r in runs.items())
    assert warm_packed_linears(model, 300, tune=False) == 2 * len(buckets) and linear.RUN_AT == {}  # untimed
