"""oneDNN-packed CPU weights (layers/linear.py): the same outputs as the plain matmul, the plain weight freed."""

from __future__ import annotations

import pytest
import torch
from spindle_server.distributed import Distributed
from spindle_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from spindle_server.layers.linear import MergedColumnParallelLinear, RowParallelLinear, pack_linear_weights

SOLO = Distributed(rank=0, world_size=1, group=None)
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_layers_equal_plain_ones(dtype, rows):
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
        assert pack_linear_weights(model) == 4
        packed = [column(x), row(column(x)), tied(x), own(x)]
    for want, got in zip(plain, packed):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert column.weight.numel() == row.weight.numel() == own.table.weight.numel() == 0  # freed
    assert table.weight.shape == (100, 48)  # the tied head's table still embeds
    assert pack_linear_weights(model) == 4  # packing twice changes nothing


def test_float16_is_left_unpacked():
    layer = RowParallelLinear(16, 8, SOLO, dtype=torch.float16)
    layer.pack()
    assert layer.packed is None and layer.weight.shape == (8, 16)
